"""The sparse projection's CSR memo: built once per batch, never stale, never shared wrongly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from implementations.core.estimators import NVIL
from implementations.core.model import AIR, ModelConfig
from implementations.core.networks import ImageLSTM
from implementations.core.sparse_projection import FlatImages

SMALL = dict(lstm_hidden=32, predict_hidden=16, encoder_hidden=32, decoder_hidden=32, z_what_dim=8)


def _sparse_images(seed: int, batch: int = 4) -> np.ndarray:
    return (np.random.default_rng(seed).random((batch, 50, 50)) > 0.9).astype(np.float32)


def _dense_projection(lstm: ImageLSTM, flat: torch.Tensor) -> torch.Tensor:
    return lstm.project(FlatImages(flat, sparse=False))


def test_rewritten_numpy_buffer_is_projected_afresh() -> None:
    """bench.api's path: each call wraps the caller's float32 array without copying, so a buffer
    refilled in place between calls has the same address and a fresh version counter; the
    projection must still be that of the new values (it once reused the old batch's CSR)."""
    torch.manual_seed(0)
    model = AIR(ModelConfig(sparse_images=True, **SMALL))
    arr = _sparse_images(0)
    with torch.no_grad():
        model(torch.as_tensor(arr), 0.01, sample=False)
        arr[:] = _sparse_images(1)
        again = model(torch.as_tensor(arr), 0.01, sample=False)
        model.cfg.sparse_images = False
        dense = model(torch.as_tensor(arr.copy()), 0.01, sample=False)
    torch.testing.assert_close(again.pres_prob, dense.pres_prob)
    torch.testing.assert_close(again.z_where, dense.z_where)


@pytest.mark.parametrize("write", ["in_place", "new_wrapper"])
def test_projection_follows_the_values(write: str) -> None:
    torch.manual_seed(0)
    lstm = ImageLSTM(2500, 4, 8)
    arr = _sparse_images(2).reshape(4, -1)
    flat = torch.from_numpy(arr)
    with torch.no_grad():
        lstm.project(FlatImages(flat, sparse=True))
        if write == "in_place":  # through torch: bumps the version counter
            flat.copy_(torch.from_numpy(_sparse_images(3).reshape(4, -1)))
        else:  # through numpy, then wrapped again: same address, new storage
            arr[:] = _sparse_images(3).reshape(4, -1)
            flat = torch.from_numpy(arr)
        got = lstm.project(FlatImages(flat, sparse=True))
        torch.testing.assert_close(got, _dense_projection(lstm, flat.clone()))


def test_models_with_different_weights_share_images_not_results() -> None:
    """The memo holds the images' CSR form only: two networks on one batch each get their own
    product, and the backward of each gets its own weight gradient."""
    torch.manual_seed(0)
    a, b = ImageLSTM(2500, 4, 8), ImageLSTM(2500, 4, 8)
    flat = torch.from_numpy(_sparse_images(4).reshape(4, -1))
    for lstm in (a, b, a):
        sparse_out = lstm.project(FlatImages(flat, sparse=True))
        (sparse_grad,) = torch.autograd.grad(sparse_out.square().sum(), lstm.image_weight)
        dense_out = _dense_projection(lstm, flat)
        (dense_grad,) = torch.autograd.grad(dense_out.square().sum(), lstm.image_weight)
        torch.testing.assert_close(sparse_out, dense_out)
        torch.testing.assert_close(sparse_grad, dense_grad)


def test_csr_built_once_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """NVIL's loss projects each batch four times (model and baseline, forward and backward):
    two CSR conversions per batch, the images' and their transpose's."""
    builds = []
    to_csr = torch.Tensor.to_sparse_csr

    def counting(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        builds.append(tuple(self.shape))
        return to_csr(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to_sparse_csr", counting)
    torch.manual_seed(0)
    model = AIR(ModelConfig(sparse_images=True, **SMALL))
    est = NVIL(model, NVIL.Params(baseline_hidden=16))
    for seed in (5, 6):
        builds.clear()
        est.loss(model, torch.from_numpy(_sparse_images(seed)), 0.3).loss.backward()
        assert len(builds) == 2, builds
