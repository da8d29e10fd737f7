"""The image projection as a sparse product: multi-MNIST canvases are ~95 % zeros, so on CPU the
model's largest matrix product (images x 2500 -> 4H, `ImageLSTM.project`) runs from the CSR
form of the images, forward and backward (`ModelConfig.sparse_images`).

The two products are custom ops rather than an autograd.Function: torch.compile cannot trace
sparse tensors, but it can call an opaque op, so the whole loss still compiles into one graph
(`train.compile`). An op takes only tensors, so the CSR forms it needs are memoised here,
keyed by the images they were built from (`CsrCache`).

Under `torch.func.vmap` (a seed group stacks S seeds' images and weights) both ops have a
batching rule: the S products become one product with a block-diagonal CSR matrix (seed s's
rows see only block s of the stacked weights), so a group keeps the sparse saving too. Without
the rule, vmap would fall back to S separate products (and S CSR conversions) per call.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch


class FlatImages:
    """A batch of flattened images, and whether to project them as sparse matrices."""

    def __init__(self, flat: torch.Tensor, sparse: bool) -> None:
        self.dense = flat
        self.sparse = sparse and not flat.requires_grad


class CsrCache:
    """The CSR copies of the last images projected (and of their transpose).

    The model and NVIL's baseline project the same batch, forward and backward, so its CSR form
    is built once per batch. The CSR form is a function of the images' values alone (no model
    weight enters it), so one memo serves every model, estimator and device in the process:
    sharing it can cost a rebuild, never a wrong value. An entry is used only for the very same
    images: the same storage object (not merely the same address: two tensors wrapping one numpy
    buffer are different storages, and the buffer may have been rewritten in between), data
    pointer, shape, strides, dtype and device, and the version counter (bumped by every in-place
    write through torch, views included) still at its value when the entry was built. The entry
    keeps a reference to its images, so their storage cannot be freed and its address reused
    while the entry lives. Writes that bypass the version counter (through `.data`, or a numpy
    view of the very tensor) go unseen, as they do for autograd's own saved-tensor check. Each
    lookup reads its entry once, so concurrent callers can at worst evict each other's entries.
    """

    def __init__(self, build: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        # transpose -> (images, their version counter when the entry was built, CSR form)
        self._entries: dict[bool, tuple[torch.Tensor, int, torch.Tensor]] = {}
        self._build = build  # images -> their CSR matrix; None: `images.to_sparse_csr()`

    def get(self, images: torch.Tensor, transpose: bool) -> torch.Tensor:
        """The CSR matrix of `images` (its transpose if `transpose`), built once per batch."""
        hit = self._entries.get(transpose)
        if hit is not None and _same_values(hit[0], hit[1], images):
            return hit[2]
        version = images._version
        with warnings.catch_warnings():  # "CSR support is in beta": the two products used
            warnings.simplefilter("ignore")  # here are checked against dense ones in tests
            if transpose:  # from the forward's CSR when it is there: half the time of a dense t()
                fwd = self._entries.get(False)
                if fwd and _same_values(fwd[0], fwd[1], images):
                    csr = fwd[2].t().to_sparse_csr()
                elif self._build is None:
                    csr = images.t().to_sparse_csr()
                else:
                    csr = self._build(images).t().to_sparse_csr()
            else:
                csr = images.to_sparse_csr() if self._build is None else self._build(images)
        self._entries[transpose] = (images, version, csr)
        return csr


def _same_values(cached: torch.Tensor, version: int, images: torch.Tensor) -> bool:
    """Whether `images` are the `cached` tensor, unwritten since its version was `version`.

    The version is the one read when the entry was built: `cached` is a live reference, so its
    own counter moves with every write and cannot be compared with `images`' counter.
    """
    return (
        cached.untyped_storage()._cdata == images.untyped_storage()._cdata
        and cached.data_ptr() == images.data_ptr()
        and images._version == version
        and cached.shape == images.shape
        and cached.stride() == images.stride()
        and cached.dtype == images.dtype
        and cached.device == images.device
    )


_CSR = CsrCache()


@torch.library.custom_op("air::sparse_projection", mutates_args=())
def sparse_projection(
    images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """`bias + images @ weight` computed from the CSR form of `images` (nnz-bound)."""
    return torch.addmm(bias, _CSR.get(images, transpose=False), weight)


@torch.library.custom_op("air::sparse_weight_grad", mutates_args=())
def sparse_weight_grad(images: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """`images^T @ grad` from the CSR form of `images^T`: the projection's weight gradient."""
    # Written straight into a fresh buffer with beta=0: torch.sparse.mm zero-fills a temporary
    # and copies it out, which measured 3x slower than the product itself at 2500 x 1024.
    out = grad.new_empty(images.shape[1], grad.shape[1])
    return torch.addmm(out, _CSR.get(images, transpose=True), grad, beta=0, out=out)


