"""How much disk a grid needs, from the parameter count of each configured model.

A run that trains holds two resumable checkpoints (`checkpoint.pt`, `checkpoint.prev.pt`), each
the model and estimator state plus Adam's two moments for every trainable tensor; a finished run
keeps only `model.pt`, the model's weights (`bench/model_file.py`). Sizes are computed from the
state the trainer saves, built on torch's meta device (no memory, no data), and the launcher
prints them with the plan (`print_plan`).

Units are decimal: 1 MB = 10^6 bytes, 1 GB = 10^9 bytes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bench.config import RunConfig, to_dict

# Per tensor and per file, torch.save adds a little (pickled keys, storage records, the zip
# directory); the RNG states, loop counters and logs of a checkpoint add a few kB more.
# Measured on the default model (tests/test_disk.py checks the estimate against real files).
_PER_TENSOR_BYTES = 400
_CHECKPOINT_EXTRA_BYTES = 16_000
_MODEL_FILE_EXTRA_BYTES = 2_000

FINISHED = ("complete",)  # run states (bench.grid.RunState.status) that keep model.pt only


@dataclass(frozen=True)
class Footprint:
    """Disk one run of a config uses."""

    checkpoint_bytes: int  # one resumable checkpoint
    final_bytes: int  # the finished run's model.pt

    @property
    def training_bytes(self) -> int:
        """While training (or stopped part-way): the checkpoint and the previous one."""
        return 2 * self.checkpoint_bytes


def _state_bytes(module: torch.nn.Module) -> tuple[int, int]:
    """(bytes, tensors) of the module's state_dict."""
    state = module.state_dict()
    return sum(t.numel() * t.element_size() for t in state.values()), len(state)


def footprint(cfg: RunConfig) -> Footprint:
    """Checkpoint and final model file sizes of a run of `cfg` (its estimator must be
    registered: `bench.variants.ensure_registered`)."""
    from bench.variants import ensure_registered
    from implementations.core.model import AIR
    from implementations.registry import build_estimator

    ensure_registered(cfg.estimator.name)
    with torch.device("meta"):
        model = AIR(cfg.model)
        estimator = build_estimator(cfg.estimator, model)
    model_bytes, model_tensors = _state_bytes(model)
    est_bytes, est_tensors = _state_bytes(estimator)
    trainable = [p for m in (model, estimator) for p in m.parameters() if p.requires_grad]
    # Adam: exp_avg and exp_avg_sq in the parameter's dtype, and a float32 step per tensor.
    adam_bytes = sum(2 * p.numel() * p.element_size() + 4 for p in trainable)
    tensors = model_tensors + est_tensors + 3 * len(trainable)
    checkpoint = (
        model_bytes + est_bytes + adam_bytes + tensors * _PER_TENSOR_BYTES
    ) + _CHECKPOINT_EXTRA_BYTES
    final = model_bytes + model_tensors * _PER_TENSOR_BYTES + _MODEL_FILE_EXTRA_BYTES
    return Footprint(checkpoint_bytes=checkpoint, final_bytes=final)


@dataclass(frozen=True)
class GridDisk:
    """Disk of a whole grid: each run's footprint and where it stands."""

    per_run: list[Footprint]
    finished: list[bool]

    @property
    def when_finished_bytes(self) -> int:
        """Every run finished: one model.pt each."""
        return sum(f.final_bytes for f in self.per_run)

    @property
    def peak_bytes(self) -> int:
        """Finished runs' model files, and two checkpoints for every unfinished run (all of
        them training, or stopped part-way, at once: the most this grid can occupy)."""
        return sum(
            f.final_bytes if done else f.training_bytes
            for f, done in zip(self.per_run, self.finished, strict=True)
        )

    @property
    def unfinished(self) -> int:
        return self.finished.count(False)


def grid_disk(runs: Sequence[Any], states: Sequence[Any]) -> GridDisk:
    """The disk figures of the launcher's runs (`RunSpec`s) in their states (`RunState`s)."""
    cache: dict[str, Footprint] = {}
    per_run = []
    for run in runs:
        # Seed and output folder change no size; model and estimator settings do.
        d = to_dict(run.cfg)
        key = json.dumps([d["model"], d["estimator"]], sort_keys=True)
        if key not in cache:
            cache[key] = footprint(run.cfg)
        per_run.append(cache[key])
    finished = [s.status in FINISHED for s in states]
    return GridDisk(per_run=per_run, finished=finished)


def _size(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.1f} GB"
    if n >= 1e7:
        return f"{n / 1e6:.0f} MB"
    return f"{n / 1e6:.1f} MB"


def _span(values: list[int]) -> str:
    low, high = _size(min(values)), _size(max(values))
    if low == high:
        return f"~{high}"
    (low_number, low_unit), high_unit = low.split(), high.split()[1]
    return f"{low_number}-{high}" if low_unit == high_unit else f"{low}-{high}"


def disk_line(runs: Sequence[Any], states: Sequence[Any]) -> str:
    """One line for the plan, e.g. "disk: ~149 MB per run while training (2 checkpoints),
    13 MB per finished run (model.pt); this grid needs up to ~1.2 GB (0.1 GB once finished)"."""
    if not runs:
        return "disk: nothing to store (no runs)"
    try:
        grid = grid_disk(runs, states)
    except Exception as err:  # an estimate must never stop the launcher; say why it is missing
        return f"disk: no estimate ({type(err).__name__}: {err})"
    training = _span([f.training_bytes for f in grid.per_run])
    final = _span([f.final_bytes for f in grid.per_run])
    while_ = (
        f"while its {grid.unfinished} unfinished run(s) hold checkpoints"
        if grid.unfinished
        else "(every run is finished)"
    )
    return (
        f"disk: {training} per run while training (2 checkpoints with Adam state), "
        f"{final} per finished run (model.pt); this grid needs up to ~{_size(grid.peak_bytes)} "
        f"{while_}, ~{_size(grid.when_finished_bytes)} once finished"
    )
