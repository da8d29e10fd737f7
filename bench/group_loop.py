"""The seed-group training loop: S seeds' iterations as device work, the host told only at
evaluations, checkpoints and stops.

Per iteration (`GroupLoop.iteration`, which `bench.perf` times as it runs): every seed's batch
is gathered in one op from the training images, uploaded once as uint8 (the order of each seed
is `batch_indices`'s, taken an epoch at a time from `epoch_batches`); the loss of all seeds runs
under vmap; each seed's gradient is clipped by its own norm; one Adam per seed steps on its
slice of the stacked tensors (torch's fused kernel, skipped on the device for a seed that has
diverged); losses and logs are summed per seed on the device. Nothing is read back to the host
until a sync point (an evaluation, a checkpoint, a stop, the end). At an evaluation the seeds'
periodic evaluation runs vectorised too (bench/group_eval.py; on accelerators: see
`vector_eval`). With `train.compile=true` the
vectorised loss (and its backward) is compiled, as a single run's loss is. With
`train.compile_update=true` clipping and every seed's Adam are one compiled function over the
stacked tensors (bench/group_update.py; on CUDA in "reduce-overhead" mode, i.e. a CUDA graph
where inductor allows); otherwise they stay eager (the reference). With
`train.compile_step=true` the whole step (loss, backward by torch.func, clipping, Adam) is one
compiled graph (bench/group_step.py) from the second iteration on; the first runs the reference
step, which names the parameters a step moves. Every CUDA graph is untested (no GPU was lent).

**Divergence rule.** A seed whose loss or gradient norm is not finite at iteration k is frozen
on the device from k on: its step k and every later one are skipped (parameters, Adam moments
and step count stay as they were after k iterations), and its logs from k on are not summed.
At the next sync point it is recorded `diverged_at = k` with `iteration = k`, checkpointed with
that frozen state, and trained no further: what its separate run records (which stops at k with
the step skipped). Its random-number state in that checkpoint is not its separate run's (the
group drew its noise until the sync point), which does not matter: a diverged run never trains
again. The other seeds are untouched by it; when every seed has diverged, the group stops at the
next sync point.

The noise (`SeedGroup.draw_members`) follows `train.noise`. `torch` (the default): each seed's
own torch stream, swapped in per seed (host work per seed and iteration). `counter`: every
seed's noise in one vectorised call, a hash of (seed, iteration, draw, tensor, element) with no
generator state (bench/counter_noise.py), the numbers the seed's single run draws in that mode.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.func import vmap

from bench.group_eval import evaluate_seeds
from bench.group_step import WholeStep
from bench.group_update import VectorUpdate, clip_per_seed
from bench.progress import ProgressFile
from bench.run_folder import PROGRESS
from bench.train_loop import batches_per_epoch, epoch_batches
from bench.train_setup import compile_error, device_options

if TYPE_CHECKING:
    from bench.seedgroup import SeedGroup

log = logging.getLogger(__name__)


class GroupLoop:
    """The vectorised loop of seeds `members` of `group`, all at the same iteration."""

    vector_eval_on_cpu = False

    def __init__(self, group: SeedGroup, members: list[int]) -> None:
        self.group = group
        self.members = members
        self.trainers = [group.trainers[i] for i in members]
        self.device = group.device
        self.tc = group.cfg.train
        self.template = group.loss_template()
        self.params, self.buffers = group.stack_members(members, self.template)
        self.optimiser = group.stacked_optimiser(self.template, self.params, self.trainers)
        self.update = (
            VectorUpdate(self.optimiser, self.tc.grad_clip, compiled=True)
            if self.tc.compile_update
            else None
        )
        self.update_ran = False
        self.whole: WholeStep | None = None  # train.compile_step, built at the second step
        self.whole_ran = self.whole_failed = False
        self.stepped: list[str] | None = None  # names of the parameters a step moves
        self.loss_fn = vmap(group.functional_loss(self.template), in_dims=(0, 0, 0, 0, None))
        self.compiled: Any = None  # train.compile: the compiled loss, once it has compiled
        self.compile_failed = any("compile_failed" in t.status for t in self.trainers)
        first = self.trainers[0]
        self.images = first.train_images.to(self.device)  # uint8, uploaded once
        self.seeds = [t.cfg.seed for t in self.trainers]
        self.it = first.iteration
        self.requests: list[int] | None = None
        self._epoch: tuple[int, torch.Tensor] | None = None
        s = len(members)
        self.active = np.ones(s, dtype=bool)  # host: seeds not yet recorded as diverged
        self.bad_at = torch.full((s,), -1, dtype=torch.long, device=self.device)
        self.bad_values = torch.zeros(2, s, device=self.device)  # loss, grad norm when it did
        self.sums: torch.Tensor | None = None  # (1 + logs, S) float64: loss and logs summed
        self.counts = torch.zeros(s, dtype=torch.float64, device=self.device)
        self.log_keys: list[str] = []
        self.segment_start = time.perf_counter()  # host clock since the last sync point
        self.segment_first = self.it
        self.marks: list[float] = []  # host clock at the start of each iteration since then
        self.since_ckpt = time.monotonic()
        self.progress = [
            ProgressFile(t.run_dir / PROGRESS, self.tc.iterations, t.iteration)
            for t in self.trainers
        ]
        self.progress_at = float("-inf")  # when `_progress` last wrote the files
        self.done = False
        # The periodic evaluation vectorised over the seeds: on accelerators. On a 2-core CPU it
        # was slower than each seed's own (sparse) evaluation: 4 seeds x 500 images, 1.5-1.9 s
        # against 1.3-1.4 s, so CPUs keep the per-seed one unless this is set (tests do).
        self.vector_eval = self.evaluates_vectorised(self.device)
        log.info("training seeds %s together from iteration %d", self.seeds, self.it)

    @classmethod
    def evaluates_vectorised(cls, device: torch.device) -> bool:
        """Whether a group's evaluations (periodic and final) run vectorised on `device`."""
        return device.type != "cpu" or cls.vector_eval_on_cpu

    # ------------------------------------------------------------------ the loop
    def more(self) -> bool:
        return not self.done and self.it < self.tc.iterations

    def run(self) -> None:
        while self.more():
            self.iteration()

    def batch(self, iteration: int) -> torch.Tensor:
        """(S, B, H, W) float images of every seed's batch at `iteration`: one gather."""
        n = len(self.images)
        epoch, pos = divmod(iteration, batches_per_epoch(n, self.tc.batch_size))
        if self._epoch is None or self._epoch[0] != epoch:
            order = epoch_batches(self.seeds, epoch, n, self.tc.batch_size, self.device)
            self._epoch = (epoch, order)
        return self.images[self._epoch[1][:, pos]].to(torch.float32) / 255.0

    def iteration(self) -> None:
        """One iteration of every seed, then the sync point if one is due."""
        group, it = self.group, self.it
        self.marks.append(time.perf_counter())
        x = self.batch(it)
        if self.requests is None:
            self.requests = group.noise_requests(self.template, x[0])
        noises = group.draw_members(self.members, it, self.template, self.requests)
        prior = self.trainers[0].prior_prob(it)
        loss_values, logs, norms, frozen = self._step(x, noises, prior)
        newly = frozen & (self.bad_at < 0)
        self.bad_at = torch.where(newly, it, self.bad_at)
        self.bad_values = torch.where(newly, torch.stack([loss_values, norms]), self.bad_values)
        self._add_logs(loss_values, logs, ~frozen)
        self.it = it + 1
        self._progress()
        self._maybe_sync()

    def _step(self, x: torch.Tensor, noises: list[tuple], prior: float) -> tuple:
        """Every seed's loss, gradient, clipping and Adam step: (S,) losses, logs, (S,) gradient
        norms before clipping, (S,) bool frozen after it (frozen before, or not finite now)."""
        whole = self._whole_step(x, noises, prior)  # train.compile_step: one graph
        if whole is not None:
            return whole
        losses, logs = self._loss(x, noises, prior)
        self.optimiser.zero_grad()
        losses.sum().backward()  # seeds share no parameters: each gets its own gradient
        if self.stepped is None:  # the parameters a step moves (WholeStep needs them)
            self.stepped = [n for n, p in self.params.items() if p.grad is not None]
        loss_values = losses.detach()
        update = self._update(loss_values)  # train.compile_update: clipping and Adam in one call
        if update is not None:
            return loss_values, logs, *update
        norms = clip_per_seed(list(self.params.values()), self.tc.grad_clip)
        frozen = (self.bad_at >= 0) | ~(torch.isfinite(loss_values) & torch.isfinite(norms))
        self.optimiser.step(frozen.to(torch.float32))
        return loss_values, logs, norms, frozen

    def _whole_step(self, x: torch.Tensor, noises: list[tuple], prior: float) -> tuple | None:
        """The step as one compiled graph (bench/group_step.py); None when it is off, before
        the first (reference) step has named the parameters it moves, or when it has failed to
        compile (then the group says why and uses the reference step from then on)."""
        if not self.tc.compile_step or self.whole_failed or self.stepped is None:
            return None
        prior_t = torch.tensor(prior, device=self.device)  # a float would be baked in
        try:
            if self.whole is None:
                self.optimiser.zero_grad()  # the reference step's gradients: not needed now
                self.whole = WholeStep(self.group, self.params, self.optimiser, self.stepped,
                                       compiled=True)  # fmt: skip
            out = self.whole(self.buffers, x, noises, prior_t, self.bad_at >= 0)
        except Exception as err:  # torch raises many types from its compiler stack
            if self.whole_ran:
                raise
            log.warning("seeds %s: train.compile_step failed (%s: %s); the step runs in parts "
                        "instead", self.seeds, type(err).__name__,
                        compile_error(err))  # fmt: skip
            self.whole_failed = True
            return None
        self.whole_ran = True
        return out

    def _update(self, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(norms, frozen) from the compiled clip + Adam; None when it is off or has failed
        to compile (then the group says why and uses the eager reference from then on)."""
        if self.update is None:
            return None
        try:
            out = self.update(losses, self.bad_at >= 0)
        except Exception as err:  # torch raises many types from its compiler stack
            if self.update_ran:
                raise
            log.warning("seeds %s: train.compile_update failed (%s: %s); clipping and Adam run "
                        "eagerly instead", self.seeds, type(err).__name__,
                        compile_error(err))  # fmt: skip
            self.update = None
            return None
        self.update_ran = True
        return out

    def _loss(self, x: torch.Tensor, noises: list[tuple], prior: float) -> tuple:
        """Every seed's (loss, logs): vmap of the loss, compiled with `train.compile` (as a
        single run's is; if compilation fails the group says why and stays eager)."""
        # With compile_step, the one reference step before the whole step's graph stays eager
        # (if that graph fails to compile, the step in parts is compiled as without it).
        before_whole = self.tc.compile_step and not self.whole_failed
        if not self.tc.compile or self.compile_failed or before_whole:
            return self.loss_fn(self.params, self.buffers, x, noises, prior)
        # The prior as a tensor: a float would be baked into the graph (one recompile per
        # value of an annealed prior).
        prior_t = torch.tensor(prior, device=self.device)
        if self.compiled is not None:
            return self.compiled(self.params, self.buffers, x, noises, prior_t)
        compiled = torch.compile(self.loss_fn, options=device_options(self.device))
        try:  # the first call compiles
            out = compiled(self.params, self.buffers, x, noises, prior_t)
        except Exception as err:  # torch raises many types from its compiler stack
            log.warning("seeds %s: train.compile failed (%s: %s); training eagerly instead",
                        self.seeds, type(err).__name__, compile_error(err))  # fmt: skip
            for trainer in self.trainers:
                trainer.status["compile_failed"] = f"{type(err).__name__}: {err}"[:2000]
            self.compile_failed = True
            return self.loss_fn(self.params, self.buffers, x, noises, prior)
        self.compiled = compiled
        return out

    def _add_logs(self, loss: torch.Tensor, logs: dict, live: torch.Tensor) -> None:
        if self.sums is None:
            self.log_keys = ["loss", *logs]
            self.sums = torch.zeros(len(self.log_keys), len(self.members), dtype=torch.float64,
                                    device=self.device)  # fmt: skip
        values = torch.stack([loss, *(logs[k].detach() for k in self.log_keys[1:])])
        self.sums += torch.where(live, values.to(torch.float64), 0.0)
        self.counts += live

    def _progress(self) -> None:
        """Each live seed's progress file, at most once per the files' interval: no per-seed
        host work in the other iterations."""
        now = time.monotonic()
        if now - self.progress_at < self.progress[0].interval_s:
            return
        self.progress_at = now
        ahead = time.perf_counter() - self.segment_start
        for j, (trainer, progress) in enumerate(zip(self.trainers, self.progress, strict=True)):
            if self.active[j]:
                progress.update(self.it, trainer.elapsed + ahead)

    # ------------------------------------------------------------------ sync points
    def _maybe_sync(self) -> None:
        tc, it = self.tc, self.it
        evaluate = it % tc.eval_every == 0 or it == tc.iterations
        minutes = (time.monotonic() - self.since_ckpt) / 60
        checkpoint = it % tc.checkpoint_every == 0 or minutes >= tc.checkpoint_minutes
        # After a stop request every seed is saved where it stopped: a lossless stop.
        checkpoint = checkpoint or it == tc.iterations or self.group.stop_requested
        if evaluate or checkpoint:
            self.sync(evaluate, checkpoint)
        if self.group.stop_requested and not checkpoint:  # asked for during that evaluation
            self.sync(False, True)
        if self.group.stop_requested or not self.active.any():
            self.done = True

    def _evaluate(self, live: list[int]) -> dict[int, dict]:
        """The periodic evaluation of seeds `live`, vectorised (bench/group_eval.py); {} (each
        trainer evaluates itself) if that cannot run, as for an estimator vmap refuses."""
        if not self.vector_eval:
            return {}
        start = time.perf_counter()
        try:
            results = evaluate_seeds(self, live)
        except Exception as err:  # vmap raises several types for unsupported code
            log.warning("seeds %s: the vectorised evaluation failed (%s: %s); each seed is "
                        "evaluated on its own from now on", self.seeds, type(err).__name__,
                        err)  # fmt: skip
            self.vector_eval = False
            return {}
        finally:  # each seed's share of the time (result.json's evaluation_s)
            share = (time.perf_counter() - start) / len(live)
            for j in live:
                self.trainers[j].evaluation_s += share
        return dict(zip(live, results, strict=True))

    def sync(self, evaluate: bool, checkpoint: bool) -> None:
        """Read the device's flags and sums, bring each seed's trainer up to date, then
        evaluate and checkpoint the seeds still training."""
        bad_at = self.bad_at.tolist()  # waits for the device: the loop's one sync
        now = time.perf_counter()
        bad_values = self.bad_values.tolist()
        sums = self.sums.tolist() if self.sums is not None else []
        counts = self.counts.tolist()
        live = []
        for j, trainer in enumerate(self.trainers):
            if not self.active[j]:
                continue
            if bad_at[j] >= 0:
                k = bad_at[j]
                trainer.elapsed += self.marks[k - self.segment_first] - self.segment_start
            else:
                k = self.it
                trainer.elapsed += now - self.segment_start
            trainer.iteration = k
            running = trainer.running
            for key, column in zip(self.log_keys, sums, strict=True):
                running[key] = running.get(key, 0.0) + column[j]
            if counts[j]:
                running["n"] = running.get("n", 0.0) + counts[j]
            self.group.sync_seed(j, self.members, self.params, self.buffers, self.optimiser,
                             self.template)  # fmt: skip
            if bad_at[j] >= 0:
                trainer.mark_diverged(bad_values[0][j], bad_values[1][j])
                trainer.save_checkpoint(rng=self.group.rng[self.members[j]])
                self.progress[j].update(k, trainer.elapsed, force=True)
                self.active[j] = False
            else:
                live.append(j)
        results = self._evaluate(live) if evaluate and live else {}
        for j in live:
            trainer = self.trainers[j]
            if evaluate:
                trainer.record_evaluation(trainer.running, results.get(j))
                trainer.running.clear()
            if checkpoint:
                trainer.save_checkpoint(rng=self.group.rng[self.members[j]])
            self.progress[j].update(self.it, trainer.elapsed, force=True)
        if self.sums is not None:
            self.sums.zero_()
        self.counts.zero_()
        if checkpoint:
            self.since_ckpt = time.monotonic()
        self.marks.clear()
        self.segment_first = self.it
        self.segment_start = time.perf_counter()


def _stack_noises(noises: list[list[tuple]]) -> list[tuple]:
    """Per seed [draw][tensor] -> per draw, tensors stacked along the seed axis."""
    return [
        tuple(torch.stack([seed[d][k] for seed in noises]) for k in range(3))
        for d in range(len(noises[0]))
    ]
