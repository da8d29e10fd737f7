"""How evaluation scores a model: as a discrete-presence AIR, at any presence prior.

Every evaluation metric (counts, boxes, ELBO, bounds) scores the *discrete* model: z_pres is
0/1, drawn as Bernoulli(sigmoid(logit)) from the inference network, and the presence terms are
Bernoulli densities under the truncated geometric prior. For NVIL/VIMCO runs that is the model
they train. A Concrete run trains a relaxed surrogate (relaxed presence scales the canvas and
the z_where/z_what log-ratios, Concrete densities score the presence); that surrogate is no
normalised model of x, so its ELBO and "IW bound" bound nothing. Scored as a discrete model with
the same networks it gets a true importance-weighted bound, and its counts are what
aakhundov's Concrete AIR reports at test time (it rounds the Concrete sample, which is a
Bernoulli(sigmoid(logit)) draw, and runs the remaining steps on the rounded value).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch

from implementations.core.model import AIR, Trace

#: The presence prior every run is also scored at, so that annealed runs (scored at their
#: current prior, 1e-5 at the end of `air_nvil_annealed`) stand beside the fixed-prior runs
#: (0.01, the PyTorch and Pyro AIR setting): keys "<metric>_at_0.01".
REFERENCE_PRIOR = 0.01


def discrete_view(model: AIR) -> AIR:
    """`model` itself if its presence is Bernoulli, else the same networks scored as a
    discrete-presence AIR (hard z_pres, Bernoulli presence densities).

    The view is a shallow copy: it shares every parameter and submodule with `model` and
    differs only in its config's `presence`, which the forward pass reads at call time.
    """
    if model.cfg.presence == "bernoulli":
        return model
    view = copy.copy(model)
    view.cfg = dataclasses.replace(model.cfg, presence="bernoulli")
    return view


def _log_prior_pair(prob: float) -> tuple[float, float]:
    if not 0 < prob < 1:
        raise ValueError(f"presence prior must be a probability in (0, 1), got {prob!r}")
    return math.log(prob), math.log1p(-prob)


def rescore_at_prior(
    trace: Trace, prior_prob: float, new_prior_prob: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ELBO, log weight), each (B,), of a Bernoulli-presence `trace` scored at another prior.

    The prior enters only the presence terms, and the inference network does not see it, so the
    same latents are rescored exactly (no second forward pass): with pi the old and pi' the new
    prior, each step that ran changes its analytic presence KL by
    -(p log(pi'/pi) + (1 - p) log((1 - pi')/(1 - pi))) and its sampled log-ratio by
    z log(pi'/pi) + (1 - z) log((1 - pi')/(1 - pi)).
    """
    if not ((trace.z_pres == 0) | (trace.z_pres == 1)).all():
        raise ValueError("rescore_at_prior needs hard (0/1) presence; score a discrete_view")
    on_old, off_old = _log_prior_pair(prior_prob)
    on_new, off_new = _log_prior_pair(new_prior_prob)
    d_on, d_off = on_new - on_old, off_new - off_old
    p, z, ran = trace.pres_prob, trace.z_pres, trace.ran
    d_kl = -(p * d_on + (1 - p) * d_off) * ran
    d_log_ratio = (z * d_on + (1 - z) * d_off) * ran
    return trace.elbo() - d_kl.sum(0), trace.log_weight() + d_log_ratio.sum(0)
