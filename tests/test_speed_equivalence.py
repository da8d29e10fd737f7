"""Every speed-up keeps the maths: fast paths against the plain implementations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from implementations.core.estimators import NVIL
from implementations.core.model import AIR, ModelConfig
from implementations.core.spatial import crop, paste


def _grid_sample_paste(objects: torch.Tensor, z_where: torch.Tensor, canvas: int) -> torch.Tensor:
    """The plain spatial transformer: affine_grid + grid_sample (Pyro's AIR does this)."""
    b, w = objects.shape[0], objects.shape[-1]
    s, x, y = z_where.unbind(-1)
    zero = torch.zeros_like(s)
    theta = torch.stack([torch.stack([s, zero, x], -1), torch.stack([zero, s, y], -1)], 1)
    grid = F.affine_grid(theta, [b, 1, canvas, canvas], align_corners=False)
    return F.grid_sample(objects.view(b, 1, w, w), grid, align_corners=False).view(
        b, canvas, canvas
    )


def _grid_sample_crop(images: torch.Tensor, z_where: torch.Tensor, window: int) -> torch.Tensor:
    s, x, y = z_where.unbind(-1)
    inv = torch.stack([1 / s, -x / s, -y / s], -1)
    b, h, _ = images.shape
    zero = torch.zeros_like(s)
    theta = torch.stack(
        [
            torch.stack([inv[:, 0], zero, inv[:, 1]], -1),
            torch.stack([zero, inv[:, 0], inv[:, 2]], -1),
        ],
        1,
    )
    grid = F.affine_grid(theta, [b, 1, window, window], align_corners=False)
    return F.grid_sample(images.view(b, 1, h, h), grid, align_corners=False).view(b, window, window)


def test_separable_transformer_equals_grid_sample_values_and_gradients() -> None:
    g = torch.Generator().manual_seed(0)
    b = 16
    z_where = torch.stack(
        [torch.rand(b, generator=g) * 3 + 0.8, torch.rand(b, generator=g) * 3 - 1.5,
         torch.rand(b, generator=g) * 3 - 1.5], -1,
    ).requires_grad_()  # fmt: skip
    objects = torch.rand(b, 28, 28, generator=g, requires_grad=True)
    images = torch.rand(b, 50, 50, generator=g, requires_grad=True)
    for fast, plain, inp, size in ((paste, _grid_sample_paste, objects, 50),
                                   (crop, _grid_sample_crop, images, 28)):  # fmt: skip
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
