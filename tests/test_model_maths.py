"""The AIR maths: shapes, KL terms, priors, spatial transformer, estimator gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence
from torch.distributions.relaxed_bernoulli import LogitRelaxedBernoulli

from implementations.core.densities import (
    concrete_logit_density,
    gaussian_kl,
    gaussian_log_prob,
)
from implementations.core.estimators import NVIL, downstream_elbo, score_function_surrogate
from implementations.core.model import AIR, ModelConfig
from implementations.core.priors import geometric_count_log_prob, presence_prior_prob
from implementations.core.spatial import crop, paste, where_to_box

SMALL = dict(lstm_hidden=32, predict_hidden=16, encoder_hidden=32, decoder_hidden=32, z_what_dim=8)


def digits_like(batch: int = 6, seed: int = 0) -> torch.Tensor:
    """Images with a couple of bright blocks, standing in for digits."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(batch, 50, 50)
    for b in range(batch):
        for _ in range(b % 3):
            r, c = torch.randint(0, 35, (2,), generator=g).tolist()
            x[b, r : r + 14, c : c + 10] = torch.rand(14, 10, generator=g)
    return x


@pytest.mark.parametrize("presence", ["bernoulli", "concrete"])
@pytest.mark.parametrize("dair", [False, True])
def test_trace_shapes_and_masks(presence: str, dair: bool) -> None:
    torch.manual_seed(0)
    model = AIR(ModelConfig(presence=presence, dair=dair, **SMALL))
    x = digits_like()
    trace = model(x, prior_prob=0.3)
    T, B = 3, x.shape[0]
    for name in ("z_pres", "ran", "log_q_pres", "kl_pres", "kl_where", "kl_what", "log_ratio_cont"):
        assert getattr(trace, name).shape == (T, B), name
    assert trace.z_where.shape == (T, B, 3) and trace.z_what.shape == (T, B, 8)
    assert trace.log_lik.shape == (B,) and trace.canvas.shape == (B, 50, 50)
    assert trace.elbo().shape == (B,) and torch.isfinite(trace.elbo()).all()
    # A step that did not run contributes nothing.
    off = trace.ran == 0
    assert (trace.kl()[off] == 0).all() and (trace.z_pres[off] == 0).all()
    assert (trace.ran[0] == 1).all()
    counts = trace.counts()
    assert ((counts >= 0) & (counts <= T)).all()


def test_gaussian_kl_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(1)
    loc, p_loc = torch.randn(7, 5, generator=g), torch.randn(5, generator=g)
    scale, p_scale = torch.rand(7, 5, generator=g) + 0.1, torch.rand(5, generator=g) + 0.1
    ours = gaussian_kl(loc, scale, p_loc, p_scale)
    ref = kl_divergence(Normal(loc, scale), Normal(p_loc, p_scale)).sum(-1)
    torch.testing.assert_close(ours, ref)
    z = torch.randn(7, 5, generator=g)
    torch.testing.assert_close(
        gaussian_log_prob(z, loc, scale), Normal(loc, scale).log_prob(z).sum(-1)
    )


def test_concrete_density_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(2)
    logits, y = torch.randn(100, generator=g) * 3, torch.randn(100, generator=g) * 4
    for temp in (0.5, 1.0, 2.0):
        ref = LogitRelaxedBernoulli(torch.tensor(temp), logits=logits).log_prob(y)
        torch.testing.assert_close(concrete_logit_density(y, logits, temp), ref)


def test_model_terms_match_distributions() -> None:
    """Per-step KLs of the trace equal torch.distributions' for the same posterior."""
    torch.manual_seed(3)
    model = AIR(ModelConfig(**SMALL))
    x = digits_like()
    trace = model(x, prior_prob=0.2)
    # Presence: log q of the sample is a Bernoulli log-prob wherever the step ran.
    ran = trace.ran > 0
    ref = Bernoulli(probs=trace.pres_prob).log_prob(trace.z_pres)
    torch.testing.assert_close(trace.log_q_pres[ran], ref[ran], rtol=1e-4, atol=1e-5)
    # The analytic presence KL is the Bernoulli KL wherever the step ran.
    prior = Bernoulli(probs=torch.full_like(trace.pres_prob, 0.2))
    ref_kl = kl_divergence(Bernoulli(probs=trace.pres_prob), prior)
    torch.testing.assert_close(trace.kl_pres[ran], ref_kl[ran], rtol=1e-4, atol=1e-5)
    assert (trace.kl_pres[~ran] == 0).all()
    # The sampled prior terms, summed over steps, are the truncated geometric prior of the count.
    log_p = (trace.log_q_pres + trace.log_ratio_pres).sum(0)
    expected = geometric_count_log_prob(trace.counts(), 0.2, 3).float()
    torch.testing.assert_close(log_p, expected, rtol=1e-5, atol=1e-5)


def test_geometric_prior_normalised() -> None:
    for prob in (1e-5, 0.01, 0.5, 0.99):
        for steps in (1, 3, 5):
            counts = torch.arange(steps + 1)
            total = geometric_count_log_prob(counts, prob, steps).exp().sum()
            assert math.isclose(float(total), 1.0, rel_tol=1e-9)


def test_prior_schedules() -> None:
    assert presence_prior_prob(123, "fixed", 0.01, 0.9, 1e-5, 100) == 0.01
    assert math.isclose(presence_prior_prob(0, "annealed", 0.01, 0.99, 1e-5, 1000), 0.99)
    assert math.isclose(presence_prior_prob(1000, "annealed", 0.01, 0.99, 1e-5, 1000), 1e-5)
    mid = presence_prior_prob(500, "annealed", 0.01, 0.99, 1e-5, 1000)
    assert math.isclose(mid, math.sqrt(0.99 * 1e-5), rel_tol=1e-9)  # log-linear
    assert presence_prior_prob(5000, "annealed", 0.01, 0.99, 1e-5, 1000) == pytest.approx(1e-5)
    with pytest.raises(ValueError, match="prior.kind"):
        presence_prior_prob(0, "linear", 0.01, 0.99, 1e-5, 10)


