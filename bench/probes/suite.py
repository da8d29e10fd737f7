"""Every (task, budget, downstream seed) of one model, and the pixel-CNN baseline (cached).

Labelled images: for downstream seed s, a fixed permutation of the task's training images (the
training split, whose labels the model never saw) and its first `budget` images; budgets are
nested, so a larger budget adds labels to a smaller one. The pixel CNN learns from exactly the
same labelled images as the latent probe. Scores are on every test image of the task (the
held-out split, MNIST test digits). A budget larger than the task's training images is skipped
and said so (the tiny profiles).

Result keys (`flat_scores`), which land in result.json's `final` and so become `final_<key>`
columns of runs.csv: `probe_<task>_acc_<budget>` (mean over downstream seeds), the same with
`probe_cnn_` for the pixel CNN, and `probe_<task>_n_test` (test images of the task); the
worker adds `probe_<task>_chance` (always the commonest training class; bench/probes/stage.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.config import ProbeConfig
from bench.data.registry import ObjectImages
from bench.probes.learners import FitSettings, PixelCNN, fit, latent_probe, pixels, score
from bench.probes.tasks import Targets, targets
from bench.storage import atomic_write_json

#: Part of the pixel-CNN cache key: bump when the CNN or its fitting changes.
CNN_VERSION = 1

Featurise = Callable[[str, np.ndarray], np.ndarray]  # (split, image rows) -> inputs


def labelled_rows(train: Targets, budget: int, seed: int) -> np.ndarray:
    """Positions (into `train.index`) of the `budget` labelled images of downstream `seed`."""
    order = np.random.default_rng([seed, 20160]).permutation(len(train.index))
    return np.sort(order[:budget])


def plan(
    train: ObjectImages, test: ObjectImages, probe: ProbeConfig, max_count: int
) -> dict[str, tuple[Targets, Targets]]:
    """Each task's training and test targets."""
    return {t: (targets(train, t, max_count), targets(test, t, max_count)) for t in probe.tasks}


def needed_train_rows(tasks: dict[str, tuple[Targets, Targets]], probe: ProbeConfig) -> np.ndarray:
    """The training images some probe learns from (the rest need no latents)."""
    rows: set[int] = set()
    for tr, _ in tasks.values():
        usable = [b for b in probe.budgets if b <= len(tr.index)]
        if usable:
            for seed in range(probe.seeds):
                rows.update(tr.index[labelled_rows(tr, max(usable), seed)].tolist())
    return np.array(sorted(rows), dtype=np.int64)


def run_suite(
    tasks: dict[str, tuple[Targets, Targets]],
    featurise: Featurise,
    make: Callable[[int, int], Any],
    probe: ProbeConfig,
    settings: FitSettings,
    prepare: Callable | None = None,
) -> dict[str, Any]:
    """{task: {budget: {"acc": [per seed], "n_train", "n_test"} or {"skipped": why}}}.

    `featurise(split, rows)` gives the inputs of those images; `make(inputs, classes)` a fresh
    model. The test targets reach `score` only.
    """
    out: dict[str, Any] = {}
    for task, (tr, te) in tasks.items():
        x_test = featurise("test", te.index)
        per_budget: dict[str, Any] = {}
        for budget in probe.budgets:
            if budget > len(tr.index):
                per_budget[str(budget)] = {
                    "skipped": f"budget {budget} > the {len(tr.index)} training images of "
                    f"task {task!r}"
                }
                continue
            accs = []
            for seed in range(probe.seeds):
                rows = labelled_rows(tr, budget, seed)
                x = featurise("train", tr.index[rows])
                inputs, classes = (x.shape[1] if x.ndim == 2 else 0), tr.classes
                predict = fit(lambda n=inputs, k=classes: make(n, k), x, tr.y[rows], settings,
                              seed, prepare)  # fmt: skip
                accs.append(score(predict, x_test, te.y))
            per_budget[str(budget)] = {"acc": accs, "n_train": budget, "n_test": len(te.index)}
        out[task] = per_budget
    return out


def flat_scores(scores: dict[str, Any], prefix: str) -> dict[str, float | int]:
    """`<prefix><task>_acc_<budget>`: mean accuracy over downstream seeds; `_n_test` beside."""
    flat: dict[str, float | int] = {}
    for task, per_budget in scores.items():
        for budget, cell in per_budget.items():
            if "acc" in cell:
                flat[f"{prefix}{task}_acc_{budget}"] = float(np.mean(cell["acc"]))
                flat[f"probe_{task}_n_test"] = int(cell["n_test"])
    return flat


def latent_scores(
    tasks: dict[str, tuple[Targets, Targets]],
    latents: dict[str, dict[int, np.ndarray]],
    probe: ProbeConfig,
    settings: FitSettings,
) -> dict[str, Any]:
    """The latent probe's scores; `latents[split][row]` holds each needed image's latents."""

    def featurise(split: str, rows: np.ndarray) -> np.ndarray:
        table = latents[split]
        return np.stack([table[int(r)] for r in rows]) if len(rows) else np.zeros((0, 1))

    return run_suite(tasks, featurise, lambda n, k: latent_probe(n, k, probe.hidden), probe,
                     settings)  # fmt: skip


def cnn_scores(
    tasks: dict[str, tuple[Targets, Targets]],
    train: ObjectImages,
    test: ObjectImages,
    probe: ProbeConfig,
    settings: FitSettings,
    canvas: int,
) -> dict[str, Any]:
    """The pixel CNN's scores on the same labelled images."""
    split = {"train": np.asarray(train.images), "test": np.asarray(test.images)}
    return run_suite(tasks, lambda s, rows: split[s][rows], lambda _n, k: PixelCNN(canvas, k),
                     probe, settings, prepare=pixels)  # fmt: skip


def cnn_cache_key(data: dict[str, Any], canvas: int, probe: ProbeConfig, device: str) -> str:
    """What the CNN's scores depend on: the data settings, the probe's, the device."""
    blob = {
        "version": CNN_VERSION,
        "data": {k: v for k, v in data.items() if k not in ("data_dir", "cache_dir")},
        "canvas": canvas,
        "probe": {
            k: getattr(probe, k) for k in ("budgets", "tasks", "seeds", "steps", "batch_size", "lr")
        },  # fmt: skip
        "device": device,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


def cached_cnn_scores(cache: Path, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The CNN's scores from `cache` (a JSON file), computed once under a lock when missing:
    every variant and seed of an experiment shares one data set, so one CNN per data set."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a second run waits for the first one's CNN
        if cache.is_file():
            try:
                record = json.loads(cache.read_text())
                if isinstance(record, dict) and "scores" in record:
                    return record
            except ValueError:
                pass  # torn or foreign: computed again
        start = time.perf_counter()
        scores = compute()
        record = {"scores": scores, "seconds": time.perf_counter() - start}
        atomic_write_json(cache, record)
        return record
    finally:
        os.close(fd)
