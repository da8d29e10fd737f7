"""A seed group's periodic evaluation, vectorised over the seeds.

`bench.evaluate.evaluate` makes a fixed sequence of forward passes per batch of test images (a
mode pass, a sampled pass, for relaxed-presence models a relaxed pass, then the bound's passes),
drawing its noise from a stream seeded with the run's evaluation seed. Here every seed's noise is
drawn from its own seeded stream, in that order, and each pass runs once for all seeds under
vmap on the stacked parameters; then `evaluate` itself runs per seed on a stand-in model that
answers each of its forward calls with that seed's precomputed trace. Every metric is computed by
`evaluate`'s own code, so a seed's periodic metrics are its separate run's (to float rounding);
the stand-in checks that the calls come in the order they were computed for.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from bench.evaluate import to_float_images
from bench.scoring import discrete_view
from implementations.core.model import AIR, Noise, Trace

if TYPE_CHECKING:
    from bench.group_loop import GroupLoop
    from bench.trainer import Trainer

_FIELDS = [f.name for f in dataclasses.fields(Trace) if f.name != "extras"]


class _Passes(nn.Module):
    """The template's model under the loss module's parameter names, for functional_call."""

    def __init__(self, model: AIR, estimator: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.estimator = estimator

    def forward(
        self, x: torch.Tensor, prior: float, sample: bool, relaxed: bool, noise: tuple | None
    ) -> dict[str, torch.Tensor]:
        model = self.model if relaxed else discrete_view(self.model)
        trace = model(x, prior, sample=sample, noise=None if noise is None else Noise(*noise))
        return {k: getattr(trace, k) for k in _FIELDS if getattr(trace, k) is not None}


class _Replay:
    """Stands in for one seed's model inside `evaluate`: each forward call returns the next
    precomputed trace, after checking it is the pass that trace was computed for."""

    training = False

    def __init__(self, model: AIR, calls: list[tuple[bool, int, Trace]]) -> None:
        self.cfg = model.cfg
        self._model = model
        self.calls = calls

    def parameters(self) -> Any:
        return self._model.parameters()

    def eval(self) -> _Replay:
        return self

    def train(self, mode: bool = True) -> _Replay:
        return self

    def __call__(self, x: torch.Tensor, prior_prob: Any, sample: bool = True) -> Trace:
        if not self.calls:
            raise RuntimeError("bench/group_eval.py: evaluate made more passes than computed")
        expected_sample, batch, trace = self.calls.pop(0)
        if (expected_sample, batch) != (sample, x.shape[0]):
            raise RuntimeError(
                f"bench/group_eval.py: evaluate asked for a pass (sample={sample}, batch "
                f"{x.shape[0]}) where (sample={expected_sample}, batch {batch}) was computed; "
                "its passes changed: update the plan in group_eval.py"
            )
        return trace

    def boxes(self, trace: Trace) -> torch.Tensor:
        return AIR.boxes(self, trace)  # type: ignore[arg-type]

    def present_boxes(self, trace: Trace) -> list[torch.Tensor]:
        return AIR.present_boxes(self, trace)  # type: ignore[arg-type]


def _plan(n: int, batch_size: int, relaxed: bool, k: int, n_iw: int) -> list[tuple]:
    """`evaluate`'s passes in call order: (start, stop, repeats, sample, relaxed)."""
    plan = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        plan += [(start, stop, 1, False, False), (start, stop, 1, True, False)]
        if relaxed:
            plan.append((start, stop, 1, True, True))
    if k > 0:
        per_batch = max(1, batch_size // k)
        for start in range(0, n_iw, per_batch):
            plan.append((start, min(start + per_batch, n_iw), k, True, False))
    return plan


def evaluate_seeds(loop: GroupLoop, js: list[int]) -> list[dict]:
    """The periodic evaluation (`Trainer.record_evaluation`'s) of the loop's seeds `js`,
    whose trainers are at the loop's iteration: one vectorised pass per pass of `evaluate`."""
    trainers: list[Trainer] = [loop.trainers[j] for j in js]
    first = trainers[0]
    cfg, device = first.cfg, loop.device
    test = first.data.test
    n = min(cfg.train.eval_images, len(test))
    k = cfg.eval.periodic_iw_samples
    relaxed = cfg.model.presence != "bernoulli"
    plan = _plan(n, cfg.eval.batch_size, relaxed, k, n)
    prior = first.prior_prob(first.iteration)
    images = to_float_images(test.images[:n], device)
    noises = [_draw(loop, t.cfg.seed + 7919, plan) for t in trainers]
    index = torch.tensor(js, device=device)
    params = {name: p.detach().index_select(0, index) for name, p in loop.params.items()}
    buffers = {name: b.index_select(0, index) for name, b in loop.buffers.items()}
    passes = _Passes(loop.template.model, loop.template.estimator)
    calls: list[list[tuple[bool, int, Trace]]] = [[] for _ in trainers]
    was_training = passes.training
    passes.eval()
    try:
        with torch.no_grad():
            for p, (start, stop, repeats, sample, relaxed_pass) in enumerate(plan):
                x = images[start:stop].repeat(repeats, 1, 1)

                def one(params, buffers, noise, x=x, sample=sample, relaxed_pass=relaxed_pass):  # noqa: ANN001, ANN202
                    args = (x, prior, sample, relaxed_pass, noise)
                    return functional_call(passes, (params, buffers), args)

                stacked = _stack([s[p] for s in noises]) if sample else None
                fields = vmap(one, in_dims=(0, 0, 0 if sample else None))(params, buffers, stacked)
                for c, seed_calls in enumerate(calls):
                    own = {key: v[c] for key, v in fields.items()}
                    trace = Trace(**{f: own.get(f) for f in _FIELDS}, extras={})
                    seed_calls.append((sample, len(x), trace))
    finally:
        passes.train(was_training)
    results = []
    for trainer, seed_calls in zip(trainers, calls, strict=True):
        model = trainer.model
        trainer.model = _Replay(model, seed_calls)  # type: ignore[assignment]
        try:
            results.append(trainer.evaluate(cfg.train.eval_images, k))
        finally:
            trainer.model = model
        if seed_calls:
            raise RuntimeError("bench/group_eval.py: evaluate made fewer passes than computed")
    return results


def _draw(loop: GroupLoop, seed: int, plan: list[tuple]) -> list[tuple | None]:
    """The noise `evaluate` draws with `seed`, per pass of `plan` (None for mode passes)."""
    device = loop.device
    model = loop.template.model
    out: list[tuple | None] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start, stop, repeats, sample, _ in plan:
            if not sample:
                out.append(None)
                continue
            noise = AIR.draw_noise(model, (stop - start) * repeats, device, torch.float32)
            out.append((noise.pres, noise.where, noise.what))
    return out


def _stack(per_seed: list[tuple | None]) -> tuple:
    return tuple(torch.stack([s[i] for s in per_seed]) for i in range(3))  # type: ignore[index]
