"""The AIR model's settings: `ModelConfig` (every field documented where it is defined, which is
what `--config-help` prints) and the check of its choices."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    """Architecture and generative-model settings (defaults: the PyTorch/Pyro AIR settings)."""

    canvas: int = 50  # side of the square input images, in pixels
    window: int = 28  # side of the glimpse read by the encoder and of the decoded object
    max_steps: int = 3  # at most this many objects per image
    lstm_hidden: int = 256  # units of the inference LSTM
    z_what_dim: int = 50  # appearance code size
    encoder_hidden: int = 200  # hidden units of the glimpse encoder (z_what posterior)
    decoder_hidden: int = 200  # hidden units of the object decoder
    predict_hidden: int = 200  # hidden units of the LSTM -> (z_pres, z_where) head
    decoder_bias: float = -2.0  # output bias before the sigmoid: objects start mostly empty
    likelihood: str = "gaussian"  # "gaussian" or "bernoulli"
    likelihood_sd: float = 0.3  # sd of the Gaussian likelihood
    where_prior_loc: list[float] = field(default_factory=lambda: [3.0, 0.0, 0.0])
    where_prior_scale: list[float] = field(default_factory=lambda: [0.2, 1.0, 1.0])
    where_scale_init: float = 0.1  # initial posterior sd of z_where (keeps early zooms sane)
    # True: Pyro's form (examples/air/air.py, guide_step): sd = softplus(out) * prior sd, the
    # head's bias left at nn.Linear's init, so the sd starts near 0.69 x (0.2, 1, 1);
    # `where_scale_init` is then unused. False: sd = softplus(out), starting at where_scale_init.
    where_scale_relative: bool = False
    dair: bool = False  # DAIR: the encoder sees the image minus the canvas drawn so far
    sparse_images: bool | None = None  # sparse image projection; None: on CPU, not on GPUs
    presence: str = "bernoulli"  # "bernoulli" (discrete z_pres) or "concrete" (relaxed)
    concrete_temperature: float = 1.0  # temperature of the Concrete relaxation
    concrete_stop: float = 0.99  # relaxed: stop once the running sum of (1 - z_pres) reaches it
    # Relaxed: which stop sum decides whether a step's object is drawn and its window and
    # appearance are scored. "before": the sum before this step's (1 - z_pres) is added, so the
    # step that crosses `concrete_stop` is still drawn (this harness's original rule); "after":
    # the sum after it, so that step is not drawn and its KL not counted (aakhundov's
    # air_model.py, where the canvas and the where/what KL are gated on the updated stop sum).
    # The presence KL is always counted for every step that ran (both rules, and aakhundov's).
    concrete_gate: str = "before"
    # Relaxed: True multiplies the window and appearance KL of each step by its relaxed z_pres
    # (the original rule); False counts it unscaled wherever the gate is on (aakhundov).
    concrete_scale_kl: bool = True
    # Prior on the number of objects n, from the success probability s (prior.* in the run
    # config). "per_step": a Bernoulli(s) prior on each step that runs, i.e. a geometric cut at
    # max_steps whose last count takes the whole tail, p(max_steps) = s^max_steps (Pyro, addtt);
    # "count": p(n) = s^n (1 - s) for n = 0..max_steps (akosiorek's prior.py), under which the
    # last step costs log s like every other one instead of gaining log(s / (1 - s)).
    presence_prior: str = "per_step"
    # "count" prior only: False keeps akosiorek's truncated table as it is (its mass is
    # 1 - s^(max_steps + 1): the KL gains the constant -log of it, 14.7 nats at s = 1 - 1e-7,
    # 0.06 at s = 0.5, 1e-4 at s = 0.1; no gradient changes); True divides by that mass.
    count_prior_normalised: bool = False
    # Bernoulli presence: how the KL terms are weighted. "sampled": the presence KL of each step
    # that ran and the window/appearance KL of each step that is on, for the sampled presences
    # (Pyro, addtt); "expected": each step's presence KL by q's probability of reaching the step
    # and its window/appearance KL by q's probability that it is on (q(n > t)), which makes the
    # presence KL exactly KL(q(n) || p(n)) over counts and differentiable in the presence
    # probabilities (akosiorek's model.py, `analytic=True`). The sampled log-ratios of the
    # importance weight are the same either way.
    presence_kl: str = "sampled"


_CHOICES = {
    "concrete_gate": ("before", "after"),
    "presence_prior": ("per_step", "count"),
    "presence_kl": ("sampled", "expected"),
}


def check_model_config(cfg: ModelConfig) -> None:
    """ValueError naming the field for a bad choice or an unsupported combination."""
    if cfg.likelihood not in ("gaussian", "bernoulli"):
        raise ValueError(
            f"model.likelihood must be 'gaussian' or 'bernoulli', got {cfg.likelihood!r}"
        )
    if cfg.presence not in ("bernoulli", "concrete"):
        raise ValueError(f"model.presence must be 'bernoulli' or 'concrete', got {cfg.presence!r}")
    for name, choices in _CHOICES.items():
        value = getattr(cfg, name)
        if value not in choices:
            raise ValueError(f"model.{name} must be one of {list(choices)}, got {value!r}")
    if cfg.presence_kl == "expected" and cfg.presence != "bernoulli":
        raise ValueError(
            "model.presence_kl 'expected' needs model.presence 'bernoulli' (the Concrete "
            "relaxation has no closed-form presence KL to take in expectation)"
        )
