"""Every metric of the harness, defined once.

All functions take plain numpy arrays or tensors and return plain Python numbers or arrays, so
the trainer, the API and the report compute them the same way.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def count_accuracy(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Overall fraction of images whose inferred count is right, and the same per true count.

    Keys: "count_accuracy" and "count_accuracy_<n>" for each true count n present.
    """
    pred, true = np.asarray(pred), np.asarray(true)
    if pred.shape != true.shape:
        raise ValueError(f"count_accuracy: shapes differ, {pred.shape} vs {true.shape}")
    out = {"count_accuracy": float((pred == true).mean()) if len(true) else float("nan")}
    for n in np.unique(true):
        sel = true == n
        out[f"count_accuracy_{int(n)}"] = float((pred[sel] == n).mean())
    return out


def confusion_matrix(pred: np.ndarray, true: np.ndarray, max_count: int) -> list[list[int]]:
    """Rows: true count 0..max_count; columns: inferred count 0..max_count."""
    m = np.zeros((max_count + 1, max_count + 1), dtype=np.int64)
    np.add.at(m, (np.asarray(true), np.clip(np.asarray(pred), 0, max_count)), 1)
    return m.tolist()


def importance_weighted_bound(log_weights: torch.Tensor) -> torch.Tensor:
    """log p(x) >= log (1/K) sum_k w_k, from (K, B) log weights log p(x, z_k) - log q(z_k | x)."""
    k = log_weights.shape[0]
    return torch.logsumexp(log_weights, dim=0) - math.log(k)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes (N, 4) and (M, 4), each (x0, y0, x1, y1); returns (N, M)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def matched_iou(pred_boxes: list[np.ndarray], true_boxes: list[np.ndarray]) -> float:
    """Mean IoU over all true objects after matching each image's boxes one to one.

    Per image, inferred and true boxes are paired to maximise total IoU (Hungarian algorithm);
    a true object left unpaired (the model under-counted) scores 0, so the metric punishes both
    poor localisation and missing objects. Returns NaN when there are no true objects at all.
    """
    scores: list[float] = []
    for pred, true in zip(pred_boxes, true_boxes, strict=True):
        if len(true) == 0:
            continue
        if len(pred) == 0:
            scores.extend([0.0] * len(true))
            continue
        iou = box_iou(true, pred)
        rows, cols = linear_sum_assignment(-iou)
        matched = np.zeros(len(true))
        matched[rows] = iou[rows, cols]
        scores.extend(matched.tolist())
    return float(np.mean(scores)) if scores else float("nan")


def is_converged(accuracies: list[float], target: float, sustained: int) -> bool:
    """Converged: the last `sustained` evaluations all reach `target` count accuracy."""
    if len(accuracies) < sustained or sustained < 1:
        return False
    return all(a >= target for a in accuracies[-sustained:])


def iterations_to_target(
    iterations: list[int], accuracies: list[float], target: float
) -> int | None:
    """First evaluated iteration at which count accuracy reached `target` (None: never)."""
    for it, acc in zip(iterations, accuracies, strict=True):
        if acc >= target:
            return int(it)
    return None
