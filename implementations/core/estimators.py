"""Gradient estimators: turn a model's sampled trace into a surrogate loss.

An estimator is a small `nn.Module` (it may own networks, such as NVIL's baseline) with one job:
`loss(model, x, prior_prob)` returns the scalar to minimise and a dict of floats to log. Its
parameters get their own optimiser groups through `param_groups`, so that a baseline can be
trained at its own learning rate (pyro issue 1374 was a run whose baseline silently was not).

New estimators register themselves with `@register_estimator("name")`; variant folders do this
from their own `estimator.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from implementations.core.model import AIR
from implementations.core.networks import ImageLSTM, mlp
from implementations.core.sparse_projection import FlatImages
from implementations.core.trace import Trace

ESTIMATORS: dict[str, type[Estimator]] = {}


def register_estimator(name: str):
    """Class decorator adding an estimator to the registry under `name`."""

    def wrap(cls: type[Estimator]) -> type[Estimator]:
        if name in ESTIMATORS and ESTIMATORS[name] is not cls:
            raise ValueError(
                f"estimator {name!r} is registered twice ({ESTIMATORS[name]} and {cls})"
            )
        cls.name = name
        ESTIMATORS[name] = cls
        return cls

    return wrap


@dataclass
class EstimatorOutput:
    loss: torch.Tensor  # scalar surrogate to minimise
    trace: Trace  # the trace the loss came from (for logging and metrics)
    # Scalars worth logging, as 0-d tensors: no .item() inside a loss, which would force a
    # device sync every step and cannot run under torch.func.vmap (several seeds at once).
    logs: dict[str, torch.Tensor]


class Estimator(nn.Module):
    """Base class. Subclasses set `Params` (a dataclass of their options) and `loss`."""

    name: ClassVar[str] = "?"

    @dataclass
    class Params:
        pass

    def __init__(self, model: AIR, params: Any) -> None:
        super().__init__()
        self.params = params

    @classmethod
    def parse_params(cls, raw: dict[str, Any] | None) -> Any:
        """Build `Params` from a plain dict, rejecting unknown keys with a clear message."""
        raw = dict(raw or {})
        known = {f.name for f in fields(cls.Params)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(
                f"estimator.params: unknown key(s) {unknown} for estimator {cls.name!r}; "
                f"expected some of {sorted(known)}"
            )
        return cls.Params(**raw)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimiser groups for the estimator's own parameters (none by default)."""
        own = [p for p in self.parameters() if p.requires_grad]
        return [{"params": own, "lr": lr, "name": "estimator"}] if own else []

    def loss(self, model: AIR, x: torch.Tensor, prior_prob: float) -> EstimatorOutput:
        raise NotImplementedError


def downstream_elbo(trace: Trace) -> torch.Tensor:
    """(T, B) the part of the ELBO that step t's presence can influence.

    Terms of earlier steps do not depend on z_pres_t, so they are left out of its learning
    signal (they would only add variance): l_t = log p(x|z) - sum_{t' >= t} KL_t'.
    """
    kl = trace.kl()
    later_kl = kl.flip(0).cumsum(0).flip(0)
    return trace.log_lik[None, :] - later_kl


LEARNING_SIGNALS = ("downstream_elbo", "reconstruction")


def learning_signal(trace: Trace, form: str) -> torch.Tensor:
    """(T, B) the learning signal of each step's presence, before any baseline.

    "downstream_elbo": `downstream_elbo` (the reconstruction and the KL of this step and the
    later ones; Pyro, addtt). "reconstruction": log p(x | z) alone, the same for every step, as
    akosiorek's model.py (`reinforce_imp_weight = rec_loss_per_sample`): there the KL terms are
    taken in expectation over the presences (`model.presence_kl: expected`) and get their
    gradient directly, so the score function needs only the reconstruction. With sampled KL
    weights the KL's dependence on the presences would be missing from the gradient.
    """
    if form == "downstream_elbo":
        return downstream_elbo(trace)
    if form == "reconstruction":
        return trace.log_lik[None, :].expand_as(trace.z_pres)
    raise ValueError(f"learning signal must be one of {list(LEARNING_SIGNALS)}, got {form!r}")


