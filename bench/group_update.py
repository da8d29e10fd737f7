"""A seed group's per-seed gradient clipping and Adam.

The reference is `SeedAdam`, which runs torch's fused Adam kernel once per seed and parameter
group, after `clip_per_seed`, one norm and one scaling per tensor: a few dozen
kernel launches and a Python loop over the seeds every iteration, which on a GPU cost more than
the arithmetic. `VectorUpdate` does the same maths for every seed at once, as plain tensor ops
over the stacked tensors (the seed axis leads), with the skip of a frozen (diverged) seed as a
mask; with `train.compile_update=true` the whole update is one `torch.compile`d function (on
CUDA in mode "reduce-overhead", i.e. captured as a CUDA graph where inductor allows; untested on
a GPU here). The state it updates is `SeedAdam`'s own (`exp_avg`, `exp_avg_sq`, `step` per
parameter), so checkpoints, resumes and `SeedGroup.sync_seed` are unchanged.

Per seed s, with g the gradient, n_s its global norm over every tensor and c the clip norm:

    g <- g * min(1, c / (n_s + 1e-6))                     (torch.nn.utils.clip_grad_norm_)
    t <- t + 1;  m <- m + (1 - b1)(g - m);  v <- b2 v + (1 - b2) g^2
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)      (torch's Adam)

and nothing changes for a frozen seed (its step count included). Equal to `SeedAdam` up to float
rounding (tests/test_group_update.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.adam import adam

from bench.train_setup import device_options


class SeedAdam:
    """S independent Adams over tensors stacked along a leading seed axis.

    Each seed's update is torch's fused Adam kernel on its own slice, with its own step count,
    so a seed's numbers are those of `torch.optim.Adam(fused=True)` on its separate run; a seed
    is skipped by a flag read on the device (`found_inf`), so skipping needs no host sync.
    `state[p]` holds `exp_avg`, `exp_avg_sq` (stacked) and `step` (S,), per parameter `p`.
    """

    def __init__(self, groups: list[dict], n_seeds: int) -> None:
        defaults = torch.optim.Adam(groups, fused=True).param_groups  # torch's defaults filled
        self.param_groups = defaults
        self.n_seeds = n_seeds
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p] = {
                    "step": torch.zeros(n_seeds, dtype=torch.float32, device=p.device),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }

    def zero_grad(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self, skip: torch.Tensor) -> None:
        """One Adam step per seed; `skip` (S,) float: 1.0 leaves that seed untouched."""
        for group in self.param_groups:
            live = [p for p in group["params"] if p.grad is not None]
            if not live:
                continue
            states = [self.state[p] for p in live]
            per_seed = [
                [t.unbind(0) for t in (p.detach() for p in live)],
                [p.grad.unbind(0) for p in live],
                [s["exp_avg"].unbind(0) for s in states],
                [s["exp_avg_sq"].unbind(0) for s in states],
                [s["step"].unbind(0) for s in states],
            ]
            beta1, beta2 = group["betas"]
            for j in range(self.n_seeds):
                params, grads, avgs, sqs, steps = ([t[j] for t in ts] for ts in per_seed)
                adam(params, grads, avgs, sqs, [], steps, fused=True, found_inf=skip[j],
                     amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"],
                     weight_decay=group["weight_decay"], eps=group["eps"],
                     maximize=group["maximize"])  # fmt: skip


def clip_per_seed(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Clip each seed's gradient by its own global norm, as clip_grad_norm_ does per run."""
    grads = [p.grad for p in params if p.grad is not None]
    per_tensor = torch.stack([g.flatten(1).norm(dim=1) for g in grads])  # (n_tensors, S)
    norms = per_tensor.norm(dim=0)
    if max_norm:
        coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.view(-1, *([1] * (g.ndim - 1))))
    return norms


def mark_static(tensors: list[torch.Tensor]) -> None:
    """Mark tensors that keep their address from step to step (parameters updated in place,
    Adam's moments and step counts) as static for CUDA graphs ("reduce-overhead"): without it
    inductor copies them into the graph's memory every replay, or skips the CUDA graph because
    inputs are mutated. As torch's compiled optimisers do; gradients (fresh each step) are not."""
    for tensor in tensors:
        torch._dynamo.mark_static_address(tensor)


