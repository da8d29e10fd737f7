"""What one forward pass of the AIR model takes and gives: its standard noise (`Noise`) and
everything it sampled, with the ELBO kept per step (`Trace`), from which estimators build their
per-step learning signals."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Noise:
    """Standard noise for one forward pass; shapes (T, B), (T, B, 3), (T, B, D)."""

    pres: torch.Tensor  # uniform: Bernoulli draws (u < p) or Concrete's logistic noise
    where: torch.Tensor  # standard normal, reparameterises z_where
    what: torch.Tensor  # standard normal, reparameterises z_what


@dataclass
class Trace:
    """Everything one forward pass sampled, with the ELBO kept per step.

    Shapes: T = max_steps, B = batch. Per-step terms are already masked: a step that did not run
    (an earlier `z_pres` was 0) contributes zero, except to the KL terms under
    `presence_kl: expected`, which weight every step by q's probabilities instead.
    """

    z_pres: torch.Tensor  # (T, B) sampled presence (0/1, or relaxed in (0, 1))
    pres_prob: torch.Tensor  # (T, B) q's probability that step t is on, given it runs
    ran: torch.Tensor  # (T, B) 1 where step t ran (all earlier steps were on)
    z_where: torch.Tensor  # (T, B, 3)
    z_what: torch.Tensor  # (T, B, D)
    log_q_pres: torch.Tensor  # (T, B) log q of the sampled presence (score-function term)
    kl_pres: torch.Tensor  # (T, B) presence KL: analytic (Bernoulli) or sampled (Concrete)
    log_ratio_pres: torch.Tensor  # (T, B) sampled log p - log q of the presence
    kl_where: torch.Tensor  # (T, B) analytic KL of z_where, weighted as `presence_kl` says
    kl_what: torch.Tensor  # (T, B) analytic KL of z_what, weighted as `presence_kl` says
    log_ratio_cont: torch.Tensor  # (T, B) sampled log p - log q of z_where and z_what
    log_lik: torch.Tensor  # (B,) log p(x | z)
    canvas: torch.Tensor  # (B, H, W) reconstruction
    extras: dict = field(default_factory=dict)  # variant-specific tensors
    # (T, B) relaxed presence with `concrete_gate: after` only: 1 where the step's object is
    # drawn (the stop sum after its update is still below `concrete_stop`); None otherwise.
    kept: torch.Tensor | None = None

    def kl(self) -> torch.Tensor:
        """(T, B) KL contribution of each step."""
        return self.kl_pres + self.kl_where + self.kl_what

    def elbo(self) -> torch.Tensor:
        """(B,) single-sample ELBO in nats per image."""
        return self.log_lik - self.kl().sum(0)

    def log_weight(self) -> torch.Tensor:
        """(B,) importance weight log p(x, z) - log q(z | x) with every latent sampled."""
        return self.log_lik + self.log_ratio_pres.sum(0) + self.log_ratio_cont.sum(0)

    def on_mask(self) -> torch.Tensor:
        """(T, B) bool: the steps counted as objects, always a prefix of the steps.

        Relaxed presence rounded at 0.5; with `concrete_gate: after`, the steps that are drawn
        (aakhundov counts a step when the stop sum after it is below the threshold).
        """
        if self.kept is not None:
            return self.kept > 0
        return (self.z_pres >= 0.5).long().cumprod(0).bool()

    def counts(self) -> torch.Tensor:
        """(B,) number of steps that were on (see `on_mask`)."""
        return self.on_mask().long().sum(0)
