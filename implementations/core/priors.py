"""Priors of AIR: the truncated geometric prior on the number of objects and its schedules."""

from __future__ import annotations

import math
from typing import Any

import torch


def presence_prior_prob(
    iteration: int,
    kind: str,
    fixed: float,
    start: float,
    end: float,
    anneal_iters: int,
    space: str = "prob",
) -> float:
    """Success probability of the geometric presence prior at a training iteration.

    `fixed`: a constant (the PyTorch and Pyro settings, 0.01). `annealed`: interpolated in log space
    from `start` to `end` over `anneal_iters`, then held (the paper anneals from ~1 to 1e-5 over
    100k iterations: early on every step is free to be on, later extra steps get expensive).
    """
    if kind == "fixed":
        return fixed
    if kind == "annealed":
        frac = min(max(iteration / max(anneal_iters, 1), 0.0), 1.0)
        if space == "odds":
            log_odds = (1 - frac) * _logit(start) + frac * _logit(end)
            return 1.0 / (1.0 + math.exp(-log_odds))
        if space != "prob":
            raise ValueError(f"prior.anneal_space must be 'prob' or 'odds', got {space!r}")
        return math.exp((1 - frac) * math.log(start) + frac * math.log(end))
    raise ValueError(f"prior.kind must be 'fixed' or 'annealed', got {kind!r}")


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def geometric_count_log_prob(counts: torch.Tensor, prob: float, max_steps: int) -> torch.Tensor:
    """log p(n) of the truncated geometric prior that the per-step Bernoulli prior implies.

    Each step is on with probability `prob` given the previous one was on; after `max_steps` the
    sequence stops regardless, so p(n) = prob^n (1 - prob) for n < max_steps and prob^max_steps
    for n = max_steps, which sums to one.
    """
    counts = counts.to(torch.float64)
    log_on = counts * math.log(prob)
    log_stop = torch.where(
        counts < max_steps,
        torch.full_like(counts, math.log1p(-prob)),
        torch.zeros_like(counts),
    )
    return log_on + log_stop


def prior_prob_at(prior: Any, iteration: int) -> float:
    """`presence_prior_prob` for a `PriorConfig`-like object (bench.config.PriorConfig)."""
    return presence_prior_prob(
        iteration, prior.kind, prior.fixed, prior.start, prior.end, prior.anneal_iters,
        prior.anneal_space,
    )  # fmt: skip
