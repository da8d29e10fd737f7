"""A seed group's evaluations, periodic and final, vectorised over the seeds.

`bench.evaluate.evaluate` makes a fixed sequence of forward passes per batch of test images (a
mode pass, a sampled pass, for relaxed-presence models a relaxed pass, then the bound's passes),
drawing its noise from a stream seeded with the run's evaluation seed. Here every seed's noise is
drawn from its own seeded stream, in that order, and each pass runs once for all seeds under
vmap on the stacked parameters; `evaluate` itself runs per seed (`Trainer.evaluate`, in a thread
of its own) on a stand-in model that answers each of its forward calls with that seed's trace of
the pass. Every metric is computed by `evaluate`'s own code, so a seed's metrics are its separate
run's (to float rounding); the stand-in checks that the calls come in the order they were
computed for.

The passes are streamed, not stored: a pass is handed to every seed's `evaluate` when each has
asked for it, so at most two passes per seed are held at once (the final evaluation's bound
alone is K x 10k images of traces per seed by default: far too many to keep). Noise is drawn
only while every seed's `evaluate` is waiting for its next pass, so no thread touches the global
random state while another uses it, and the caller's random state is restored afterwards.

Seeds are evaluated in chunks of at most `seeds_per_chunk` (one vmapped pass holds at most
`PASS_IMAGES` images x samples over its seeds).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn
from torch.func import functional_call, vmap

from bench.evaluate import to_float_images
from bench.scoring import discrete_view
from implementations.core.model import AIR, Noise, Trace

if TYPE_CHECKING:
    from bench.seedgroup import SeedGroup
    from bench.trainer import Trainer

_FIELDS = [f.name for f in dataclasses.fields(Trace) if f.name != "extras"]

# Most images x samples one vmapped pass holds over all its seeds. A pass of `evaluate` holds
# at most max(eval.batch_size, K) images x samples per seed (its bound's passes take
# batch_size // K images x K samples), so a chunk has PASS_IMAGES // max(batch_size, K) seeds:
# 32 at the default batch of 500. A pass's trace is ~11 kB per image (the canvas), its
# transient activations a few times that: ~2 GB at the budget (an estimate: no GPU was lent).
PASS_IMAGES = 16384


def seeds_per_chunk(batch_size: int, iw_samples: int) -> int:
    """How many seeds one vectorised evaluation pass takes (see PASS_IMAGES)."""
    return max(1, PASS_IMAGES // max(batch_size, iw_samples, 1))


class Stacked(Protocol):
    """What the evaluation needs of a group: the seeds' trainers (each at its iteration), the
    loss template (model and estimator under the stacked tensors' names) and the stacked
    parameters and buffers, seed j's at index j. `GroupLoop` is one; `StackedSeeds` another."""

    trainers: list[Trainer]
    device: torch.device
    template: Any
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]


@dataclasses.dataclass
class StackedSeeds:
    """A stacked view of finished trainers (for the final evaluation, after the loop ended)."""

    trainers: list[Trainer]
    device: torch.device
    template: Any
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]

    @classmethod
    def of(cls, group: SeedGroup, members: list[int]) -> StackedSeeds:
        """The members' current parameters (each trainer's own), stacked afresh."""
        template = group.loss_template()
        params, buffers = group.stack_members(members, template)
        trainers = [group.trainers[i] for i in members]
        return cls(trainers, group.device, template, params, buffers)


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


_END = object()  # no more passes: the plan is done (or the evaluation was abandoned)


class _Channel:
    """One seed's passes, from the computing thread to its `evaluate` (shared by a `_Replay`
    and its shallow copies: `discrete_view` copies the model it is given)."""

    def __init__(self, cond: threading.Condition) -> None:
        self.inbox: queue.Queue = queue.Queue()
        self.cond = cond
        self.asked = 0  # forward calls `evaluate` has made
        self.done = False  # its `evaluate` has returned or raised
        self.result: dict | None = None
        self.error: BaseException | None = None


