"""The options that put our NVIL AIR in Pyro's form (docs/pyro_parity.md); no pyro needed.

Pyro's TraceGraph_ELBO multiplies every log-probability by the plate's subsample factor N/B, so
the baseline of Pyro's AIR example regresses N/B = 937.5 times the downstream ELBO
(`NVIL.Params.baseline_scale` = B/N reproduces it); its z_where sd is relative to the prior's
(`ModelConfig.where_scale_relative`); its KL terms are one-sample estimates
(`NVIL.Params.kl_estimate: sampled`). docs/pyro_parity/compare.py checks against Pyro itself
that, with these, every gradient agrees; these tests pin the options' behaviour without Pyro.
"""

from __future__ import annotations

import math

import pytest
import torch

from implementations.core.estimators import NVIL, downstream_elbo
from implementations.core.model import AIR, ModelConfig, Noise

PYRO_SCALE = 64 / 60000  # B/N of the Pyro tutorial: batch 64 of 60000 images


def _images(batch: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(batch, 50, 50)
    for i in range(batch):  # a bright digit-sized blob at a random place
        r, c = torch.randint(0, 30, (2,), generator=g).tolist()
        x[i, r : r + 18, c : c + 14] = torch.rand(18, 14, generator=g)
    return x


def _baseline_move(params: NVIL.Params) -> tuple[float, float]:
    """(|baseline| at init, largest change of the baseline after one Adam step at its lr), nats."""
    torch.manual_seed(0)
    model = AIR(ModelConfig(sparse_images=False))
    nvil = NVIL(model, params)
    x = _images()
    with torch.no_grad():
        trace = model(x, 0.01)
    target = downstream_elbo(trace)
    before = nvil.baseline(x, trace)
    loss = ((target - before) ** 2 * trace.ran).sum(0).mean()
    opt = torch.optim.Adam(nvil.param_groups(1e-4))
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = nvil.baseline(x, trace)
    return float(before.detach().abs().max()), float((after - before).detach().abs().max())


def test_defaults_are_addtts_unscaled_baseline_and_analytic_kl() -> None:
    params = NVIL.Params()
    assert (params.baseline_lr, params.baseline_scale, params.kl_estimate) == (0.1, 1.0, "analytic")


def test_pyro_scaled_baseline_moves_by_little() -> None:
    # The ELBO of these images is hundreds of nats; Pyro's scaled baseline creeps towards it.
    start, move = _baseline_move(NVIL.Params(baseline_scale=PYRO_SCALE))
    assert start < 1.0
    assert move < 5.0, f"one Adam step moved the scaled baseline by {move:.1f} nats"


def test_unscaled_baseline_jumps() -> None:
    # The same step at lr 0.1 moves the unscaled (addtt) baseline by tens of nats.
    _, move = _baseline_move(NVIL.Params())
    assert move > 20.0, f"unscaled baseline moved only {move:.1f} nats"


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_baseline_scale_is_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match="baseline_scale"):
        NVIL(AIR(ModelConfig()), NVIL.Params(baseline_scale=bad))


@pytest.mark.parametrize(
    "params",
    [dict(kl_estimate="pathwise"), dict(kl_estimate="sampled", learning_signal="reconstruction")],
)
def test_bad_kl_estimate_is_rejected(params: dict) -> None:
    with pytest.raises(ValueError, match="kl_estimate"):
        NVIL.Params(**params)


@pytest.mark.parametrize("form", ["analytic", "sampled"])
def test_presence_gradient_of_each_kl_estimate(form: str) -> None:
    """Every first presence sampled off (nothing drawn, only step 0 runs), no baseline: the
    gradient on the presence logit, worked out by hand for each form.

    analytic: d KL/d logit (pathwise) + the score function with signal log p(x|z) - KL;
    sampled (Pyro): only the score function, with signal log p(x|z) + log p(0) - log q(0).
    """
    torch.manual_seed(0)
    model = AIR(ModelConfig(sparse_images=False))
    nvil = NVIL(model, NVIL.Params(kl_estimate=form, use_baseline=False))
    x = _images(8)
    noise = model.draw_noise(8, x.device, x.dtype)
    noise.pres.fill_(1.0)  # u = 1 is never below the presence probability: all off
    model.draw_noise = lambda *_: noise  # type: ignore[method-assign]  # this noise, once
    out = nvil.loss(model, x, 0.01)
    p = out.trace.pres_prob[0].detach().double()
    lik = out.trace.log_lik.detach().double()
    log_off_q, log_off_p = torch.log1p(-p), math.log1p(-0.01)
    if form == "sampled":
        expected = p * (lik + log_off_p - log_off_q)
    else:
        kl = p * (p.log() - math.log(0.01)) + (1 - p) * (log_off_q - log_off_p)
        expected = p * (1 - p) * (torch.logit(p) - math.log(0.01 / 0.99)) + p * (lik - kl)
    (g,) = torch.autograd.grad(out.loss, model.predict[-1].bias)
    assert out.trace.ran[1:].sum() == 0
    torch.testing.assert_close(g[0].double(), expected.mean(), rtol=1e-4, atol=1e-4)


def _step0_where_sd(relative: bool) -> torch.Tensor:
    """(3,) mean sd of the first step's z_where at initialisation: z(noise 1) - z(noise 0)."""
    torch.manual_seed(0)
    model = AIR(ModelConfig(where_scale_relative=relative, sparse_images=False))
    x = _images()
    noise = model.draw_noise(x.shape[0], x.device, x.dtype)
    with torch.no_grad():
        zs = [model(x, 0.01, noise=Noise(noise.pres, torch.full_like(noise.where, v), noise.what))
              .z_where[0] for v in (0.0, 1.0)]  # fmt: skip
    return (zs[1] - zs[0]).mean(0)


def test_where_sd_at_initialisation() -> None:
    # Ours (default): where_scale_init on every coordinate.
    torch.testing.assert_close(_step0_where_sd(False), torch.full((3,), 0.1), atol=0.02, rtol=0)
    # Pyro's form: softplus(~0) = 0.69 times the prior sd (0.2, 1, 1).
    sd = _step0_where_sd(True)
    prior_sd = torch.tensor(ModelConfig().where_prior_scale)
    assert ((sd / prior_sd - math.log(2)).abs() < 0.15).all(), sd


def test_pyro_form_where_scale_matches_the_plain_model() -> None:
    from tests.plain_air import plain_forward  # noqa: PLC0415

    small = dict(lstm_hidden=32, predict_hidden=16, encoder_hidden=32, decoder_hidden=32,
                 z_what_dim=8)  # fmt: skip
    torch.manual_seed(0)
    model = AIR(ModelConfig(where_scale_relative=True, sparse_images=False, **small))
    x = _images(12)
    noise = model.draw_noise(12, x.device, x.dtype)
    fast = model(x, 0.7, noise=noise)
    plain = plain_forward(model, x, 0.7, noise)
    for k in ("z_pres", "z_where", "kl_where", "log_ratio_cont", "log_lik"):
        torch.testing.assert_close(getattr(fast, k), plain[k], atol=1e-4, rtol=1e-4, msg=k)
    # And the sd really is relative: with where_scale_relative off, the same weights and noise
    # draw other windows.
    model.cfg.where_scale_relative = False
    other = model(x, 0.7, noise=noise)
    assert not torch.allclose(other.z_where, fast.z_where)
