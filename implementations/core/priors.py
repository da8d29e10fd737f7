"""Priors of AIR: the truncated geometric prior on the number of objects and its schedules.

Two forms of the prior on the number of objects n (`ModelConfig.presence_prior`): a Bernoulli(s)
prior on every step that runs (`geometric_count_log_prob`: Pyro, addtt), and a prior on the count
itself, p(n) = s^n (1 - s) (`count_prior_log_prob`: akosiorek/attend_infer_repeat, prior.py).
"""

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


def count_prior_log_prob(
    counts: torch.Tensor, prob: float, max_steps: int, normalised: bool = False
) -> torch.Tensor:
    """log p(n) of the count prior p(n) = s^n (1 - s), n = 0..max_steps (akosiorek's AIR).

    That is the geometric distribution of the number of successes before the first failure,
    cut at `max_steps` *without* moving the tail mass onto the last count: every count, the last
    one included, costs log s more than the one before it (at s near 1 the prior is flat, where
    `geometric_count_log_prob` gives the last count a bonus of log(1 / (1 - s)), 4.6 nats at
    s = 0.99). akosiorek's prior.py (`geometric_prior`) does not renormalise the truncated table
    either: its mass is 1 - s^(max_steps + 1). `normalised=True` divides by that mass.
    """
    counts = counts.to(torch.float64)
    log_p = counts * math.log(prob) + math.log1p(-prob)
    if normalised:
        log_p = log_p - _log1mexp((max_steps + 1) * math.log(prob))
    return log_p


def count_prior_step_log_probs(
    prob: float | torch.Tensor, max_steps: int, normalised: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The count prior `count_prior_log_prob` as per-step conditionals, for the step loop.

    Returns (log pi_t, log (1 - pi_t), log_offset) with shapes (T,), (T,), () in float64, where
    pi_t = p(n > t | n >= t) is the prior probability that step t (0-based) is on given that it
    runs: pi_t = s (1 - s^(T - t)) / (1 - s^(T + 1 - t)); 1 - pi_t = (1 - s) / (1 - s^(T + 1 - t)).
    A sequence of on-steps then an off-step (or T on-steps) has prior probability p(n) / mass,
    and `log_offset` is log(mass) when the prior is not normalised (akosiorek's), 0 otherwise:
    adding it once per sequence gives log(s^n (1 - s)) exactly. The last step's pi is s / (1 + s),
    about 1/2 at s near 1: stopping at T - 1 and going on to T cost the same.

    `prob` may be a 0-d tensor (the compiled loss passes one): then the result is on its device.
    """
    device = prob.device if isinstance(prob, torch.Tensor) else None
    s = torch.as_tensor(prob, dtype=torch.float64, device=device)
    log_s, log_stop = s.log(), torch.log1p(-s)
    remaining = torch.arange(max_steps, 0, -1, dtype=torch.float64, device=device)  # T - t
    tail_here = _log1mexp_tensor((remaining + 1) * log_s)  # log(1 - s^(T + 1 - t))
    tail_next = _log1mexp_tensor(remaining * log_s)  # log(1 - s^(T - t))
    log_on = log_s + tail_next - tail_here
    log_off = log_stop - tail_here
    log_mass = _log1mexp_tensor((max_steps + 1) * log_s)
    offset = torch.zeros_like(log_mass) if normalised else log_mass
    return log_on, log_off, offset


def _log1mexp(a: float) -> float:
    """log(1 - exp(a)) for a < 0, accurate near 0 (s near 1) and for very negative a."""
    return math.log(-math.expm1(a))


def _log1mexp_tensor(a: torch.Tensor) -> torch.Tensor:
    return torch.log(-torch.expm1(a))


def prior_prob_at(prior: Any, iteration: int) -> float:
    """`presence_prior_prob` for a `PriorConfig`-like object (bench.config.PriorConfig)."""
    return presence_prior_prob(
        iteration, prior.kind, prior.fixed, prior.start, prior.end, prior.anneal_iters,
        prior.anneal_space,
    )  # fmt: skip