def clip_and_adam(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    avgs: list[torch.Tensor],
    sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    losses: torch.Tensor,
    frozen: torch.Tensor,
    hyper: list[tuple[float, float, float, float]],
    max_norm: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip every seed's gradient by its own norm, then one Adam step per live seed, in place.

    Args:
        params, grads, avgs, sqs: stacked (S, ...) tensors, one entry per parameter.
        steps: (S,) float step counts, one per parameter.
        losses: (S,) this iteration's losses: a seed whose loss or gradient norm is not finite
            is frozen from this iteration on.
        frozen: (S,) bool, seeds frozen before; a frozen seed is left exactly as it is.
        hyper: per parameter (lr, beta1, beta2, eps).
        max_norm: the clip norm; None or 0: no clipping (the norm is still returned).

    Returns:
        (S,) each seed's gradient norm before clipping, and (S,) bool: frozen after this step.
    """
    n_seeds = frozen.shape[0]
    squares = torch.stack([g.reshape(n_seeds, -1).pow(2).sum(1) for g in grads])
    norms = squares.sum(0).sqrt()
    frozen = frozen | ~(torch.isfinite(losses) & torch.isfinite(norms))
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0) if max_norm else None
    live = ~frozen
    for p, g, m, v, t, (lr, b1, b2, eps) in zip(
        params, grads, avgs, sqs, steps, hyper, strict=True
    ):
        shape = (n_seeds,) + (1,) * (p.ndim - 1)
        on = live.view(shape)
        t_new = t + live.to(t.dtype)
        # A frozen seed's gradient may be NaN: zeroed first, then its rates are 0 (no change).
        g = torch.where(on, g, 0.0) if coef is None else torch.where(on, g * coef.view(shape), 0.0)
        rate1 = ((1 - b1) * live).view(shape)
        rate2 = ((1 - b2) * live).view(shape)
        m.add_((g - m) * rate1)
        v.add_((g * g - v) * rate2)
        t_bias = t_new.clamp(min=1)  # a seed frozen before its first step: no 0/0
        step = (lr / (1 - b1**t_bias) * live).view(shape)  # 0 for a frozen seed
        bc2_sqrt = (1 - b2**t_bias).sqrt().view(shape)
        p.sub_(step * m / (v.sqrt() / bc2_sqrt + eps))
        t.copy_(t_new)
    return norms, frozen


def adam_entries(
    optimiser: Any, switch: str
) -> list[tuple[torch.Tensor, tuple[float, float, float, float]]]:
    """(parameter, (lr, beta1, beta2, eps)) of every parameter of `optimiser`'s groups, in
    order: what `clip_and_adam` needs. Adam options it does not implement are an error naming
    `switch`, the setting that asked for it."""
    entries = []
    for group in optimiser.param_groups:
        if group["amsgrad"] or group["weight_decay"] or group["maximize"]:
            raise ValueError(
                f"{switch} supports plain Adam only (no amsgrad, weight_decay, maximize); "
                f"parameter group {group.get('name', '?')!r} has them"
            )
        b1, b2 = group["betas"]
        for p in group["params"]:
            entries.append((p, (float(group["lr"]), float(b1), float(b2), group["eps"])))
    return entries


class VectorUpdate:
    """Clipping and Adam of a seed group as one call, over `SeedAdam`'s state."""

    def __init__(self, optimiser: Any, max_norm: float | None, compiled: bool) -> None:
        self.optimiser = optimiser
        self.max_norm = max_norm
        self.entries = adam_entries(optimiser, "train.compile_update")
        # The same views of the parameters every call (they are updated in place): a CUDA graph
        # may treat them, and Adam's state, as static addresses only then.
        self.detached = {id(p): p.detach() for p, _ in self.entries}
        self._fn = clip_and_adam
        self.compiled = compiled
        if compiled:
            device = self.entries[0][0].device if self.entries else torch.device("cpu")
            if device.type == "cuda":  # torch.compile takes a mode or options, not both
                state = optimiser.state
                mark_static([*self.detached.values()] + [state[p][k] for p, _ in self.entries
                             for k in ("exp_avg", "exp_avg_sq", "step")])  # fmt: skip
                self._fn = torch.compile(clip_and_adam, mode="reduce-overhead")
            else:
                self._fn = torch.compile(clip_and_adam, options=device_options(device))

    @torch.no_grad()
    def __call__(
        self, losses: torch.Tensor, frozen: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip and step every seed (a frozen one, or one whose loss or gradient norm is not
        finite now, untouched): (S,) gradient norms before clipping, (S,) frozen after."""
        live = [(p, h) for p, h in self.entries if p.grad is not None]
        state = self.optimiser.state
        return self._fn(
            [self.detached[id(p)] for p, _ in live],
            [p.grad for p, _ in live],
            [state[p]["exp_avg"] for p, _ in live],
            [state[p]["exp_avg_sq"] for p, _ in live],
            [state[p]["step"] for p, _ in live],
            losses,
            frozen,
            [h for _, h in live],
            self.max_norm,
        )
