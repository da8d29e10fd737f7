"""Evaluation of a model on held-out multi-MNIST images: counts, ELBO, bounds, boxes.

Every key `evaluate` returns (the lines of metrics.jsonl and result.json's "final"):

Counts, from one posterior sample per image (the headline; every reference counts this way:
Pyro runs the guide, addtt samples, aakhundov rounds a Concrete sample):
  count_accuracy, count_accuracy_<n>    overall and per true count n (the convergence rule and
                                        iterations to target use `count_accuracy`)
  count_accuracy_in_distribution        on the test images whose count is a training count
  over_count_rate, under_count_rate     fractions of images counted above / below the truth
  confusion, mean_count                 rows true 0..T, columns inferred 0..T; mean count
Counts from the posterior mode (presence on iff its probability >= 0.5), for comparison:
  count_accuracy_mode, count_accuracy_mode_<n>, confusion_mode, mean_count_mode
Boxes of the sampled objects (the windows of the steps counted above):
  box_iou                               mean IoU per true object against its tight ink box
                                        (matched one to one; a missed object scores 0). A
                                        square window cannot fit a rectangle: a perfect window
                                        scores ~0.7 here
  box_iou_frame                         the same against the digit's rescaled 28x28 frame
  box_precision, box_recall             at IoU >= 0.5 against the frame boxes; an extra box
                                        lowers precision, a missed one recall
Likelihood scores, all of the discrete-presence model (bench/scoring.py), nats per image:
  elbo                                  single-sample ELBO, analytic KL terms
  iw_bound                              importance-weighted bound, K = iw_samples
  lme_elbo_bound                        log-mean-exp of K single-sample ELBOs (addtt's
                                        "log p(x) >=", another estimator: not the IW bound)
  elbo_at_0.01, iw_bound_at_0.01,       the same at presence prior 0.01, so annealed runs
  lme_elbo_bound_at_0.01                compare with fixed-0.01 runs (equal to the plain keys
                                        when the run's prior is 0.01)
  elbo_relaxed                          Concrete runs only: the relaxed training objective,
                                        which bounds no normalised model (not comparable)
  likelihood, likelihood_sd             "gaussian" with its sd, or "bernoulli" (sd None): the
                                        scale every ELBO and bound above is on
  prior_prob                            the prior the plain ELBO and bounds are scored at
  iw_samples, iw_images                 K and the number of images of the bounds
  metrics_version                       2 (1, unrecorded: mode counts, relaxed Concrete bound)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from bench import metrics
from bench.scoring import REFERENCE_PRIOR, discrete_view, rescore_at_prior
from implementations.core.model import AIR, ModelConfig

METRICS_VERSION = 2
AT_REFERENCE = f"_at_{REFERENCE_PRIOR}"  # key suffix: "elbo_at_0.01"


def to_float_images(images: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 (N, H, W) in 0..255 -> float32 in [0, 1] on `device`."""
    t = torch.as_tensor(images)
    return t.to(device=device, dtype=torch.float32) / 255.0


