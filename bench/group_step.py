"""A seed group's whole training step (loss, backward, per-seed clipping, Adam) as one function,
compiled into one graph with `train.compile_step=true`.

The reference step (bench/group_loop.py) is three pieces: the vectorised loss (compiled with
`train.compile`), autograd's backward through it, and the update (`SeedAdam`, or one compiled
call with `train.compile_update`). Here the gradients come from `torch.func` instead
(`vmap(grad(loss))`: each seed's gradient of its own loss), so the loss, its backward,
`clip_and_adam` and the divergence flags trace into one graph; on CUDA it is compiled in mode
"reduce-overhead" (one CUDA graph per step where inductor allows, the parameters and Adam
moments marked as static addresses). On a GPU that is the point: one launch instead of
hundreds. It is untested there (no GPU was lent); on CPU it equals the reference step to float
tolerance (tests/test_group_step.py) and is no faster.

Two rules keep it equal to the reference:
- the parameters Adam steps are exactly those the reference's backward gave a gradient to
  (torch.func gives every parameter one, zeros for an unused one, and Adam would move a
  parameter on zeros), so the loop's first iteration runs the reference step and names them;
- the image projection is dense: the sparse product is a custom op with its own backward, which
  `torch.func.grad` cannot differentiate. On GPUs it is dense anyway.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.func import grad, vmap

from bench.group_update import adam_entries, clip_and_adam, mark_static
from bench.train_setup import device_options

if TYPE_CHECKING:
    from bench.group_update import SeedAdam
    from bench.seedgroup import SeedGroup


class WholeStep:
    """Every seed's loss, gradient, clipping and Adam step in one call (compiled if asked)."""

    def __init__(
        self,
        group: SeedGroup,
        params: dict[str, torch.Tensor],
        optimiser: SeedAdam,
        stepped: list[str],
        compiled: bool,
    ) -> None:
        """`stepped`: the names of the parameters the reference step gave a gradient to."""
        template = group.loss_template(dense=True)
        functional = group.functional_loss(template)
        by_id = {id(p): name for name, p in params.items()}
        hyper = {by_id[id(p)]: h for p, h in adam_entries(optimiser, "train.compile_step")}
        unknown = sorted(set(stepped) - hyper.keys())
        if unknown:
            raise ValueError(f"parameters {unknown} are in no optimiser group")
        moved = set(stepped)
        self.names = [n for n in params if n in moved]
        self.hyper = [hyper[n] for n in self.names]
        self.max_norm = group.cfg.train.grad_clip
        self.compiled = compiled

        def seed_loss(p: dict, b: dict, x: torch.Tensor, noise: list, prior: Any) -> tuple:
            loss, logs = functional(p, b, x, noise, prior)
            return loss, (loss.detach(), {k: v.detach() for k, v in logs.items()})

        gradients = vmap(grad(seed_loss, has_aux=True), in_dims=(0, 0, 0, 0, None))

        def step(
            p: dict, b: dict, avgs: list, sqs: list, steps: list, x: torch.Tensor,
            noises: list, prior: Any, frozen: torch.Tensor,
        ) -> tuple:  # fmt: skip
            grads, (losses, logs) = gradients(p, b, x, noises, prior)
            live = [p[n] for n in self.names]
            norms, frozen_now = clip_and_adam(live, [grads[n] for n in self.names], avgs, sqs,
                                              steps, losses, frozen, self.hyper,
                                              self.max_norm)  # fmt: skip
            return losses, logs, norms, frozen_now

        # The very same tensor objects every call (views of the parameters, which they update
        # in place; Adam's state): a CUDA graph may treat them as static addresses only then.
        self.detached = {n: p.detach() for n, p in params.items()}
        state = [optimiser.state[params[n]] for n in self.names]
        self.adam_state = {k: [s[k] for s in state] for k in ("exp_avg", "exp_avg_sq", "step")}
        self._fn: Any = step
        if compiled:
            device = next(iter(params.values())).device
            if device.type == "cuda":  # torch.compile takes a mode or options, not both
                mark_static([*self.detached.values(),
                             *(t for ts in self.adam_state.values() for t in ts)])  # fmt: skip
                self._fn = torch.compile(step, mode="reduce-overhead")
            else:
                self._fn = torch.compile(step, options=device_options(device))

    @torch.no_grad()
    def __call__(
        self,
        buffers: dict[str, torch.Tensor],
        x: torch.Tensor,
        noises: list[tuple],
        prior: torch.Tensor,
        frozen: torch.Tensor,
    ) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
        """One step of every seed: (S,) losses, logs {name: (S,)}, (S,) gradient norms before
        clipping, (S,) bool frozen after it (a frozen seed, or one whose loss or gradient norm
        is not finite now, is left untouched)."""
        # Under no_grad: torch.func.grad ignores an outer no_grad, and nothing else records.
        return self._fn(
            self.detached,
            buffers,
            self.adam_state["exp_avg"],
            self.adam_state["exp_avg_sq"],
            self.adam_state["step"],
            x,
            noises,
            prior,
            frozen,
        )
