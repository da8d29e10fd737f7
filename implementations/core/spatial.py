"""Spatial transformer: crop a glimpse from the canvas and paste an object back onto it.

`z_where = (s, x, y)` follows the Pyro AIR example's convention: a canvas point `u` (normalised
coordinates in [-1, 1]) lies at `s * u + (x, y)` in the object's window. So `s` is a zoom factor:
the window covers `1 / s` of the canvas side, centred at `-(x, y) / s`. The published priors
(`s ~ N(3, 0.2)`) are written in this convention, which is why we keep it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _theta(scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Batch of 2x3 affine matrices [[scale, 0, shift_x], [0, scale, shift_y]]."""
    zeros = torch.zeros_like(scale)
    row_x = torch.stack([scale, zeros, shift[:, 0]], dim=-1)
    row_y = torch.stack([zeros, scale, shift[:, 1]], dim=-1)
    return torch.stack([row_x, row_y], dim=1)


def paste(objects: torch.Tensor, z_where: torch.Tensor, canvas: int) -> torch.Tensor:
    """Draw (B, w, w) objects onto (B, canvas, canvas) images at `z_where` (B, 3)."""
    batch, window = objects.shape[0], objects.shape[-1]
    theta = _theta(z_where[:, 0], z_where[:, 1:])
    grid = F.affine_grid(theta, [batch, 1, canvas, canvas], align_corners=False)
    out = F.grid_sample(
        objects.reshape(batch, 1, window, window), grid, align_corners=False, padding_mode="zeros"
    )
    return out.view(batch, canvas, canvas)


def crop(images: torch.Tensor, z_where: torch.Tensor, window: int) -> torch.Tensor:
    """Read (B, window, window) glimpses out of (B, H, W) images at `z_where` (B, 3).

    The inverse map of `paste`: a window point `w` lies at `(w - (x, y)) / s` on the canvas.
    """
    batch, height, width = images.shape
    inv_scale = 1.0 / z_where[:, 0]
    theta = _theta(inv_scale, -z_where[:, 1:] * inv_scale[:, None])
    grid = F.affine_grid(theta, [batch, 1, window, window], align_corners=False)
    out = F.grid_sample(
        images.reshape(batch, 1, height, width), grid, align_corners=False, padding_mode="zeros"
    )
    return out.view(batch, window, window)


def where_to_box(z_where: torch.Tensor, canvas: int) -> torch.Tensor:
    """Window of `z_where` (..., 3) as a pixel box (..., 4) = (x0, y0, x1, y1) on the canvas.

    Pixel coordinates run over [0, canvas] edge to edge, matching the generator's boxes.
    """
    s, x, y = z_where.unbind(-1)
    half = 1.0 / s.abs().clamp_min(1e-6)
    cx, cy = -x / s, -y / s
    to_px = canvas / 2.0
    return torch.stack(
        [(cx - half + 1) * to_px, (cy - half + 1) * to_px, (cx + half + 1) * to_px,
         (cy + half + 1) * to_px],
        dim=-1,
    )  # fmt: skip
