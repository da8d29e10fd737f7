"""Every speed-up keeps the maths: fast paths against the plain implementations."""

from __future__ import annotations

import pytest
import torch

from implementations.core.estimators import NVIL
from implementations.core.model import AIR, ModelConfig
from implementations.core.spatial import crop, paste
from tests.plain_air import grid_sample_crop, grid_sample_paste, plain_forward, plain_nvil_baseline


def test_separable_transformer_equals_grid_sample_values_and_gradients() -> None:
    g = torch.Generator().manual_seed(0)
    b = 16
    z_where = torch.stack(
        [torch.rand(b, generator=g) * 3 + 0.8, torch.rand(b, generator=g) * 3 - 1.5,
         torch.rand(b, generator=g) * 3 - 1.5], -1,
    ).requires_grad_()  # fmt: skip
    objects = torch.rand(b, 28, 28, generator=g, requires_grad=True)
    images = torch.rand(b, 50, 50, generator=g, requires_grad=True)
    for fast, plain, inp, size in ((paste, grid_sample_paste, objects, 50),
                                   (crop, grid_sample_crop, images, 28)):  # fmt: skip
        out_fast, out_plain = fast(inp, z_where, size), plain(inp, z_where, size)
        torch.testing.assert_close(out_fast, out_plain, atol=1e-5, rtol=1e-5)
        weight = torch.randn(out_fast.shape, generator=g)
        grads_fast = torch.autograd.grad((out_fast * weight).sum(), (inp, z_where))
        grads_plain = torch.autograd.grad((out_plain * weight).sum(), (inp, z_where))
        for a, c in zip(grads_fast, grads_plain, strict=True):
            # Sums over thousands of pixels in a different order: float32 rounding, measured
            # against the gradient's own scale.
            assert (a - c).abs().max() <= 1e-5 * c.abs().max() + 1e-6


