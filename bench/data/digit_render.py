"""Rendering rescaled MNIST digits for the multi-MNIST generator (bench/data/multi_mnist.py).

Each (digit, scale) pair is rendered into a small square patch with ``grid_sample``: once to find
its exact ink box, then again to paste it on its canvas at an integer offset. Because offsets are
integers, rendering does not depend on position, so a patch is the same wherever it goes and its
ink box moves with it exactly.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DIGIT", "MARGIN", "ink_boxes", "paste", "rendered"]

#: Side of the MNIST digits.
DIGIT = 28
#: Digits rendered per grid_sample call; bounds peak memory to some tens of MB.
RENDER_CHUNK = 16384
#: Empty pixels around a rendered digit frame, so bilinear bleed at its edges is not cut off.
MARGIN = 1


def _patch_size(ratio: np.ndarray) -> np.ndarray:
    """Patch side for each ratio: the scaled frame plus a margin on both sides."""
    return np.ceil(DIGIT * ratio).astype(np.int64) + 2 * MARGIN


def _render(digits: np.ndarray, ratio: np.ndarray, p: int) -> np.ndarray:
    """Render uint8 digits ``(m, 28, 28)`` scaled by ``ratio`` into uint8 patches ``(m, p, p)``.

    The scaled frame's top-left corner sits at ``(MARGIN, MARGIN)`` in the patch. With ratio 1
    the output pixels fall exactly on source pixel centres, so the digit is copied unchanged.
    """
    # The map is axis-aligned (a scale and a shift), so the sampling grid that affine_grid would
    # build is computed here elementwise: x_src = (x_patch - margin) / ratio in pixel units,
    # written in the normalised coordinates of align_corners=False. Unlike affine_grid's batched
    # matmul, elementwise float32 ops give bit-identical results whatever the batch, which keeps
    # the two renders of a digit (ink box, then paste) identical.
    a = (p / (DIGIT * ratio)).astype(np.float32)[:, None]
    b = ((p - 2 * MARGIN) / (DIGIT * ratio) - 1.0).astype(np.float32)[:, None]
    base = ((2 * np.arange(p, dtype=np.float32) + 1) / p - 1)[None, :]
    axis = torch.from_numpy(a * base + b)  # (m, p): same map for x (columns) and y (rows)
    m = len(ratio)
    grid = torch.stack([axis[:, None, :].expand(m, p, p), axis[:, :, None].expand(m, p, p)], dim=-1)
    src = torch.from_numpy(digits).to(torch.float32).unsqueeze(1)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.squeeze(1).round_().clamp_(0, 255).to(torch.uint8).numpy()


def rendered(
    mnist_images: np.ndarray, source: np.ndarray, ratio: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(indices, patches)`` rendering ``mnist_images[source[i]]`` at ``ratio[i]``.

    Items are grouped by patch size so that a digit's patch depends only on its own digit and
    ratio, never on what else shares its batch.
    """
    sizes = _patch_size(ratio)
    for p in np.unique(sizes):
        group = np.flatnonzero(sizes == p)
        for start in range(0, group.size, RENDER_CHUNK):
            idx = group[start : start + RENDER_CHUNK]
            yield idx, _render(mnist_images[source[idx]], ratio[idx], int(p))


def ink_boxes(mnist_images: np.ndarray, source: np.ndarray, ratio: np.ndarray) -> np.ndarray:
    """Tight ink boxes ``(x0, y0, x1, y1)`` (exclusive ends) of the rendered patches."""
    out = np.zeros((len(ratio), 4), dtype=np.int64)
    for idx, patch in rendered(mnist_images, source, ratio):
        p = patch.shape[1]
        cols, rows = patch.any(axis=1), patch.any(axis=2)
        if not cols.any(axis=1).all():
            # Cannot happen for MNIST (every digit has ink); fail loudly rather than emit a
            # digit without a box.
            raise RuntimeError("a rendered digit has no ink")
        out[idx, 0] = cols.argmax(axis=1)
        out[idx, 1] = rows.argmax(axis=1)
        out[idx, 2] = p - cols[:, ::-1].argmax(axis=1)
        out[idx, 3] = p - rows[:, ::-1].argmax(axis=1)
    return out


def paste(
    mnist_images: np.ndarray,
    source: np.ndarray,
    ratio: np.ndarray,
    local: np.ndarray,
    placed: np.ndarray,
    active: np.ndarray,
    size: int,
    overlap: bool = False,
) -> np.ndarray:
    """Render every placed digit again and write its ink onto its canvas (the per-pixel
    maximum where digits overlap)."""
    images = np.zeros((len(source), size, size), dtype=np.uint8)
    flat = images.reshape(-1)
    img, pos = np.nonzero(active)
    offset = placed[img, pos, :2] - local[img, pos, :2]  # patch origin on the canvas (x, y)
    for idx, patch in rendered(mnist_images, source[img, pos], ratio[img, pos]):
        j, r, c = np.nonzero(patch)
        # Every ink pixel lies inside its digit's box, which is on the canvas. Without overlap the
        # boxes of an image are disjoint, so writes never collide and plain assignment equals
        # the per-pixel max (and keeps the bytes of earlier versions).
        y = offset[idx[j], 1] + r
        x = offset[idx[j], 0] + c
        where = (img[idx[j]] * size + y) * size + x
        if overlap:
            np.maximum.at(flat, where, patch[j, r, c])
        else:
            flat[where] = patch[j, r, c]
    return images
