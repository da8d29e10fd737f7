"""Fidelity to the reference implementations that two variants reproduce.

- air_concrete / dair_concrete follow aakhundov/tf-attend-infer-repeat (air/air_model.py): a step
  is drawn, and its where/what KL counted (unscaled), only if the stop sum *after* its own update
  is below the threshold; its z_pres KL counts whenever it ran (the stop sum before the update).
- air_nvil_annealed follows akosiorek/attend_infer_repeat: a prior on the count,
  p(n) = s^n (1 - s) for n = 0..T, not renormalised after the truncation (prior.py,
  `geometric_prior`); the KL taken in expectation over the presences (model.py, `analytic=True`:
  KL(q(n) || p(n)) over counts, where/what KL weighted by q(n > t)); the score function weighted
  by the reconstruction term alone (model.py, `reinforce_imp_weight = rec_loss_per_sample`);
  s annealed from 1 - 1e-7 (experiment.ipynb).

Each test computes what the reference computes, its own way, and compares.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from bench.config import ConfigError, load_config
from bench.variants import discover
from implementations.core.estimators import NVIL, downstream_elbo, learning_signal
from implementations.core.model import AIR, ModelConfig, Noise
from implementations.core.priors import (
    count_prior_log_prob,
    count_prior_step_log_probs,
    geometric_count_log_prob,
    presence_prior_prob,
)

SMALL = dict(lstm_hidden=32, predict_hidden=16, encoder_hidden=32, decoder_hidden=32, z_what_dim=8)
STOP = 0.99


def _images(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(batch, 50, 50)
    for b in range(batch):
        r, c = torch.randint(0, 30, (2,), generator=g).tolist()
        x[b, r : r + 18, c : c + 14] = torch.rand(18, 14, generator=g)
    return x


def _noise(model: AIR, pres: torch.Tensor, seed: int = 1) -> Noise:
    """Gaussian noise from `seed`, presence noise as given ((T, B) uniforms)."""
    torch.manual_seed(seed)
    noise = model.draw_noise(pres.shape[1], pres.device, pres.dtype)
    noise.pres = pres
    return noise


# ---------------------------------------------------------------------------- Concrete gating
# Presence uniforms (T, B). With the presence logit held at 0 a relaxed sample is exactly u, so
# the stop sums are known: column 0 crosses 0.99 at step 2 (sums 0.4, 0.8, 1.2) with z = 0.6,
# column 1 never stops, column 2 stops at step 0, column 3 crosses at step 1 (0.8, 1.1) with
# z = 0.7, column 4 crosses at step 1 (0.45, 1.0) with z = 0.55.
U = torch.tensor(
    [[0.6, 0.3, 0.005, 0.2, 0.45], [0.6, 0.9, 0.5, 0.7, 0.55], [0.6, 0.9, 0.5, 0.9, 0.5]]
)


def _concrete(**opts: object) -> AIR:
    torch.manual_seed(0)
    model = AIR(ModelConfig(presence="concrete", likelihood="bernoulli", **opts, **SMALL))
    with torch.no_grad():  # presence logit 0 whatever the input: z_pres = u
        model.predict[-1].weight[0].zero_()
        model.predict[-1].bias[0] = 0.0
    return model


def _reference_gates(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """aakhundov's while-loop bookkeeping: (ran, drawn) per step from the relaxed samples.

    `ran`: the stop sum before the update is below the threshold (z_pres KL counted);
    `drawn`: the stop sum after `stopping_sum += 1 - z_pres` is (canvas, where/what KL).
    """
    before = torch.zeros(u.shape[1])
    ran, drawn = [], []
    for t in range(u.shape[0]):
        ran.append(before < STOP)
        after = before + (1 - u[t])
        drawn.append(after < STOP)
        before = after
    return torch.stack(ran).float(), torch.stack(drawn).float()


def _objects(model: AIR, trace) -> torch.Tensor:  # noqa: ANN001
    steps, batch = trace.z_pres.shape
    flat = model._draw(trace.z_what.flatten(0, 1), trace.z_where.flatten(0, 1))
    return flat.view(steps, batch, 50, 50)


def _raw_kls(model: AIR, x: torch.Tensor, noise: Noise):  # noqa: ANN202
    """Run the model; also return each step's unweighted where and what KL (T, B), computed with
    torch.distributions from the posterior parameters the heads produced (forward hooks)."""
    heads, encodings = [], []
    hooks = [model.predict.register_forward_hook(lambda m, i, o: heads.append(o)),
             model.encoder.register_forward_hook(lambda m, i, o: encodings.append(o))]  # fmt: skip
    try:
        trace = model(x, 0.3, noise=noise)
    finally:
        for h in hooks:
            h.remove()
    d = model.cfg.z_what_dim
    where_prior = Normal(model.where_prior_loc, model.where_prior_scale)
    kl_where = [kl_divergence(Normal(o[:, 1:4], F.softplus(o[:, 4:7])), where_prior).sum(-1)
                for o in heads]  # fmt: skip
    kl_what = [kl_divergence(Normal(e[:, :d], F.softplus(e[:, d:])), Normal(0.0, 1.0)).sum(-1)
               for e in encodings]  # fmt: skip
    return trace, torch.stack(kl_where), torch.stack(kl_what)


def test_concrete_gate_after_follows_aakhundov() -> None:
    """Canvas, where/what KL and counts gated on the stop sum after the update; KL unscaled."""
    x = _images(U.shape[1])
    gated = _concrete(concrete_gate="after", concrete_scale_kl=False)
    trace, kl_where, kl_what = _raw_kls(gated, x, _noise(gated, U))
    ran, drawn = _reference_gates(U)
    z = U * ran  # the model zeroes z_pres after the stop; where the gates are on they agree
    torch.testing.assert_close(trace.z_pres, z)
    torch.testing.assert_close(trace.ran, ran)
    torch.testing.assert_close(trace.kept, drawn)
    crossing = (ran > 0) & (drawn == 0) & (U >= 0.5)
    assert crossing.sum() == 3, "the fixture must have steps that cross with z_pres >= 0.5"

    # The canvas: running_recon += where(stop_sum_after < threshold, z_pres * window, 0).
    expected = (torch.where(drawn > 0, U, 0.0)[..., None, None] * _objects(gated, trace)).sum(0)
    torch.testing.assert_close(trace.canvas, expected, atol=1e-5, rtol=1e-5)

    # Where/what KL: unscaled (not multiplied by z_pres), on the after-update gate.
    torch.testing.assert_close(trace.kl_where, kl_where * drawn)
    torch.testing.assert_close(trace.kl_what, kl_what * drawn)
    # The importance weight's sampled log-ratio follows the same gate. The same model with the
    # before-update gate gives each step's raw terms wherever it ran (same noise, same path).
    raw = _concrete(concrete_gate="before", concrete_scale_kl=False)(x, 0.3, noise=_noise(gated, U))
    torch.testing.assert_close(trace.log_ratio_cont, raw.log_ratio_cont * drawn)
    # The z_pres KL counts for every step that ran, the crossing step included.
    torch.testing.assert_close(trace.kl_pres, raw.kl_pres)
    assert (trace.kl_pres[crossing] != 0).all() and (trace.kl_pres[ran == 0] == 0).all()
    # Counts: running_digits adds 1 per step whose updated stop sum is below the threshold.
    assert trace.counts().tolist() == drawn.sum(0).long().tolist() == [2, 3, 0, 1, 1]


def test_concrete_original_rule_is_kept_as_an_option() -> None:
    """`concrete_gate: before` + `concrete_scale_kl: true`: the crossing step is drawn and every
    step's where/what KL is scaled by its relaxed z_pres (the harness's original rule)."""
    x = _images(U.shape[1])
    old = _concrete()  # the ModelConfig defaults
    assert (old.cfg.concrete_gate, old.cfg.concrete_scale_kl) == ("before", True)
    trace = old(x, 0.3, noise=_noise(old, U))
    ran, _ = _reference_gates(U)
    assert trace.kept is None
    expected = ((U * ran)[..., None, None] * _objects(old, trace)).sum(0)
    torch.testing.assert_close(trace.canvas, expected, atol=1e-5, rtol=1e-5)
    _, kl_where, kl_what = _raw_kls(old, x, _noise(old, U))
    torch.testing.assert_close(trace.kl_where, kl_where * U * ran)
    torch.testing.assert_close(trace.kl_what, kl_what * U * ran)


@pytest.mark.parametrize("dair", [False, True])
def test_gate_changes_the_canvas(dair: bool) -> None:
    """The two rules differ exactly by the crossing steps' objects (DAIR: from there on)."""
    x = _images(U.shape[1])
    before = _concrete(dair=dair)
    after = _concrete(dair=dair, concrete_gate="after")
    t_before = before(x, 0.3, noise=_noise(before, U))
    t_after = after(x, 0.3, noise=_noise(after, U))
    ran, drawn = _reference_gates(U)
    crossing = (ran > 0) & (drawn == 0)  # the step whose update crosses the threshold
    diff = (t_before.canvas - t_after.canvas).flatten(1).abs().amax(1)
    assert (diff[crossing.any(0)] > 1e-4).all() and (diff[~crossing.any(0)] < 1e-6).all()
    if not dair:  # the same objects otherwise: the difference is the crossing steps' objects
        extra = torch.where(crossing, U, 0.0)[..., None, None] * _objects(before, t_before)
        torch.testing.assert_close(t_before.canvas - t_after.canvas, extra.sum(0), atol=1e-5,
                                   rtol=1e-5)  # fmt: skip