class _Replay:
    """Stands in for one seed's model inside `evaluate`: each forward call returns the next
    computed trace, after checking it is the pass that trace was computed for."""

    training = False

    def __init__(self, model: AIR, channel: _Channel) -> None:
        self.cfg = model.cfg
        self._model = model
        self.channel = channel

    def parameters(self) -> Any:
        return self._model.parameters()

    def eval(self) -> _Replay:
        return self

    def train(self, mode: bool = True) -> _Replay:
        return self

    def __call__(self, x: torch.Tensor, prior_prob: Any, sample: bool = True) -> Trace:
        ch = self.channel
        with ch.cond:
            ch.asked += 1
            ch.cond.notify_all()
        item = ch.inbox.get()
        if item is _END:
            raise RuntimeError("bench/group_eval.py: evaluate made more passes than computed")
        expected_sample, batch, trace = item
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


def evaluate_seeds(
    loop: Stacked,
    js: Sequence[int],
    n_images: int | None = None,
    iw_samples: int | None = None,
    iw_images: int | None = None,
    test: Any = None,
) -> list[dict]:
    """`Trainer.evaluate(n_images, iw_samples, iw_images, test)` of the seeds `js` of `loop`
    (seed j's trainer and its slice j of the stacked tensors; all at one iteration), one
    vectorised pass per pass of `evaluate`, in chunks of `seeds_per_chunk` seeds.

    Defaults: the periodic evaluation (`Trainer.record_evaluation`'s: train.eval_images images,
    K = eval.periodic_iw_samples, on the run's own test set). The final one is
    `evaluate_seeds(stacked, js, eval.final_images, eval.iw_samples, eval.iw_images)`.
    """
    js = list(js)
    if not js:
        return []
    cfg = loop.trainers[js[0]].cfg
    n_images = cfg.train.eval_images if n_images is None else n_images
    k = cfg.eval.periodic_iw_samples if iw_samples is None else iw_samples
    iterations = {loop.trainers[j].iteration for j in js}
    if len(iterations) != 1:
        raise ValueError(f"evaluate_seeds: seeds {js} are at iterations {sorted(iterations)}")
    chunk = seeds_per_chunk(cfg.eval.batch_size, k)
    out: list[dict] = []
    for c in range(0, len(js), chunk):
        out += _evaluate_chunk(loop, js[c : c + chunk], n_images, k, iw_images, test)
    return out


def _evaluate_chunk(
    loop: Stacked, js: list[int], n_images: int, k: int, iw_images: int | None, test: Any
) -> list[dict]:
    trainers = [loop.trainers[j] for j in js]
    first = trainers[0]
    cfg, device = first.cfg, loop.device
    test = first.data.test if test is None else test
    n = min(n_images, len(test))
    n_iw = n if iw_images is None else min(iw_images, n)
    plan = _plan(n, cfg.eval.batch_size, cfg.model.presence != "bernoulli", k, n_iw)
    prior = first.prior_prob(first.iteration)
    images = to_float_images(test.images[:n], device)
    index = torch.tensor(js, device=device)
    params = {name: p.detach().index_select(0, index) for name, p in loop.params.items()}
    buffers = {name: b.index_select(0, index) for name, b in loop.buffers.items()}
    passes = _Passes(loop.template.model, loop.template.estimator)
    cond = threading.Condition()
    channels = [_Channel(cond) for _ in trainers]
    models = [t.model for t in trainers]
    threads = []
    for trainer, model, ch in zip(trainers, models, channels, strict=True):
        trainer.model = _Replay(model, ch)  # type: ignore[assignment]
        args = (trainer, ch, n_images, k, iw_images, test)
        threads.append(threading.Thread(target=_run_evaluate, args=args, daemon=True))
    devices = [device] if device.type == "cuda" else []
    was_training = passes.training
    passes.eval()
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        try:
            streams = [_stream(t.cfg.seed + 7919, device) for t in trainers]
            for thread in threads:
                thread.start()
            _stream_passes(plan, channels, streams, passes, images, params, buffers, prior)
        finally:
            for ch in channels:  # the end of the plan, or an error: no evaluate waits on
                ch.inbox.put(_END)
            for thread in threads:
                if thread.ident is not None:  # started
                    thread.join()
            for trainer, model in zip(trainers, models, strict=True):
                trainer.model = model
            passes.train(was_training)
    for ch in channels:
        if ch.error is not None:
            raise ch.error
        if ch.asked != len(plan):
            raise RuntimeError(
                f"bench/group_eval.py: evaluate made {ch.asked} passes where {len(plan)} were "
                "computed; its passes changed: update the plan in group_eval.py"
            )
    return [ch.result for ch in channels]  # type: ignore[misc]