def test_sparse_image_projection_equals_dense() -> None:
    """Same initialisation and noise: the loss and every gradient agree, sparse or dense."""
    small = dict(lstm_hidden=32, predict_hidden=16, encoder_hidden=32, decoder_hidden=32,
                 z_what_dim=8)  # fmt: skip
    x = torch.zeros(8, 50, 50)
    x[::2, 10:30, 12:26] = torch.rand(4, 20, 14, generator=torch.Generator().manual_seed(1))
    grads = {}
    for sparse in (True, False):
        torch.manual_seed(3)
        model = AIR(ModelConfig(sparse_images=sparse, **small))
        est = NVIL(model, NVIL.Params(baseline_hidden=16))
        torch.manual_seed(4)
        out = est.loss(model, x, 0.3)
        out.loss.backward()
        named = list(model.named_parameters()) + list(est.named_parameters())
        grads[sparse] = (out.loss.detach(), {n: p.grad.clone() for n, p in named})
    torch.testing.assert_close(grads[True][0], grads[False][0])
    for name, grad in grads[True][1].items():
        torch.testing.assert_close(grad, grads[False][1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_old_checkpoint_layout_still_loads() -> None:
    """Checkpoints from before the input-major image weight load into the new layout."""
    model = AIR(ModelConfig(lstm_hidden=8, predict_hidden=4, encoder_hidden=8, decoder_hidden=8,
                            z_what_dim=4))  # fmt: skip
    state = model.state_dict()
    weight, bias = state.pop("rnn.image_weight"), state.pop("rnn.image_bias")
    state["rnn.image_proj.weight"], state["rnn.image_proj.bias"] = weight.t().clone(), bias
    fresh = AIR(model.cfg)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.rnn.image_weight, weight)


SMALL = dict(lstm_hidden=32, predict_hidden=16, encoder_hidden=32, decoder_hidden=32, z_what_dim=8)
TRACE_FIELDS = (
    *("z_pres", "pres_prob", "ran", "z_where", "z_what", "log_q_pres", "kl_pres"),
    *("log_ratio_pres", "kl_where", "kl_what", "log_ratio_cont", "canvas", "log_lik"),
)


def _digits_like_images(batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(batch, 50, 50)
    for b in range(batch):
        r, c = torch.randint(0, 30, (2,), generator=g).tolist()
        x[b, r : r + 20, c : c + 16] = torch.rand(20, 16, generator=g) * (b % 3 > 0)
    return x


# Model options per case: the four model kinds with the original presence rules, then the
# reference-fidelity options (aakhundov's gating for Concrete; akosiorek's count prior and
# expected KL weights for Bernoulli), so that the plain model checks every branch.
GATED = dict(presence="concrete", concrete_gate="after", concrete_scale_kl=False)
KINDS = {
    "air-bernoulli": {},
    "air-concrete": dict(presence="concrete"),
    "dair-bernoulli": dict(dair=True),
    "dair-concrete": dict(dair=True, presence="concrete"),
    "air-concrete-gated": GATED,
    "dair-concrete-gated": dict(GATED, dair=True),
    "air-concrete-gated-scaled": dict(GATED, concrete_scale_kl=True),
    "air-concrete-before-unscaled": dict(presence="concrete", concrete_scale_kl=False),
    "air-concrete-count": dict(presence="concrete", presence_prior="count"),
    "air-bernoulli-count": dict(presence_prior="count"),
    "air-bernoulli-count-expected": dict(presence_prior="count", presence_kl="expected"),
    "dair-bernoulli-count-normalised-expected": dict(
        dair=True, presence_prior="count", count_prior_normalised=True, presence_kl="expected"
    ),
    "air-bernoulli-expected": dict(presence_kl="expected"),
}


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_fast_model_equals_plain_step_by_step_model(kind: str, sparse: bool) -> None:
    """The model's forward (batched scoring, decoder and paste after the loop, projection once,
    separable transformer) gives the plain implementation's trace and gradients.

    The plain one (tests/plain_air.py) runs every step in full with grid_sample, dense
    projections of [image, latent, h] and torch.distributions terms. The prior probability is
    high so that many steps are on and every branch of the maths is exercised.
    """
    torch.manual_seed(0)
    model = AIR(ModelConfig(sparse_images=sparse, **KINDS[kind], **SMALL))
    est = NVIL(model, NVIL.Params(baseline_hidden=16))
    x = _digits_like_images(12, seed=1)
    noise = model.draw_noise(12, x.device, x.dtype)
    fast = model(x, 0.7, noise=noise)
    fast_fields = {k: getattr(fast, k) for k in TRACE_FIELDS}
    plain = plain_forward(model, x, 0.7, noise)
    assert plain["ran"][1:].sum() > 0, "test images should turn later steps on"
    if model.cfg.concrete_gate == "after" and model.cfg.presence == "concrete":
        # The case that distinguishes the gates: a step that ran, with some presence, whose
        # update crossed the stop threshold (so it is not drawn).
        crossed = (plain["ran"] > 0) & (plain["kept"] == 0) & (plain["z_pres"] > 0.05)
        assert crossed.any(), "test images should include a step that crosses the threshold"
        torch.testing.assert_close(fast.kept, plain["kept"])
    else:
        assert fast.kept is None and "kept" not in plain
    g = torch.Generator().manual_seed(2)
    weights = {k: torch.randn(v.shape, generator=g) for k, v in plain.items()}
    params = list(model.parameters())
    grads = {}
    for name, trace in (("fast", fast_fields), ("plain", plain)):
        torch.testing.assert_close(trace[k := "z_pres"], plain[k])  # same samples first
        total = sum((weights[k] * v).sum() for k, v in trace.items() if v.requires_grad)
        grads[name] = torch.autograd.grad(total, params)
    for k in TRACE_FIELDS:
        torch.testing.assert_close(fast_fields[k], plain[k], atol=1e-4, rtol=1e-4, msg=k)
    names = [n for n, _ in model.named_parameters()]
    for name, a, b in zip(names, grads["fast"], grads["plain"], strict=True):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-5, name

    # NVIL's baseline, which shares the image projection and reads the trace's latents.
    values = est.baseline(x, fast)
    plain_values = plain_nvil_baseline(est, x, plain)
    # In the network's own units: NVIL may scale its output down (Params.baseline_scale).
    unit = getattr(est.params, "baseline_scale", 1.0)
    torch.testing.assert_close(values / unit, plain_values / unit, atol=1e-5, rtol=1e-4)
    w = torch.randn(values.shape, generator=g)
    base_params = list(est.parameters())
    fast_grads = torch.autograd.grad((w * values).sum(), base_params)
    plain_grads = torch.autograd.grad((w * plain_values).sum(), base_params)
    for a, b in zip(fast_grads, plain_grads, strict=True):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-6