# -------------------------------------------------------------------------------- count prior
@pytest.mark.parametrize("s", [1 - 1e-7, 0.99, 0.5, 1e-5])
@pytest.mark.parametrize("steps", [1, 3, 5])
def test_count_prior_is_akosiorek_truncated_table(s: float, steps: int) -> None:
    """log p(n) = log(s^n (1 - s)) for n = 0..T, the last count included, not renormalised:
    akosiorek's `geometric_prior` is Geometric(probs=1 - s).prob(range(T + 1)), whose mass is
    1 - s^(T + 1). `normalised=True` divides by that mass."""
    n = torch.arange(steps + 1)
    log_p = count_prior_log_prob(n, s, steps)
    expected = [k * math.log(s) + math.log1p(-s) for k in range(steps + 1)]
    torch.testing.assert_close(log_p, torch.tensor(expected, dtype=torch.float64), rtol=0,
                               atol=1e-12)  # fmt: skip
    mass = float(log_p.exp().sum())
    assert math.isclose(mass, 1 - s ** (steps + 1), rel_tol=1e-9)
    normalised = count_prior_log_prob(n, s, steps, normalised=True)
    assert math.isclose(float(normalised.exp().sum()), 1.0, rel_tol=1e-9)
    # Flat where it matters: the last step costs log s like any other (the per-step Bernoulli
    # prior instead gives it log s - log(1 - s): +4.6 nats at s = 0.99).
    step_cost = log_p[1:] - log_p[:-1]
    torch.testing.assert_close(step_cost, torch.full_like(step_cost, math.log(s)))
    per_step = geometric_count_log_prob(n, s, steps)
    bonus = float(per_step[-1] - per_step[-2]) - math.log(s)
    assert math.isclose(bonus, -math.log1p(-s), rel_tol=1e-9)