def _stream_passes(
    plan: list[tuple], channels: list[_Channel], streams: list[dict], passes: _Passes,
    images: torch.Tensor, params: dict, buffers: dict, prior: float,
) -> None:  # fmt: skip
    """Compute each pass of `plan` for every seed and hand each seed its trace, drawing noise
    only while every evaluate waits for its next pass (see the module's docstring)."""
    device = images.device

    def compute(p: int, noises: list | None) -> dict[str, torch.Tensor]:
        start, stop, repeats, sample, relaxed_pass = plan[p]
        x = images[start:stop].repeat(repeats, 1, 1)

        def one(params, buffers, noise):  # noqa: ANN001, ANN202
            args = (x, prior, sample, relaxed_pass, noise)
            return functional_call(passes, (params, buffers), args)

        stacked = _stack(noises) if noises is not None else None
        return vmap(one, in_dims=(0, 0, 0 if sample else None))(params, buffers, stacked)

    if not plan:
        return
    _wait_for(channels, 1)
    noises = _draw_all(streams, plan[0], passes.model, device)
    for p, (start, stop, repeats, sample, _) in enumerate(plan):
        fields = compute(p, noises)
        _wait_for(channels, p + 1)  # each has asked for pass p (and is done with pass p - 1)
        if p + 1 < len(plan):
            noises = _draw_all(streams, plan[p + 1], passes.model, device)
        for c, ch in enumerate(channels):
            own = {key: v[c] for key, v in fields.items()}
            trace = Trace(**{f: own.get(f) for f in _FIELDS}, extras={})
            ch.inbox.put((sample, (stop - start) * repeats, trace))
        del fields  # each seed's trace of pass p is its evaluate's now


def _run_evaluate(
    trainer: Trainer, ch: _Channel, n: int, k: int, iw_images: int | None, test: Any
) -> None:
    try:
        ch.result = trainer.evaluate(n, k, iw_images, test=test)
    except BaseException as err:  # handed to the computing thread, which raises it
        ch.error = err
    finally:
        with ch.cond:
            ch.done = True
            ch.cond.notify_all()


def _wait_for(channels: list[_Channel], asked: int) -> None:
    """Wait until every seed's evaluate has asked for its `asked`-th pass (or has ended); an
    evaluate that ended early or failed ends the evaluation with its error."""
    cond = channels[0].cond
    with cond:
        cond.wait_for(lambda: all(ch.done or ch.asked >= asked for ch in channels))
    for ch in channels:
        if ch.error is not None:
            raise ch.error
        if ch.done and ch.asked < asked:
            raise RuntimeError(
                f"bench/group_eval.py: evaluate made {ch.asked} passes where more were "
                "computed; its passes changed: update the plan in group_eval.py"
            )


def _stream(seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The random state `evaluate` draws from: torch.manual_seed(seed)'s (CPU, and the CUDA
    device's when it runs there)."""
    torch.manual_seed(seed)
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _draw_all(
    streams: list[dict], step: tuple, model: AIR, device: torch.device
) -> list[tuple] | None:
    """Each seed's noise for one pass of the plan, from its own stream (None: a mode pass)."""
    start, stop, repeats, sample, _ = step
    if not sample:
        return None
    out = []
    for state in streams:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], device)
        noise = AIR.draw_noise(model, (stop - start) * repeats, device, torch.float32)
        state["cpu"] = torch.get_rng_state()
        if "cuda" in state:
            state["cuda"] = torch.cuda.get_rng_state(device)
        out.append((noise.pres, noise.where, noise.what))
    return out


def _stack(per_seed: list[tuple]) -> tuple:
    return tuple(torch.stack([s[i] for s in per_seed]) for i in range(3))
