"""Per-run progress: a small file the training loop keeps up to date, and the console bars the
local launcher draws from it.

`progress.json` in a run folder (written by `Trainer._loop`, at most once a second, atomically):

    {"iteration": 1234, "iterations": 7000, "start_iteration": 1000, "elapsed_s": 51.3,
     "updated_at": 1718000000.0}

`iteration` is the number of iterations completed, `iterations` the run's target,
`start_iteration` where this worker process started (its checkpoint's iteration) and
`elapsed_s` the run's training seconds over all sessions. The count accuracy comes from the
last line of `metrics.jsonl` (one per evaluation). Seed groups trained vectorised write no
progress file; for them the last evaluation's iteration is shown.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.run_folder import METRICS, PROGRESS
from bench.storage import atomic_write_json

log = logging.getLogger(__name__)


class ProgressFile:
    """Writes a run's progress.json, at most every `interval_s` seconds (see the module doc)."""

    def __init__(self, path: Path, iterations: int, start: int, interval_s: float = 1.0) -> None:
        self.path = path
        self.iterations = iterations
        self.start = start
        self.interval_s = interval_s
        self._last = -math.inf
        self._failed = False

    def update(self, iteration: int, elapsed_s: float, force: bool = False) -> None:
        now = time.monotonic()
        if self._failed or (not force and now - self._last < self.interval_s):
            return
        self._last = now
        try:
            atomic_write_json(
                self.path,
                {
                    "iteration": iteration,
                    "iterations": self.iterations,
                    "start_iteration": self.start,
                    "elapsed_s": elapsed_s,
                    "updated_at": time.time(),
                },
            )
        except OSError as err:  # a full disk costs the progress display, never the run
            log.warning("cannot write %s (%s); no more progress updates", self.path, err)
            self._failed = True


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def last_json_line(path: Path, tail_bytes: int = 1 << 16) -> dict[str, Any] | None:
    """The last complete JSON line of a .jsonl file (only its tail is read); None if none."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - tail_bytes))
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            value = json.loads(line)
        except ValueError:
            continue  # a line being written, or the first, cut, line of the tail
        if isinstance(value, dict):
            return value
    return None


@dataclass
class Snapshot:
    """What is known of a running run at one moment."""

    iteration: int | None = None  # iterations completed (None: not started yet)
    iterations: int | None = None  # the run's target
    count_accuracy: float | None = None  # at the last evaluation
    evaluated_at: int | None = None  # iteration of the last evaluation


def read_snapshot(run_dir: Path, iterations: int) -> Snapshot:
    """The run's progress from progress.json and the last line of metrics.jsonl."""
    snap = Snapshot(iterations=iterations)
    last = last_json_line(run_dir / METRICS)
    if last is not None:
        snap.evaluated_at = last.get("iteration")
        snap.count_accuracy = last.get("count_accuracy")
        snap.iteration = snap.evaluated_at
    progress = _read_json(run_dir / PROGRESS)
    if progress is not None and isinstance(progress.get("iteration"), int):
        snap.iteration = max(progress["iteration"], snap.iteration or 0)
        snap.iterations = progress.get("iterations") or iterations
    return snap


@dataclass
class RateMeter:
    """Iterations per second and time left, counted from the last moment the iteration had
    not moved yet (so the worker's start-up and compilation do not count)."""

    first: tuple[float, int] | None = None
    last: tuple[float, int] | None = None

    def add(self, now: float, iteration: int) -> None:
        if self.first is None or iteration <= self.first[1]:
            self.first = (now, iteration)
        self.last = (now, iteration)

    def rate(self) -> float | None:
        if self.first is None or self.last is None:
            return None
        dt, di = self.last[0] - self.first[0], self.last[1] - self.first[1]
        return di / dt if dt > 0 and di > 0 else None

    def eta_s(self, total: int) -> float | None:
        rate = self.rate()
        if rate is None or self.last is None:
            return None
        return max(total - self.last[1], 0) / rate


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def describe(snap: Snapshot, meter: RateMeter) -> str:
    """The text after a job's bar: count accuracy, speed, time left."""
    parts = []
    if snap.iteration is None:
        return "starting"
    if snap.count_accuracy is not None:
        parts.append(f"count acc {snap.count_accuracy:.3f} @{snap.evaluated_at}")
    if snap.iterations and snap.iteration >= snap.iterations:
        return ", ".join([*parts, "final evaluation"])
    rate = meter.rate()
    if rate is not None:
        parts.append(f"{rate:.1f} it/s")
    eta = meter.eta_s(snap.iterations) if snap.iterations else None
    parts.append(f"ETA {format_duration(eta)}" if eta is not None else "ETA ?")
    return ", ".join(parts)


class JobBars:
    """One console bar per running local job: iterations done, count accuracy, speed, ETA.

    A job training a group of seeds shows its first seed (the seeds train in step).
    """

    def __init__(self, enabled: bool, file: Any = None) -> None:
        self.enabled = enabled
        self.file = file  # None: stderr, as tqdm's default
        self._bars: dict[Any, tuple[Any, Path, int, RateMeter]] = {}

    def start(self, key: Any, label: str, run_dir: Path, iterations: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = tqdm(
            total=iterations,
            desc=label,
            unit="it",
            leave=False,
            dynamic_ncols=True,
            file=self.file,
            bar_format="{desc} {percentage:3.0f}%|{bar}| {n}/{total}{postfix}",
        )
        bar.set_postfix_str("starting", refresh=False)
        self._bars[key] = (bar, run_dir, iterations, RateMeter())

    def refresh(self) -> None:
        now = time.monotonic()
        for bar, run_dir, iterations, meter in self._bars.values():
            snap = read_snapshot(run_dir, iterations)
            if snap.iteration is not None:
                meter.add(now, snap.iteration)
                if snap.iterations and snap.iterations != bar.total:
                    bar.total = snap.iterations
                bar.n = snap.iteration
            bar.set_postfix_str(describe(snap, meter), refresh=False)
            bar.refresh()

    def close(self, key: Any) -> None:
        entry = self._bars.pop(key, None)
        if entry is not None:
            entry[0].close()

    def close_all(self) -> None:
        for key in list(self._bars):
            self.close(key)