@pytest.mark.parametrize("s", [1 - 1e-7, 0.99, 0.5, 1e-5])
def test_count_prior_step_conditionals_multiply_to_the_table(s: float) -> None:
    """Per-step conditionals (on, off) plus the once-per-sequence offset give log p(n)."""
    steps = 3
    for normalised in (False, True):
        log_on, log_off, offset = count_prior_step_log_probs(s, steps, normalised)
        assert torch.allclose(log_on.exp() + log_off.exp(), torch.ones(steps, dtype=torch.float64))
        seq = [float(log_on[:k].sum() + (log_off[k] if k < steps else 0.0) + offset)
               for k in range(steps + 1)]  # fmt: skip
        expected = count_prior_log_prob(torch.arange(steps + 1), s, steps, normalised)
        torch.testing.assert_close(torch.tensor(seq, dtype=torch.float64), expected, atol=1e-9,
                                   rtol=0)  # fmt: skip
    # From a 0-d float32 tensor (the compiled loss): the same, to float32 precision of s.
    on_t, off_t, off = count_prior_step_log_probs(torch.tensor(0.3), steps)
    on_f, off_f, off_ref = count_prior_step_log_probs(float(torch.tensor(0.3)), steps)
    torch.testing.assert_close(on_t, on_f)
    torch.testing.assert_close(off_t, off_f)
    torch.testing.assert_close(off, off_ref)


# Bernoulli presence uniforms (T, B) that fix the counts whatever q says: u = 0 is always on,
# u = 1 always off; columns give counts 0, 1, 2, 3, 3, 1.
U_COUNTS = torch.tensor(
    [[1.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.5, 1.0, 0.0, 0.0, 0.0, 1.0], [0.5, 0.5, 1.0, 0.0, 0.0, 0.2]]
)


def _bernoulli(**opts: object) -> AIR:
    torch.manual_seed(0)
    model = AIR(ModelConfig(**opts, **SMALL))
    with torch.no_grad():  # spread the presence probabilities over (0, 1)
        model.predict[-1].weight[0].mul_(8.0)
    return model


