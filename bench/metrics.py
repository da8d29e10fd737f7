"""Every metric of the harness, defined once.

All functions take plain numpy arrays or tensors and return plain Python numbers or arrays, so
the trainer, the API and the report compute them the same way.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def _counts_pair(pred: np.ndarray, true: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    pred, true = np.asarray(pred), np.asarray(true)
    if pred.shape != true.shape:
        raise ValueError(f"{what}: shapes differ, {pred.shape} vs {true.shape}")
    return pred, true


def count_accuracy(
    pred: np.ndarray, true: np.ndarray, key: str = "count_accuracy"
) -> dict[str, float]:
    """Overall fraction of images whose inferred count is right, and the same per true count.

    Keys: `key` and "<key>_<n>" for each true count n present (`key` names the count source:
    "count_accuracy" for posterior samples, "count_accuracy_mode" for the posterior mode).
    """
    pred, true = _counts_pair(pred, true, "count_accuracy")
    out = {key: float((pred == true).mean()) if len(true) else float("nan")}
    for n in np.unique(true):
        sel = true == n
        out[f"{key}_{int(n)}"] = float((pred[sel] == n).mean())
    return out


def in_distribution_accuracy(
    pred: np.ndarray, true: np.ndarray, train_counts: list[int] | tuple[int, ...]
) -> float:
    """Count accuracy on the images whose true count is one the model was trained on.

    NaN when no test image has such a count. Beside a generalisation figure (the accuracy on an
    unseen count) it shows whether that figure came with good counting where the model was
    trained, or was bought by shifting every count (say, over-counting 1-digit images).
    """
    pred, true = _counts_pair(pred, true, "in_distribution_accuracy")
    sel = np.isin(true, np.asarray(list(train_counts)))
    return float((pred[sel] == true[sel]).mean()) if sel.any() else float("nan")


def count_error_rates(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Fractions of images with an inferred count above ("over_count_rate") and below
    ("under_count_rate") the true count; with the accuracy they sum to one. NaN if empty."""
    pred, true = _counts_pair(pred, true, "count_error_rates")
    if len(true) == 0:
        return {"over_count_rate": float("nan"), "under_count_rate": float("nan")}
    return {
        "over_count_rate": float((pred > true).mean()),
        "under_count_rate": float((pred < true).mean()),
    }


def confusion_matrix(pred: np.ndarray, true: np.ndarray, max_count: int) -> list[list[int]]:
    """Rows: true count 0..max_count; columns: inferred count 0..max_count."""
    m = np.zeros((max_count + 1, max_count + 1), dtype=np.int64)
    np.add.at(m, (np.asarray(true), np.clip(np.asarray(pred), 0, max_count)), 1)
    return m.tolist()


def log_mean_exp(values: torch.Tensor) -> torch.Tensor:
    """log (1/K) sum_k exp(v_k) over the first axis of (K, B) values; (B,)."""
    return torch.logsumexp(values, dim=0) - math.log(values.shape[0])


def importance_weighted_bound(log_weights: torch.Tensor) -> torch.Tensor:
    """log p(x) >= log (1/K) sum_k w_k, from (K, B) log weights log p(x, z_k) - log q(z_k | x).

    The IWAE bound (Burda et al., 2016): a lower bound for every K, increasing in K, tending to
    log p(x). Our `iw_bound`.
    """
    return log_mean_exp(log_weights)


def lme_elbo_bound(elbos: torch.Tensor) -> torch.Tensor:
    """log (1/K) sum_k exp(ELBO_k) from (K, B) single-sample ELBOs with analytic KL terms.

    The "marginal log-likelihood" addtt/attend-infer-repeat-pytorch prints (its 636.8): each
    ELBO_k = log p(x | z_k) - KL(q || p), the KLs analytic at z_k's path. It is not the
    importance-weighted bound (the analytic KLs replace the sampled log-ratios) and as K grows
    it does not tend to log p(x), so it is recorded under its own name, `lme_elbo_bound`
    (tests/test_metrics_fidelity.py shows both on a tiny model).
    """
    return log_mean_exp(elbos)


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


def box_precision_recall(
    pred_boxes: list[np.ndarray], true_boxes: list[np.ndarray], threshold: float = 0.5
) -> dict[str, float]:
    """Detection precision and recall of the inferred boxes at IoU >= `threshold`.

    Per image, inferred and true boxes are paired one to one so that the number of pairs with
    IoU >= `threshold` is as large as possible (ties: the larger total IoU; Hungarian
    algorithm). Precision = pairs / inferred boxes (an extra box counts against it), recall =
    pairs / true objects (a missed or badly placed object counts against it); both pooled over
    all images. NaN when there is nothing to divide by.
    """
    pairs = n_pred = n_true = 0
    for pred, true in zip(pred_boxes, true_boxes, strict=True):
        n_pred += len(pred)
        n_true += len(true)
        if len(pred) == 0 or len(true) == 0:
            continue
        iou = box_iou(true, pred)
        hit = iou >= threshold
        # Each hit is worth more than any set of fewer hits could gain in IoU: pairs first.
        weight = np.where(hit, min(iou.shape) + 1 + iou, 0.0)
        rows, cols = linear_sum_assignment(-weight)
        pairs += int(hit[rows, cols].sum())
    return {
        "box_precision": pairs / n_pred if n_pred else float("nan"),
        "box_recall": pairs / n_true if n_true else float("nan"),
    }


def is_converged(accuracies: list[float], target: float, sustained: int) -> bool:
    """Converged: the last `sustained` evaluations all reach `target` count accuracy.

    The trainer passes the headline `count_accuracy`: counts from one posterior sample per
    image, as every reference implementation counts (not the posterior mode).
    """
    if len(accuracies) < sustained or sustained < 1:
        return False
    return all(a >= target for a in accuracies[-sustained:])


def iterations_to_target(
    iterations: list[int], accuracies: list[float], target: float
) -> int | None:
    """First evaluated iteration at which count accuracy reached `target` (None: never).

    Like `is_converged`, fed the headline (sampled) `count_accuracy`.
    """
    for it, acc in zip(iterations, accuracies, strict=True):
        if acc >= target:
            return int(it)
    return None