def _true_boxes(boxes: np.ndarray) -> list[np.ndarray]:
    """NaN-padded (N, max_count, 4) -> per image, the (count, 4) rows of its objects."""
    return [b[~np.isnan(b).any(axis=1)] for b in np.asarray(boxes)]


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
    frame_boxes: np.ndarray | None = None,
    train_counts: Sequence[int] | None = None,
) -> dict:
    """Metrics of `model` on uint8 `images` with true `counts` and pixel boxes (NaN padded).

    `boxes` are the tight ink boxes, `frame_boxes` the digits' frames (either may be None: its
    box metrics are left out); `train_counts` the counts the model was trained on (None: the
    in-distribution accuracy is left out). The keys are listed in this module's docstring.
    Per image: one mode pass and one sampled pass (counts, boxes, ELBO), plus one relaxed pass
    for Concrete models; the bounds take `iw_samples` samples on the first `iw_images` images.
    Sampling uses its own seeded stream, so evaluating never shifts the training run's random
    numbers and two evaluations of the same model give the same metrics.
    """
    if len(counts) != len(images):
        raise ValueError(f"evaluate: {len(images)} images but {len(counts)} counts")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scored = discrete_view(model)
    relaxed = scored is not model
    rescore = prior_prob != REFERENCE_PRIOR
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        mode_counts, sample_counts, pred_boxes = [], [], []
        elbos: dict[str, list[torch.Tensor]] = {"elbo": [], "elbo" + AT_REFERENCE: []}
        elbos_relaxed = []
        for start in range(0, len(images), batch_size):
            x = to_float_images(images[start : start + batch_size], device)
            mode_counts.append(scored(x, prior_prob, sample=False).counts().cpu())
            trace = scored(x, prior_prob, sample=True)
            sample_counts.append(trace.counts().cpu())
            pred_boxes += [b.numpy() for b in scored.present_boxes(trace)]
            elbos["elbo"].append(trace.elbo().cpu())
            if rescore:
                elbo_ref, _ = rescore_at_prior(trace, prior_prob, REFERENCE_PRIOR)
                elbos["elbo" + AT_REFERENCE].append(elbo_ref.cpu())
            if relaxed:
                elbos_relaxed.append(model(x, prior_prob, sample=True).elbo().cpu())
        out: dict = {"metrics_version": METRICS_VERSION, "prior_prob": prior_prob}
        sampled, mode = torch.cat(sample_counts).numpy(), torch.cat(mode_counts).numpy()
        out.update(_count_metrics(sampled, mode, np.asarray(counts), model.cfg, train_counts))
        if boxes is not None:
            out["box_iou"] = metrics.matched_iou(pred_boxes, _true_boxes(boxes))
        if frame_boxes is not None:
            frames = _true_boxes(frame_boxes)
            out["box_iou_frame"] = metrics.matched_iou(pred_boxes, frames)
            out.update(metrics.box_precision_recall(pred_boxes, frames))
        out["elbo"] = float(torch.cat(elbos["elbo"]).mean())
        ref_key = "elbo" + AT_REFERENCE
        out[ref_key] = float(torch.cat(elbos[ref_key]).mean()) if rescore else out["elbo"]
        if relaxed:
            out["elbo_relaxed"] = float(torch.cat(elbos_relaxed).mean())
        gaussian = model.cfg.likelihood == "gaussian"
        out["likelihood"] = model.cfg.likelihood
        out["likelihood_sd"] = model.cfg.likelihood_sd if gaussian else None
        if iw_samples > 0:
            n = len(images) if iw_images is None else min(iw_images, len(images))
            out.update(bounds(scored, images[:n], prior_prob, iw_samples, batch_size))
    model.train(was_training)
    return out


def _count_metrics(
    sampled: np.ndarray,
    mode: np.ndarray,
    true: np.ndarray,
    cfg: ModelConfig,
    train_counts: Sequence[int] | None,
) -> dict:
    out: dict = metrics.count_accuracy(sampled, true)
    out.update(metrics.count_accuracy(mode, true, key="count_accuracy_mode"))
    if train_counts is not None:
        out["count_accuracy_in_distribution"] = metrics.in_distribution_accuracy(
            sampled, true, train_counts
        )
    out.update(metrics.count_error_rates(sampled, true))
    out["confusion"] = metrics.confusion_matrix(sampled, true, cfg.max_steps)
    out["confusion_mode"] = metrics.confusion_matrix(mode, true, cfg.max_steps)
    out["mean_count"] = float(sampled.mean())
    out["mean_count_mode"] = float(mode.mean())
    return out


@torch.no_grad()
def bounds(
    model: AIR, images: np.ndarray, prior_prob: float, k: int, batch_size: int = 500
) -> dict[str, float | int]:
    """Mean bounds (nats per image) from `k` samples per image of a Bernoulli-presence model.

    One set of samples gives both estimators: `iw_bound` (log-mean-exp of the importance
    weights) and `lme_elbo_bound` (log-mean-exp of single-sample ELBOs), each also at the
    reference prior (rescored, not resampled). Pass `discrete_view(model)` for Concrete models.
    """
    if k < 1:
        raise ValueError(f"bounds: need at least one sample per image, got k={k}")
    if model.cfg.presence != "bernoulli":
        raise ValueError("bounds: a relaxed model bounds nothing; pass discrete_view(model)")
    device = next(model.parameters()).device
    per_batch = max(1, batch_size // k)  # each forward pass holds images x k samples
    rescore = prior_prob != REFERENCE_PRIOR
    found: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(images), per_batch):
        x = to_float_images(images[start : start + per_batch], device)
        trace = model(x.repeat(k, 1, 1), prior_prob, sample=True)  # (k * n, ...), sample-major
        terms = {"": (trace.elbo(), trace.log_weight())}
        if rescore:
            terms[AT_REFERENCE] = rescore_at_prior(trace, prior_prob, REFERENCE_PRIOR)
        for suffix, (elbo, log_w) in terms.items():
            found.setdefault("iw_bound" + suffix, []).append(
                metrics.importance_weighted_bound(log_w.view(k, -1)).cpu()
            )
            found.setdefault("lme_elbo_bound" + suffix, []).append(
                metrics.lme_elbo_bound(elbo.view(k, -1)).cpu()
            )
    out: dict[str, float | int] = {key: float(torch.cat(v).mean()) for key, v in found.items()}
    if not rescore:
        out["iw_bound" + AT_REFERENCE] = out["iw_bound"]
        out["lme_elbo_bound" + AT_REFERENCE] = out["lme_elbo_bound"]
    out["iw_samples"] = k
    out["iw_images"] = len(images)
    return out