@pytest.mark.parametrize("normalised", [False, True])
@pytest.mark.parametrize("s", [0.99, 0.3])
def test_model_count_prior_scores_each_count_as_the_table(normalised: bool, s: float) -> None:
    """The model's sampled prior terms of a sequence sum to log p(n) of the count prior."""
    model = _bernoulli(presence_prior="count", count_prior_normalised=normalised)
    trace = model(_images(U_COUNTS.shape[1]), s, noise=_noise(model, U_COUNTS))
    assert trace.counts().tolist() == [0, 1, 2, 3, 3, 1]
    log_p = (trace.log_q_pres + trace.log_ratio_pres).sum(0)
    expected = count_prior_log_prob(trace.counts(), s, 3, normalised).float()
    torch.testing.assert_close(log_p, expected, rtol=1e-5, atol=1e-5)


def _modified_geometric(p: torch.Tensor) -> torch.Tensor:
    """akosiorek's `bernoulli_to_modified_geometric`: q(n) from per-step presence probabilities
    (T, B) -> (T + 1, B): [1 - p1, p1 (1 - p2), p1 p2 (1 - p3), p1 p2 p3]."""
    p = p.double()
    prod = torch.cumprod(p, 0)
    q = torch.cat([1 - p[:1], (1 - p[1:]) * prod[:-1], prod[-1:]])
    return q / q.sum(0, keepdim=True)


@pytest.mark.parametrize("normalised", [False, True])
def test_expected_kl_is_akosiorek_analytic_kl(normalised: bool) -> None:
    """`presence_kl: expected`: the presence KL is the tabular KL(q(n) || p(n)) over counts and
    each step's where/what KL is weighted by q(n > t), the reverse cumsum of q(n)[1:]."""
    s, steps = 0.9, 3
    model = _bernoulli(presence_prior="count", count_prior_normalised=normalised,
                       presence_kl="expected")  # fmt: skip
    x = _images(U_COUNTS.shape[1])
    trace = model(x, s, noise=_noise(model, U_COUNTS))
    q = _modified_geometric(trace.pres_prob)
    log_prior = count_prior_log_prob(torch.arange(steps + 1), s, steps, normalised)[:, None]
    tabular = (q * (q.log() - log_prior)).sum(0)  # prior.py `tabular_kl`, summed over n
    torch.testing.assert_close(trace.kl_pres.sum(0).double(), tabular, rtol=1e-5, atol=1e-5)
    assert (trace.kl_pres[trace.ran == 0] != 0).any(), "steps that did not run count too"

    # Raw per-step where/what KL: the sampled weighting with every step on (u = 0) is raw x 1;
    # the expected weighting on the same noise and path is raw x q(n > t).
    all_on = torch.zeros_like(U_COUNTS)
    expected_w = model(x, s, noise=_noise(model, all_on))
    sampled = _bernoulli(presence_prior="count", count_prior_normalised=normalised)
    sampled = sampled(x, s, noise=_noise(model, all_on))
    q_all_on = _modified_geometric(expected_w.pres_prob)  # this path's presence probabilities
    weight = q_all_on[1:].flip(0).cumsum(0).flip(0).float()  # q(n > t), as the reference's
    torch.testing.assert_close(expected_w.kl_where, sampled.kl_where * weight)
    torch.testing.assert_close(expected_w.kl_what, sampled.kl_what * weight)
    # The importance weight stays the sampled one.
    torch.testing.assert_close(expected_w.log_weight(), sampled.log_weight())


def test_expected_kl_is_differentiable_in_the_presence_probabilities() -> None:
    """The analytic KL carries the presence gradient (the reference's stop_gradient on the
    step weights is commented out); the sampled weighting gives it none through where/what."""
    x = _images(U_COUNTS.shape[1])
    bias = {}
    for mode in ("expected", "sampled"):
        model = _bernoulli(presence_prior="count", presence_kl=mode)
        trace = model(x, 0.9, noise=_noise(model, U_COUNTS))
        (grad,) = torch.autograd.grad(trace.kl_where.sum(), model.predict[-1].bias)
        bias[mode] = grad[0]
    assert bias["expected"].abs() > 0 and bias["sampled"] == 0


def test_annealed_prior_starts_where_the_reference_does() -> None:
    """air_nvil_annealed's resolved config: s from 1 - 1e-7, count prior, expected KL,
    reconstruction signal; at the start the count prior is flat to 1e-6 nats per step."""
    variant = discover().variants["air_nvil_annealed"]
    cfg = variant.run_config()
    assert cfg.prior.kind == "annealed" and cfg.prior.start == pytest.approx(1 - 1e-7, abs=1e-15)
    assert (cfg.prior.end, cfg.prior.anneal_iters, cfg.prior.anneal_space) == (1e-5, 100000,
                                                                               "prob")  # fmt: skip
    assert cfg.model.presence_prior == "count" and not cfg.model.count_prior_normalised
    assert cfg.model.presence_kl == "expected"
    assert cfg.estimator.name == "nvil"
    assert cfg.estimator.params["learning_signal"] == "reconstruction"
    s0 = presence_prior_prob(0, "annealed", 0.01, cfg.prior.start, cfg.prior.end, 100000)
    log_p = count_prior_log_prob(torch.arange(4), s0, 3)
    assert float((log_p[1:] - log_p[:-1]).abs().max()) < 1e-6
    # akosiorek's `exp` annealing: log-linear in the probability, floor at `final`.
    mid = presence_prior_prob(50000, "annealed", 0.01, cfg.prior.start, cfg.prior.end, 100000)
    assert math.isclose(mid, math.sqrt(cfg.prior.start * cfg.prior.end), rel_tol=1e-9)


