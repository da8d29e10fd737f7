"""The sparse projection under vmap (a seed group): one block-diagonal product, the values and
gradients of S dense products."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import vmap

from bench.group_loop import GroupLoop
from bench.seedgroup import SeedGroup
from implementations.core import sparse_projection as sp
from implementations.core.sparse_projection import (
    block_diagonal_csr,
    sparse_projection,
    sparse_weight_grad,
)
from tests.conftest import needs_mnist

S, B, P, H = 3, 5, 60, 8


def _images(seed: int, shape: tuple = (S, B, P), density: float = 0.1) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    values = rng.random(shape) * (rng.random(shape) < density)
    return torch.as_tensor(values, dtype=torch.float32)


@pytest.fixture
def counted_builds(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Shapes of the block-diagonal CSR matrices built (each built means the stacked op ran)."""
    builds: list[tuple] = []

    def counting(images: torch.Tensor) -> torch.Tensor:
        builds.append(tuple(images.shape))
        return block_diagonal_csr(images)

    monkeypatch.setattr(sp._BLOCKS, "_build", counting)
    monkeypatch.setattr(sp._BLOCKS, "_entries", {})
    return builds


def test_block_diagonal_csr_places_each_seed_in_its_block() -> None:
    images = _images(0)
    dense = block_diagonal_csr(images).to_dense()
    assert dense.shape == (S * B, S * P)
    torch.testing.assert_close(dense, torch.block_diag(*images), rtol=0, atol=0)
    empty = block_diagonal_csr(torch.zeros(2, 3, 4))  # no non-zero at all: a valid zero matrix
    assert empty.to_dense().abs().sum() == 0 and empty.shape == (6, 8)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("shared_images", [False, True])
def test_vmapped_projection_equals_dense_products(
    compiled: bool, shared_images: bool, counted_builds: list[tuple]
) -> None:
    torch.manual_seed(0)
    images = _images(1, (B, P)) if shared_images else _images(1)
    weight = torch.randn(S, P, H, requires_grad=True)
    bias = torch.randn(S, H, requires_grad=True)
    project = vmap(sparse_projection, in_dims=(None if shared_images else 0, 0, 0))
    if compiled:
        project = torch.compile(project, fullgraph=True)
    out = project(images, weight, bias)
    stacked = images.expand(S, B, P) if shared_images else images
    reference = torch.baddbmm(bias.unsqueeze(1), stacked, weight)
    upstream = torch.randn_like(reference)
    got = torch.autograd.grad(out, (weight, bias), upstream)
    want = torch.autograd.grad(reference, (weight, bias), upstream)
    torch.testing.assert_close(out, reference)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    # One product for the S seeds: the block-diagonal matrix, built once (its transpose comes
    # from it), not S per-seed conversions.
    assert counted_builds == [(S, B, P)]


def test_weight_gradient_op_under_vmap() -> None:
    """The backward's op has its rule too (vmap over the projection's backward formula)."""
    torch.manual_seed(1)
    images, upstream = _images(2), torch.randn(S, B, H)
    got = vmap(sparse_weight_grad)(images, upstream)
    torch.testing.assert_close(got, images.transpose(1, 2) @ upstream)
    shared = vmap(sparse_weight_grad, in_dims=(None, 0))(images[0], upstream)
    torch.testing.assert_close(shared, images[0].t() @ upstream)


@needs_mnist
def test_a_seed_group_projects_its_images_sparsely(tiny_config, counted_builds) -> None:
    """On CPU a group's vectorised loss uses the block-diagonal product (as a single run uses
    its sparse one): one CSR build per iteration for the model and NVIL's baseline together."""
    cfgs = [tiny_config(f"seed={s}", "estimator.params.baseline_hidden=16", out=f"g{s}")
            for s in (0, 1)]  # fmt: skip
    loop = GroupLoop(SeedGroup(cfgs), [0, 1])
    counted_builds.clear()  # the vectorisation dry run builds one too
    for _ in range(2):
        loop.iteration()
    batch = cfgs[0].train.batch_size
    assert counted_builds == [(2, batch, cfgs[0].model.canvas ** 2)] * 2
