"""The worker's part of a probe run (`probe.budgets` set; experiment `representation`).

A probe run is `<results>/<experiment>/<variant>/<hash>/seed_<n>/` like every run. Its model
comes from, in order:

1. a finished run of `probe.reuse_experiment` (default `count`) with the same variant, seed and
   training config (the same config hash once the probe section is taken out), read-only:
   `<results>/count/<variant>/<training hash>/seed_<n>/` with a complete result.json and model.pt;
2. else its own `training/` subfolder, trained (or resumed) there as that count run would be.

Training in a subfolder keeps result.json of the probe run for the finished run alone: it is
written once, after the probes, so a run killed while probing is not taken for complete; the
next attempt finds `training/` finished and runs only the probes. The run folder then gets the
model's files (model.pt and samples.npz as hard links where the file system allows, else
copies; metrics.jsonl copied), so `bench.api.load_run`, gather and the report treat it like any
run; its config.yaml is its own (probe section included); `probes.json` holds every downstream
score.
result.json is the training run's record with the probe scores added to `final`, `probes`
(per seed, skipped budgets, timings) and `training_run` / `training_reused`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.api import load_run
from bench.config import ProbeConfig, RunConfig, config_hash, to_dict, to_yaml
from bench.data.registry import get_dataset
from bench.datasets import load_datasets
from bench.probes import suite
from bench.probes.features import air_latents
from bench.probes.learners import FitSettings
from bench.run_folder import CONFIG, METRICS, MODEL_FILE, PROGRESS, SAMPLES_FILE, read_result
from bench.storage import atomic_write_json, atomic_write_text
from implementations.core.priors import prior_prob_at

log = logging.getLogger(__name__)

TRAINING_DIR = "training"
PROBES_FILE = "probes.json"
LINKED = (MODEL_FILE, SAMPLES_FILE, METRICS)


def training_config(cfg: RunConfig, run_dir: Path) -> RunConfig:
    """The run's config without probes, training in `run_dir/training`: its hash is the hash
    the same run has in the count experiment."""
    return dataclasses.replace(cfg, probe=ProbeConfig(), out_dir=str(run_dir / TRAINING_DIR))


def results_root(run_dir: Path) -> Path | None:
    """`<results>` of a run folder in the grid layout; None for a folder outside it."""
    parts = run_dir.resolve().parents
    return parts[3] if len(parts) > 3 and run_dir.name.startswith("seed_") else None


def finished_run(folder: Path, expected_hash: str) -> dict[str, Any] | None:
    """The complete record of the run in `folder` under `expected_hash` with a model.pt."""
    record, _ = read_result(folder)
    if (
        record is not None
        and record.get("status") == "complete"
        and record.get("config_hash") == expected_hash
        and (folder / MODEL_FILE).is_file()
    ):
        return record
    return None


def reusable_run(cfg: RunConfig, variant: str, run_dir: Path, training_hash: str) -> Path | None:
    """The finished run of `probe.reuse_experiment` this run can take its model from."""
    root = results_root(run_dir)
    if root is None:
        return None
    folder = root / cfg.probe.reuse_experiment / variant / training_hash / f"seed_{cfg.seed}"
    if folder.resolve() == run_dir.resolve():
        return None
    return folder if finished_run(folder, training_hash) is not None else None


def link_or_copy(source: Path, target: Path) -> None:
    """`target` becomes `source`'s content, atomically: a hard link, else a copy. Only files
    that are replaced whole, never appended to, are linked (metrics.jsonl is copied)."""
    if target.exists() and os.path.samefile(source, target):
        return  # linked by an earlier attempt (rename() of one link onto another does nothing)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        if source.name == METRICS:
            raise OSError("appended to in place: copied")
        os.link(source, tmp)
    except OSError:
        shutil.copy2(source, tmp)
    os.replace(tmp, target)


def run_probe_task(
    task: dict[str, Any],
    cfg: RunConfig,
    train: Callable[[RunConfig], dict[str, Any]],
    save: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]],
    attempt: dict[str, Any],
) -> dict[str, Any]:
    """Reuse or train the model, run the probes, write the result (via `save`).

    `train(training_cfg)` trains or resumes in `training/` and returns the trainer's record
    (status complete) or a record of the run's interruption (returned as it is).
    """
    run_dir = Path(task["run_dir"])
    tcfg = training_config(cfg, run_dir)
    thash = config_hash(tcfg)
    source = reusable_run(cfg, task["variant"], run_dir, thash)
    if source is not None:
        log.info("%s: reusing the finished run %s (no training)", run_dir, source)
        training = finished_run(source, thash)
    else:
        source = run_dir / TRAINING_DIR
        training = finished_run(source, thash)
        if training is None:
            for name in (PROGRESS, METRICS):  # where the console's bars look
                link = run_dir / name
                if not link.exists() and not link.is_symlink():
                    link.symlink_to(Path(TRAINING_DIR) / name)
            training = train(tcfg)
            if training.get("status") != "complete":
                return training  # interrupted: the caller's record, resumed next time
    assert training is not None
    for name in LINKED:
        if (source / name).is_file():
            link_or_copy(source / name, run_dir / name)
    own = dataclasses.replace(cfg, out_dir=str(run_dir))
    atomic_write_text(run_dir / CONFIG, to_yaml(own))
    probes = probe_model(cfg, source, run_dir, training)
    atomic_write_json(run_dir / PROBES_FILE, probes)
    final = training.get("final")
    result = {
        **training,
        "config_hash": task["config_hash"],
        "seed": cfg.seed,
        "final": None if final is None else {**final, **probes.get("final", {})},
        "probes": {k: v for k, v in probes.items() if k != "final"},
        "training_run": str(source),
        "training_reused": source != run_dir / TRAINING_DIR,
    }
    attempt["end"] = "complete"
    return save(task, result)


def probe_model(
    cfg: RunConfig, source: Path, run_dir: Path, training: dict[str, Any]
) -> dict[str, Any]:
    """Every downstream score of the model in `source` (see bench.probes.suite)."""
    if training.get("final") is None:
        return {"skipped": "training diverged: no model to probe", "final": {}}
    probe, device = cfg.probe, cfg.train.device
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    started = time.perf_counter()
    data = load_datasets(training_config(cfg, run_dir))
    max_count = max(cfg.data.train_counts + cfg.data.test_counts)
    tasks = suite.plan(data.train, data.test, probe, max_count)
    settings = FitSettings(probe.steps, probe.batch_size, probe.lr, device=device)

    loaded = load_run(source, device=device)
    prior = prior_prob_at(cfg.prior, loaded.iteration)
    rows = {"train": suite.needed_train_rows(tasks, probe),
            "test": np.unique(np.concatenate([te.index for _, te in tasks.values()]))}  # fmt: skip
    images = {"train": np.asarray(data.train.images), "test": np.asarray(data.test.images)}
    latents: dict[str, dict[int, np.ndarray]] = {}
    for split, idx in rows.items():
        feats = air_latents(loaded.model, images[split][idx], prior, cfg.eval.batch_size)
        latents[split] = dict(zip(idx.tolist(), feats, strict=True))
    latent_s = time.perf_counter() - started
    del loaded

    started = time.perf_counter()
    scores = suite.latent_scores(tasks, latents, probe, settings)
    probe_s = time.perf_counter() - started
    final = suite.flat_scores(scores, "probe_")
    for task, (tr, te) in tasks.items():  # chance: the training targets' commonest class
        if len(tr.y) and len(te.y):
            final[f"probe_{task}_chance"] = float(np.mean(te.y == np.bincount(tr.y).argmax()))
    dims = {len(v) for split in latents.values() for v in split.values()}
    out: dict[str, Any] = {"latents": scores, "latent_dim": dims.pop() if dims else 0}
    if probe.pixel_cnn:
        cnn = cnn_baseline(cfg, run_dir, tasks, data, settings)
        out["pixel_cnn"] = cnn["scores"]
        out["pixel_cnn_seconds"] = cnn["seconds"]
        out["pixel_cnn_cache"] = cnn.get("cache")
        final.update(suite.flat_scores(cnn["scores"], "probe_cnn_"))
    out["seconds"] = {"latents": latent_s, "latent_probes": probe_s}
    out["final"] = final
    return out


def cnn_baseline(
    cfg: RunConfig,
    run_dir: Path,
    tasks: dict[str, Any],
    data: Any,
    settings: FitSettings,
) -> dict[str, Any]:
    """The pixel CNN's scores: from the cache beside the results (`<results>/.probes/`), where
    every variant and seed of the experiment shares them, computed there once if missing."""
    canvas = cfg.model.canvas

    def compute() -> dict[str, Any]:
        log.info("%s: training the pixel CNN baseline", run_dir)
        return suite.cnn_scores(tasks, data.train, data.test, cfg.probe, settings, canvas)

    root = results_root(run_dir)
    if root is None:  # a single run outside the grid: no shared place; computed here
        start = time.perf_counter()
        return {"scores": compute(), "seconds": time.perf_counter() - start, "cache": None}
    get_dataset(cfg.data.name)  # a known data set (the key names it through the config)
    key = suite.cnn_cache_key(to_dict(cfg)["data"], canvas, cfg.probe, cfg.train.device)
    cache = root / ".probes" / f"pixel_cnn-{key}.json"
    return {**suite.cached_cnn_scores(cache, compute), "cache": str(cache)}
