"""Evaluation of a model on held-out multi-MNIST images: counts, ELBO, IW bound, boxes."""

from __future__ import annotations

import numpy as np
import torch

from bench import metrics
from implementations.core.model import AIR


def to_float_images(images: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 (N, H, W) in 0..255 -> float32 in [0, 1] on `device`."""
    t = torch.as_tensor(images)
    return t.to(device=device, dtype=torch.float32) / 255.0


@torch.no_grad()
def evaluate(
    model: AIR,
    images: np.ndarray,
    counts: np.ndarray,
    boxes: np.ndarray | None,
    prior_prob: float,
    iw_samples: int = 0,
    iw_images: int | None = None,
    batch_size: int = 500,
    seed: int = 0,
) -> dict:
    """Metrics of `model` on uint8 `images` with true `counts` and pixel `boxes` (NaN padded).

    Counts and boxes come from the inference network's modes (presence on iff p >= 0.5), the ELBO
    from one sample per image, the IW bound from `iw_samples` samples per image on the first
    `iw_images` images. Sampling uses its own seeded stream, so evaluating never shifts the
    training run's random numbers and two evaluations of the same model agree.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        pred_counts, pred_boxes, elbos = [], [], []
        for start in range(0, len(images), batch_size):
            x = to_float_images(images[start : start + batch_size], device)
            mode = model(x, prior_prob, sample=False)
            pred_counts.append(mode.counts().cpu())
            pred_boxes += [b.numpy() for b in model.present_boxes(mode)]
            elbos.append(model(x, prior_prob, sample=True).elbo().cpu())
        pred = torch.cat(pred_counts).numpy()
        out: dict = metrics.count_accuracy(pred, counts)
        out["elbo"] = float(torch.cat(elbos).mean())
        out["confusion"] = metrics.confusion_matrix(pred, counts, model.cfg.max_steps)
        out["mean_count"] = float(pred.mean())
        if boxes is not None:
            true_boxes = [b[~np.isnan(b).any(axis=1)] for b in boxes]
            out["box_iou"] = metrics.matched_iou(pred_boxes, true_boxes)
        if iw_samples > 0:
            n = len(images) if iw_images is None else min(iw_images, len(images))
            out["iw_bound"] = iw_bound(model, images[:n], prior_prob, iw_samples, batch_size)
            out["iw_samples"] = iw_samples
    model.train(was_training)
    return out


@torch.no_grad()
def iw_bound(
    model: AIR, images: np.ndarray, prior_prob: float, k: int, batch_size: int = 500
) -> float:
    """Mean importance-weighted bound (nats per image) with `k` samples per image."""
    device = next(model.parameters()).device
    per_batch = max(1, batch_size // k)  # each forward pass holds images x k samples
    bounds = []
    for start in range(0, len(images), per_batch):
        x = to_float_images(images[start : start + per_batch], device)
        repeated = x.repeat(k, 1, 1)  # (k * n, H, W), sample-major
        log_w = model(repeated, prior_prob, sample=True).log_weight().view(k, x.shape[0])
        bounds.append(metrics.importance_weighted_bound(log_w).cpu())
    return float(torch.cat(bounds).mean())
