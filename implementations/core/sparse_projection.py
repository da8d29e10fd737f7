"""The image projection as a sparse product: multi-MNIST canvases are ~95 % zeros, so on CPU the
model's largest matrix product (images x 2500 -> 4H, `ImageLSTM.project`) runs from the CSR
form of the images, forward and backward (`ModelConfig.sparse_images`).

The two products are custom ops rather than an autograd.Function: torch.compile cannot trace
sparse tensors, but it can call an opaque op, so the whole loss still compiles into one graph
(`train.compile`). An op takes only tensors, so the CSR forms it needs are memoised here,
keyed by the images they were built from (`CsrCache`).
"""

from __future__ import annotations

import warnings

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

    def __init__(self) -> None:
        # transpose -> (images, their version counter when the entry was built, CSR form)
        self._entries: dict[bool, tuple[torch.Tensor, int, torch.Tensor]] = {}

    def get(self, images: torch.Tensor, transpose: bool) -> torch.Tensor:
        """The CSR form of `images` (of `images.t()` if `transpose`), built once per batch."""
        hit = self._entries.get(transpose)
        if hit is not None and _same_values(hit[0], hit[1], images):
            return hit[2]
        version = images._version
        with warnings.catch_warnings():  # "CSR support is in beta": the two products used
            warnings.simplefilter("ignore")  # here are checked against dense ones in tests
            if transpose:  # from the forward's CSR when it is there: half the time of a dense t()
                fwd = self._entries.get(False)
                source = fwd[2].t() if fwd and _same_values(fwd[0], fwd[1], images) else None
                csr = (source if source is not None else images.t()).to_sparse_csr()
            else:
                csr = images.to_sparse_csr()
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
