"""Inputs of the latent probe: a frozen model's latents, or the ground truth's.

`air_latents`: for each inference step t = 1..T, in inference order, [z_pres, z_where (3),
z_what (D)] from the posterior's modes (`sample=False`: presence on iff q's probability
>= 0.5, z_where and z_what their means). A step that is off (or never ran) is all zeros, so
the probe sees only the objects the model says are there. Shape (N, T * (D + 4)).

`truth_latents`: the same layout built from the data set's ground truth, one slot per digit
in the generator's slot order: [present, x centre, y centre, size (as fractions of the
canvas), one-hot label (10)]. A probe on these must learn both tasks almost perfectly; the tests
check that it does, so a low score on a model's latents means a poor representation, not a
broken probe.
"""

from __future__ import annotations

import numpy as np
import torch

from bench.data.registry import ObjectImages

DIGIT_CLASSES = 10


@torch.no_grad()
def air_latents(
    model: torch.nn.Module,
    images: np.ndarray,
    prior_prob: float,
    batch_size: int = 500,
) -> np.ndarray:
    """(N, T * (D + 4)) float32 latents of uint8 (N, H, W) images under a frozen AIR model."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(images), batch_size):
            x = torch.as_tensor(images[start : start + batch_size], device=device)
            x = x.float() / 255.0
            trace = model(x, prior_prob, sample=False)
            on = trace.on_mask().to(x.dtype)[..., None]  # (T, B, 1)
            steps = torch.cat([on, trace.z_where * on, trace.z_what * on], dim=2)  # (T, B, F)
            out.append(steps.permute(1, 0, 2).reshape(x.shape[0], -1).cpu())
    finally:
        model.train(was_training)
    features = torch.cat(out).numpy().astype(np.float32)
    if not np.isfinite(features).all():
        raise ValueError("the model's latents are not finite (a diverged model?)")
    return features


def truth_latents(data: ObjectImages, canvas: int) -> np.ndarray:
    """(N, K * 14) float32 ground-truth latents of a data set (see the module docstring)."""
    labels = np.asarray(data.labels)
    boxes = np.asarray(data.boxes, dtype=np.float64)
    present = labels >= 0
    safe = np.where(present[..., None], boxes, 0.0)
    centre_x = (safe[..., 0] + safe[..., 2]) / 2 / canvas
    centre_y = (safe[..., 1] + safe[..., 3]) / 2 / canvas
    size = np.maximum(safe[..., 2] - safe[..., 0], safe[..., 3] - safe[..., 1]) / canvas
    onehot = np.eye(DIGIT_CLASSES)[np.where(present, labels, 0)] * present[..., None]
    slots = np.concatenate(
        [present[..., None], centre_x[..., None], centre_y[..., None], size[..., None], onehot],
        axis=2,
    )
    return slots.reshape(len(labels), -1).astype(np.float32)
