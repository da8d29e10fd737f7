"""A single run's training loop, one iteration per call, and the data order every loop shares.

`RunLoop.iteration` is the whole body of `Trainer.loop` (batch, step, divergence check,
bookkeeping, progress, and the evaluation and checkpoint when they are due); `Trainer.loop`
calls it until the run ends, and `bench.perf` times the same function, so the figure it prints
is what a run costs per iteration, optimiser and bookkeeping included.

`batch_indices(seed, iteration, n, batch_size)` defines each run's data order; `epoch_order`
and `epoch_batches` are the same order for a whole epoch (the seed-group loop gathers every
seed's batch with one device op from them).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from bench.evaluate import to_float_images
from bench.progress import ProgressFile
from bench.run_folder import PROGRESS

if TYPE_CHECKING:
    from bench.trainer import Trainer


def epoch_order(seed: int, epoch: int, n: int, batch_size: int) -> torch.Tensor:
    """The order of the `n` training images in `epoch` of run `seed`: a fresh permutation
    (all of them, in order, when there are fewer than one batch)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen) if n >= batch_size else torch.arange(n)


def batches_per_epoch(n: int, batch_size: int) -> int:
    return max(n // batch_size, 1)


def batch_indices(seed: int, iteration: int, n: int, batch_size: int) -> torch.Tensor:
    """Indices of the training batch at `iteration`: a fresh permutation per epoch.

    A pure function of its arguments, so a resumed run sees exactly the batches it would have.
    """
    epoch, pos = divmod(iteration, batches_per_epoch(n, batch_size))
    return epoch_order(seed, epoch, n, batch_size)[pos * batch_size : (pos + 1) * batch_size]


def epoch_batches(
    seeds: list[int], epoch: int, n: int, batch_size: int, device: torch.device
) -> torch.Tensor:
    """(S, batches per epoch, batch) on `device`: row [s, pos] is
    `batch_indices(seeds[s], epoch * batches_per_epoch + pos, n, batch_size)`."""
    per_epoch = batches_per_epoch(n, batch_size)
    width = min(batch_size, n)
    rows = [epoch_order(s, epoch, n, batch_size)[: per_epoch * width] for s in seeds]
    return torch.stack(rows).view(len(seeds), per_epoch, width).to(device)


class RunLoop:
    """`Trainer.loop`, one iteration at a time (`iteration`), from the trainer's iteration to
    `train.iterations` (or `stop_after` more)."""

    def __init__(self, trainer: Trainer, stop_after: int | None = None) -> None:
        tc = trainer.cfg.train
        self.trainer = trainer
        self.end = tc.iterations if stop_after is None else min(
            tc.iterations, trainer.iteration + stop_after
        )  # fmt: skip
        self.diverged = False
        self.since_ckpt = time.monotonic()
        self.progress = ProgressFile(trainer.run_dir / PROGRESS, tc.iterations, trainer.iteration)
        self.bar = tqdm(
            total=tc.iterations, initial=trainer.iteration, disable=not tc.progress,
            desc=f"train {Path(trainer.cfg.out_dir).name}", unit="it", dynamic_ncols=True,
        )  # fmt: skip
        trainer.model.train()
        trainer.estimator.train()

    def more(self) -> bool:
        """Whether to run another iteration. Checked before every one, so a stop asked for
        during setup (or compilation, inside the first step) is honoured before the next."""
        t = self.trainer
        return not self.diverged and t.iteration < self.end and not t.stop_requested

    def iteration(self) -> None:
        """One iteration of the run: everything `Trainer.loop` does per iteration."""
        t, cfg, tc = self.trainer, self.trainer.cfg, self.trainer.cfg.train
        t0 = time.perf_counter()
        idx = batch_indices(cfg.seed, t.iteration, len(t.train_images), tc.batch_size)
        x = to_float_images(t.train_images[idx], t.device)
        loss_value, grad_norm, logs = t.step(x, t.prior_prob(t.iteration))
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            t.mark_diverged(loss_value, grad_norm)
            self.diverged = True
            return
        t.iteration += 1
        t.elapsed += time.perf_counter() - t0
        t.accumulate(loss_value, logs)
        self.bar.update(1)
        self.progress.update(t.iteration, t.elapsed)
        if t.iteration % tc.log_every == 0:
            self.bar.set_postfix(elbo=f"{float(logs.get('elbo', float('nan'))):.1f}")
        if t.iteration % tc.eval_every == 0 or t.iteration == tc.iterations:
            t.record_evaluation(t.running)
            t.running.clear()
        minutes = (time.monotonic() - self.since_ckpt) / 60
        if t.iteration % tc.checkpoint_every == 0 or minutes >= tc.checkpoint_minutes:
            t.save_checkpoint()
            self.since_ckpt = time.monotonic()

    def run(self) -> None:
        """Iterate to the end, a stop request or a divergence; then checkpoint where it
        stopped (also after a stop request: that makes the stop lossless)."""
        t = self.trainer
        with self.bar:
            while self.more():
                self.iteration()
        if t.iteration % t.cfg.train.checkpoint_every != 0 or t.status.get("diverged_at"):
            t.save_checkpoint()
        self.progress.update(t.iteration, t.elapsed, force=True)