@pytest.mark.parametrize("name", ["air_concrete", "dair_concrete"])
def test_concrete_variants_use_aakhundov_gating(name: str) -> None:
    cfg = discover().variants[name].run_config()
    assert cfg.model.presence == "concrete"
    assert cfg.model.concrete_gate == "after" and cfg.model.concrete_scale_kl is False
    assert cfg.model.concrete_stop == 0.99 and cfg.model.concrete_temperature == 1.0
    # training.py: log-odds from log(1e4) decayed x0.1 every 3000 iterations, floor 1e-9.
    assert cfg.prior.anneal_space == "odds" and cfg.prior.anneal_iters == 39000
    odds = lambda p: p / (1 - p)  # noqa: E731
    for it in (0, 3000, 21000, 39000):
        p = presence_prior_prob(it, "annealed", 0.01, cfg.prior.start, cfg.prior.end, 39000,
                                "odds")  # fmt: skip
        assert math.isclose(odds(p), max(1e4 * 0.1 ** (it / 3000), 1e-9), rel_tol=1e-3)


# ---------------------------------------------------------------------------- learning signal
def test_learning_signal_forms() -> None:
    model = _bernoulli(presence_prior="count", presence_kl="expected")
    trace = model(_images(6), 0.9, noise=_noise(model, U_COUNTS))
    rec = learning_signal(trace, "reconstruction")
    assert rec.shape == trace.z_pres.shape
    torch.testing.assert_close(rec, trace.log_lik[None].expand(3, -1))
    torch.testing.assert_close(learning_signal(trace, "downstream_elbo"), downstream_elbo(trace))
    assert not torch.allclose(rec, downstream_elbo(trace))  # the KL is in one, not the other
    with pytest.raises(ValueError, match="learning signal"):
        learning_signal(trace, "elbo")
    with pytest.raises(ValueError, match="estimator.params.learning_signal"):
        NVIL.parse_params({"learning_signal": "rec"})


@pytest.mark.parametrize("form", ["reconstruction", "downstream_elbo"])
def test_nvil_score_function_uses_the_configured_signal(form: str) -> None:
    """The model's gradient from NVIL's loss equals that of
    -(ELBO + sum_t (signal_t - baseline_t) log q(z_pres_t)) with the configured signal, and not
    that of the other signal."""
    model = _bernoulli(presence_prior="count", presence_kl="expected")
    est = NVIL(model, NVIL.Params(baseline_hidden=16, learning_signal=form))
    x = _images(6)
    params = list(model.parameters())
    torch.manual_seed(5)
    got = torch.autograd.grad(est.loss(model, x, 0.9).loss, params)

    def manual(signal_form: str) -> list[torch.Tensor]:
        torch.manual_seed(5)
        trace = model(x, 0.9)
        value = est.baseline(x, trace)
        signal = learning_signal(trace, signal_form) - value
        surrogate = (signal.detach() * trace.log_q_pres * trace.ran).sum(0)
        return torch.autograd.grad(-(trace.elbo() + surrogate).mean(), params)

    for a, b in zip(got, manual(form), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    other = "downstream_elbo" if form == "reconstruction" else "reconstruction"
    head = model.predict[-1].weight
    index = [i for i, p in enumerate(params) if p is head][0]
    assert not torch.allclose(got[index], manual(other)[index], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------- config checks
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.concrete_gate=later", "model.concrete_gate"),
        ("model.presence_prior=poisson", "model.presence_prior"),
        ("model.presence_kl=exact", "model.presence_kl"),
    ],
)
def test_bad_options_are_rejected_with_the_field(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_expected_kl_needs_bernoulli_presence() -> None:
    with pytest.raises(ConfigError, match="model.presence_kl"):
        load_config(overrides=["model.presence=concrete", "model.presence_kl=expected"])
    with pytest.raises(ValueError, match="model.presence_kl"):
        AIR(ModelConfig(presence="concrete", presence_kl="expected", **SMALL))