@sparse_projection.register_fake
def _(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return images.new_empty(images.shape[0], weight.shape[1])


@sparse_weight_grad.register_fake
def _(images: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return grad.new_empty(images.shape[1], grad.shape[1])


def _projection_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    ctx.save_for_backward(inputs[0])


def _projection_backward(ctx, grad):  # noqa: ANN001, ANN202
    (images,) = ctx.saved_tensors
    return None, sparse_weight_grad(images, grad), grad.sum(0)  # no gradient for the images


sparse_projection.register_autograd(_projection_backward, setup_context=_projection_setup)


# ----------------------------------------------------------------------- the seed axis (vmap)
def block_diagonal_csr(images: torch.Tensor) -> torch.Tensor:
    """(S, B, P) dense images -> the (S*B, S*P) CSR matrix whose block s is images[s]."""
    s, b, p = images.shape
    csr = images.reshape(s * b, p).to_sparse_csr()
    crow, col = csr.crow_indices(), csr.col_indices()
    row_block = torch.arange(s * b, device=images.device) // b
    shift = torch.repeat_interleave(row_block * p, crow.diff(), output_size=col.numel())
    return torch.sparse_csr_tensor(crow, col + shift, csr.values(), (s * b, s * p),
                                   check_invariants=False)  # fmt: skip


_BLOCKS = CsrCache(block_diagonal_csr)


@torch.library.custom_op("air::sparse_projection_stacked", mutates_args=())
def sparse_projection_stacked(
    images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """(S, B, 4H) = `bias[s] + images[s] @ weight[s]` for every s, as one sparse product."""
    s, b, p = images.shape
    out = torch.mm(_BLOCKS.get(images, transpose=False), weight.reshape(s * p, -1))
    return out.view(s, b, -1) + bias.unsqueeze(1)


@torch.library.custom_op("air::sparse_weight_grad_stacked", mutates_args=())
def sparse_weight_grad_stacked(images: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """(S, P, 4H) = `images[s]^T @ grad[s]` for every s, as one sparse product."""
    s, b, p = images.shape
    out = grad.new_empty(s * p, grad.shape[-1])
    torch.addmm(out, _BLOCKS.get(images, transpose=True), grad.reshape(s * b, -1), beta=0,
                out=out)  # fmt: skip
    return out.view(s, p, -1)


@sparse_projection_stacked.register_fake
def _(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return images.new_empty(images.shape[0], images.shape[1], weight.shape[-1])


@sparse_weight_grad_stacked.register_fake
def _(images: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return grad.new_empty(images.shape[0], images.shape[2], grad.shape[-1])


def _stacked_backward(ctx, grad):  # noqa: ANN001, ANN202
    (images,) = ctx.saved_tensors
    return None, sparse_weight_grad_stacked(images, grad), grad.sum(1)


sparse_projection_stacked.register_autograd(_stacked_backward, setup_context=_projection_setup)


def _seed_axis_first(tensors: tuple, in_dims: tuple, size: int) -> list[torch.Tensor]:
    """Each tensor with its vmapped axis first (broadcast along it where it has none)."""
    return [
        t.unsqueeze(0).expand(size, *t.shape) if d is None else t.movedim(d, 0)
        for t, d in zip(tensors, in_dims, strict=True)
    ]


def _projection_vmap(info, in_dims, images, weight, bias):  # noqa: ANN001, ANN202
    return sparse_projection_stacked(*_seed_axis_first((images, weight, bias), in_dims,
                                                       info.batch_size)), 0  # fmt: skip


def _weight_grad_vmap(info, in_dims, images, grad):  # noqa: ANN001, ANN202
    return sparse_weight_grad_stacked(*_seed_axis_first((images, grad), in_dims,
                                                        info.batch_size)), 0  # fmt: skip


sparse_projection.register_vmap(_projection_vmap)
sparse_weight_grad.register_vmap(_weight_grad_vmap)