def score_function_surrogate(
    log_q: torch.Tensor, signal: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Surrogate whose gradient is the REINFORCE estimate E[signal * grad log q].

    `signal` is detached here, so that only `log_q` carries gradient; returns a (B,) tensor.
    """
    return (signal.detach() * log_q * mask).sum(0)


@register_estimator("nvil")
class NVIL(Estimator):
    """NVIL (Mnih & Gregor, 2014): REINFORCE for z_pres with a learned, data-dependent baseline.

    The baseline is its own LSTM over the image and the previous step's latents (all detached),
    predicting each step's learning signal (`Params.learning_signal`: the downstream ELBO, or the
    reconstruction term alone); it is fitted by squared error at its own learning rate.
    Optionally the centred signal is normalised by running estimates of its mean and sd.
    """

    @dataclass
    class Params:
        baseline_lr: float = 0.1  # learning rate of the baseline network (addtt, Pyro: 1e-1)
        baseline_hidden: int = 256  # units of the baseline LSTM
        baseline_head_hidden: int = 200  # hidden units of the MLP from LSTM state to value
        use_baseline: bool = True  # False: plain REINFORCE (for ablations)
        # NVIL's variance normalisation of the signal. Off by default, as in the Pyro and
        # PyTorch runs we reproduce: dividing by the signal's sd (~50 nats early on) shrinks the
        # presence gradient against the pathwise ones that share the LSTM.
        normalise: bool = False
        signal_decay: float = 0.9  # decay of the running mean/var used by `normalise`
        # The baseline network's output is multiplied by this before use. 1.0: addtt's PyTorch
        # AIR (the baseline regresses the per-image signal). 64/60000: Pyro's AIR example, whose
        # TraceGraph_ELBO scales every log-probability by the plate's subsample factor N/B, so
        # its baseline regresses N/B = 937.5 x the signal; Adam ignores a loss's scale, so that
        # is exactly `net(h) * B/N` here. At lr 0.1 the first Adam steps move an unscaled
        # baseline by tens of nats, a scaled one by a fraction of a nat; neither learned to
        # count faster in our measurements (docs/pyro_parity.md).
        baseline_scale: float = 1.0
        # What the baseline predicts and the score function is weighted by (`learning_signal`):
        # "downstream_elbo" (log p(x|z) minus the KL of this and later steps, per step; Pyro,
        # addtt) or "reconstruction" (log p(x|z) only, akosiorek; pair it with
        # model.presence_kl: expected, as the reference does, or the gradient is biased).
        learning_signal: str = "downstream_elbo"
        # How the KL terms enter the gradient. "analytic": closed-form KLs, differentiated
        # (lower variance). "sampled": Pyro's TraceGraph_ELBO: one-sample log p - log q of every
        # latent, the presence's only through the score function (no pathwise term), and the
        # signal of step t the sampled log-ratios of steps >= t plus log p(x | z).
        kl_estimate: str = "analytic"

        def __post_init__(self) -> None:
            if self.learning_signal not in LEARNING_SIGNALS:
                raise ValueError(
                    f"estimator.params.learning_signal must be one of {list(LEARNING_SIGNALS)}, "
                    f"got {self.learning_signal!r}"
                )
            if self.kl_estimate not in ("analytic", "sampled"):
                raise ValueError(
                    "estimator.params.kl_estimate must be 'analytic' or 'sampled', "
                    f"got {self.kl_estimate!r}"
                )
            if self.kl_estimate == "sampled" and self.learning_signal != "downstream_elbo":
                raise ValueError(
                    "estimator.params.kl_estimate 'sampled' needs learning_signal "
                    f"'downstream_elbo' (Pyro's form), got {self.learning_signal!r}"
                )

    def __init__(self, model: AIR, params: Params) -> None:
        super().__init__(model, params)
        scale = params.baseline_scale
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(
                f"estimator.params.baseline_scale: expected a positive number, got {scale!r}"
            )
        cfg = model.cfg
        self.baseline_rnn = ImageLSTM(cfg.canvas**2, model.latent_dim, params.baseline_hidden)
        self.baseline_out = mlp([params.baseline_hidden, params.baseline_head_hidden, 1])
        self.register_buffer("signal_mean", torch.zeros(()))
        self.register_buffer("signal_var", torch.ones(()))
        self.register_buffer("signal_seen", torch.zeros((), dtype=torch.bool))

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        params = list(self.baseline_rnn.parameters()) + list(self.baseline_out.parameters())
        return [{"params": params, "lr": self.params.baseline_lr, "name": "baseline"}]

    def baseline(self, x: torch.Tensor, trace: Trace) -> torch.Tensor:
        """(T, B) baseline value of each step, from the image and the previous latents."""
        batch, steps = x.shape[0], trace.z_pres.shape[0]
        prev = torch.cat([trace.z_where, trace.z_what, trace.z_pres[..., None]], dim=-1).detach()
        first = torch.cat([x.new_zeros(batch, prev.shape[-1] - 1), x.new_ones(batch, 1)], dim=1)
        images = trace.extras.get("flat_images") or FlatImages(x.reshape(batch, -1), sparse=False)
        gates = self.baseline_rnn.project(images)
        state, hidden = None, []
        for t in range(steps):
            state = self.baseline_rnn.step(gates, first if t == 0 else prev[t - 1], state)
            hidden.append(state[0])
        value = self.baseline_out(torch.stack(hidden)).squeeze(-1)  # the head: all steps at once
        return value * self.params.baseline_scale

    def loss(self, model: AIR, x: torch.Tensor, prior_prob: float) -> EstimatorOutput:
        trace = model(x, prior_prob)
        elbo = trace.elbo()
        if self.params.kl_estimate == "sampled":  # Pyro's surrogate (see Params.kl_estimate)
            sampled = trace.log_ratio_pres + trace.log_ratio_cont  # (T, B) log p - log q
            later = sampled.flip(0).cumsum(0).flip(0)
            target = (trace.log_lik[None, :] + later).detach()
            objective = trace.log_lik + trace.log_ratio_cont.sum(0)
        else:
            target = learning_signal(trace, self.params.learning_signal).detach()
            objective = elbo
        mask = trace.ran
        if self.params.use_baseline:
            value = self.baseline(x, trace)
            centred = target - value.detach()
            baseline_loss = ((target - value) ** 2 * mask).sum(0).mean()
        else:
            value = torch.zeros_like(target)
            centred, baseline_loss = target, torch.zeros((), device=x.device)
        signal = self._normalise(centred, mask) if self.params.normalise else centred
        surrogate = score_function_surrogate(trace.log_q_pres, signal, mask)
        loss = -(objective + surrogate).mean() + baseline_loss
        runs = mask.sum().clamp_min(1.0)
        signal_mean = (centred * mask).sum() / runs
        logs = {
            "elbo": elbo.mean().detach(),
            "baseline_mse": (((target - value) ** 2 * mask).sum() / runs).detach(),
            "signal_sd": (((centred - signal_mean) ** 2 * mask).sum() / runs).sqrt().detach(),
        }
        return EstimatorOutput(loss=loss, trace=trace, logs=logs)

    @torch.no_grad()
    def _update_stats(self, centred: torch.Tensor, mask: torch.Tensor) -> None:
        on = centred[mask > 0]
        if on.numel() == 0:
            return
        mean, var = on.mean(), on.var(unbiased=False)
        if not bool(self.signal_seen):
            self.signal_mean.copy_(mean)
            self.signal_var.copy_(var)
            self.signal_seen.fill_(True)
        else:
            d = self.params.signal_decay
            self.signal_mean.mul_(d).add_((1 - d) * mean)
            self.signal_var.mul_(d).add_((1 - d) * var)

    def _normalise(self, centred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._update_stats(centred, mask)
        return (centred - self.signal_mean) / self.signal_var.sqrt().clamp_min(1.0)


@register_estimator("reparam")
class Reparameterised(Estimator):
    """The plain negative ELBO, for models whose every latent is reparameterised.

    With Concrete-relaxed presence (`model.presence: concrete`) nothing is discrete, so the ELBO's
    pathwise gradient is the whole estimator: no baseline, no score function.
    """

    @dataclass
    class Params:
        pass

    def loss(self, model: AIR, x: torch.Tensor, prior_prob: float) -> EstimatorOutput:
        if model.cfg.presence != "concrete":
            raise ValueError(
                "estimator 'reparam' needs model.presence='concrete': with discrete presence "
                "the ELBO has no gradient for z_pres (use 'nvil' or 'vimco')"
            )
        trace = model(x, prior_prob)
        elbo = trace.elbo()
        return EstimatorOutput(loss=-elbo.mean(), trace=trace, logs={"elbo": elbo.mean().detach()})