def test_paste_then_crop_recovers_glimpse_exactly_on_grid() -> None:
    # s = 50/28 and no shift puts window pixel j exactly on canvas pixel j + 11.
    obj = torch.rand(2, 28, 28)
    where = torch.tensor([[50 / 28, 0.0, 0.0]] * 2)
    canvas = paste(obj, where, 50)
    torch.testing.assert_close(canvas[:, 11:39, 11:39], obj, atol=1e-5, rtol=0)
    assert canvas[:, :11].abs().max() < 1e-5 and canvas[:, 39:].abs().max() < 1e-5
    torch.testing.assert_close(crop(canvas, where, 28), obj, atol=1e-5, rtol=0)
    torch.testing.assert_close(where_to_box(where, 50)[0], torch.tensor([11.0, 11.0, 39.0, 39.0]))


def test_paste_then_crop_round_trip_general_windows() -> None:
    # A smooth object survives paste + crop at arbitrary zooms and shifts (bilinear blur only).
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 28), indexing="ij")
    blob = torch.exp(-((xx / 0.5) ** 2 + (yy / 0.4) ** 2) * 2)
    where = torch.tensor([[1.5, 0.3, -0.2], [2.5, -0.8, 0.5], [3.0, 0.0, 1.0]])
    obj = blob.expand(3, 28, 28)
    back = crop(paste(obj, where, 50), where, 28)
    assert (back - obj).abs().max() < 0.08
    # The pasted ink lies inside the box where_to_box reports.
    canvas = paste(obj, where, 50)
    boxes = where_to_box(where, 50)
    for b in range(3):
        rows, cols = torch.nonzero(canvas[b] > 0.05, as_tuple=True)
        x0, y0, x1, y1 = boxes[b].tolist()
        assert cols.min() >= math.floor(x0) and cols.max() <= math.ceil(x1)
        assert rows.min() >= math.floor(y0) and rows.max() <= math.ceil(y1)


def test_score_function_gradient_matches_exact_gradient() -> None:
    """REINFORCE through score_function_surrogate is unbiased on a Bernoulli toy problem."""
    torch.manual_seed(4)
    theta = torch.tensor([0.4, -1.2], requires_grad=True)
    f = lambda z: (z - 0.3) ** 2 + 2 * z  # noqa: E731
    p = torch.sigmoid(theta)
    exact = (p * (1 - p) * (f(torch.ones(2)) - f(torch.zeros(2)))).detach()
    n = 200_000
    z = torch.bernoulli(p.detach()[:, None].expand(2, n))  # axis 0 plays the role of steps
    log_q = Bernoulli(logits=theta[:, None]).log_prob(z)
    for baseline in (0.0, float(f(p.detach()).mean())):  # a constant baseline keeps it unbiased
        surrogate = score_function_surrogate(log_q, f(z) - baseline, torch.ones_like(z)).mean()
        (grad,) = torch.autograd.grad(surrogate, theta, retain_graph=True)
        torch.testing.assert_close(grad, exact, atol=0.01, rtol=0.02)


def test_downstream_elbo_leaves_out_earlier_steps() -> None:
    torch.manual_seed(5)
    model = AIR(ModelConfig(**SMALL))
    trace = model(digits_like(), 0.3)
    l = downstream_elbo(trace)
    kl = trace.kl()
    torch.testing.assert_close(l[0], trace.elbo())
    torch.testing.assert_close(l[1], trace.log_lik - kl[1] - kl[2])
    torch.testing.assert_close(l[2], trace.log_lik - kl[2])


def test_nvil_baseline_is_used_and_gets_gradient() -> None:
    """The learning signal depends on the baseline, and the baseline is fitted by the loss."""
    torch.manual_seed(6)
    model = AIR(ModelConfig(**SMALL))
    est = NVIL(model, NVIL.Params(baseline_hidden=16, normalise=False))
    x = digits_like(8)
    head = model.predict[-1].weight

    def presence_grad() -> torch.Tensor:
        torch.manual_seed(7)
        model.zero_grad()
        est.zero_grad()
        est.loss(model, x, 0.3).loss.backward()
        return head.grad[0].clone()

    g_with = presence_grad()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in est.parameters())
    with torch.no_grad():
        est.baseline_out[-1].bias.add_(500.0)  # a very different baseline value
    g_shifted = presence_grad()
    assert not torch.allclose(g_with, g_shifted), "the baseline does not enter the learning signal"
    est.params.use_baseline = False
    g_without = presence_grad()
    # Against the shifted baseline: the freshly initialised one may be scaled to near zero
    # (NVIL.Params.baseline_scale), so that without a baseline it barely differs.
    assert not torch.allclose(g_shifted, g_without)


def test_vimco_leave_one_out_signal_matches_direct_formula() -> None:
    import sys

    from bench.variants import discover

    discover()  # imports the variant folders' code
    leave_one_out_signal = sys.modules["air_variant_air_vimco_estimator"].leave_one_out_signal

    g = torch.Generator().manual_seed(8)
    log_w = torch.randn(4, 3, generator=g) * 3
    got = leave_one_out_signal(log_w)
    k = log_w.shape[0]
    for i in range(k):
        others = torch.cat([log_w[:i], log_w[i + 1 :]])
        replaced = torch.cat([others, others.mean(0, keepdim=True)])
        expected = torch.logsumexp(log_w, 0) - torch.logsumexp(replaced, 0)
        torch.testing.assert_close(got[i], expected)
