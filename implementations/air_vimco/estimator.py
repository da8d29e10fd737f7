"""VIMCO (Mnih & Rezende, 2016): a K-sample bound with per-sample leave-one-out baselines.

Registered by this folder (the core does not need it): the variant contract in action.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from implementations.core.estimators import (
    Estimator,
    EstimatorOutput,
    register_estimator,
    score_function_surrogate,
)
from implementations.core.model import AIR


def leave_one_out_signal(log_w: torch.Tensor) -> torch.Tensor:
    """(K, B) VIMCO learning signals from (K, B) log weights.

    Sample k's signal is the K-sample bound minus the bound with w_k replaced by the geometric
    mean of the other weights: how much sample k raised the bound, with no learned baseline.
    """
    k = log_w.shape[0]
    bound = torch.logsumexp(log_w, 0) - math.log(k)
    others_mean = (log_w.sum(0, keepdim=True) - log_w) / (k - 1)  # (K, B)
    # For each k: the K weights with the k-th swapped for the mean of the others,
    # swapped[k, j, b] = others_mean[k, b] if j == k else log_w[j, b] (no in-place writes, so
    # that it also runs under torch.func.vmap).
    diagonal = torch.eye(k, dtype=torch.bool, device=log_w.device).unsqueeze(-1)
    swapped = torch.where(diagonal, others_mean.unsqueeze(1), log_w.unsqueeze(0))
    loo_bound = torch.logsumexp(swapped, 1) - math.log(k)
    return bound.unsqueeze(0) - loo_bound


@register_estimator("vimco")
class VIMCO(Estimator):
    """K samples per image; reparameterised gradients for z_where/z_what, VIMCO for z_pres."""

    @dataclass
    class Params:
        samples: int = 5  # K, as SQAIR uses

    def __init__(self, model: AIR, params: Params) -> None:
        super().__init__(model, params)
        if params.samples < 2:
            raise ValueError("estimator.params.samples: VIMCO needs at least 2 samples")
        if model.cfg.presence != "bernoulli":
            raise ValueError("estimator 'vimco' needs model.presence='bernoulli'")

    def loss(self, model: AIR, x: torch.Tensor, prior_prob: float) -> EstimatorOutput:
        k, batch = self.params.samples, x.shape[0]
        trace = model(x.repeat(k, 1, 1), prior_prob)  # sample-major: row k * B + b
        log_w = trace.log_weight().view(k, batch)
        bound = torch.logsumexp(log_w, 0) - math.log(k)
        signal = leave_one_out_signal(log_w.detach())
        log_q = trace.log_q_pres.sum(0).view(k, batch)
        surrogate = score_function_surrogate(log_q, signal, torch.ones_like(log_q))
        loss = -(bound + surrogate).mean()
        logs = {"elbo": trace.elbo().mean().detach(), "iw_bound": bound.mean().detach()}
        return EstimatorOutput(loss=loss, trace=trace, logs=logs)
