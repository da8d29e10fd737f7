"""Python API: load a finished (or partial) run and apply its model to new images.

from bench.api import find_runs, load_run
run = load_run("results/count/air_nvil_fixed/*/seed_0")   # a run folder, or a glob matching one
out = run.infer(images)          # images: (N, 50, 50) floats in [0, 1]
out.counts, out.boxes[0], out.presence_prob, out.reconstructions
find_runs("results", variant="air_nvil_fixed")   # every run folder of the layout, sorted

Run folders are `<results>/<experiment>/<variant>/<config hash>/seed_<n>/` (bench/grid.py). A
finished run's model is its `model.pt` (weights only, bench/model_file.py); an unfinished run's
is its newest readable checkpoint.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.config import ConfigError, RunConfig, load_config
from bench.model_file import ModelFileError, load_final_model
from bench.run_folder import CHECKPOINT, CONFIG, MODEL_FILE
from bench.trainer import CheckpointError, load_checkpoint
from implementations.core.model import AIR
from implementations.core.priors import prior_prob_at


@dataclass
class Inference:
    counts: np.ndarray  # (N,) inferred number of objects
    boxes: list[np.ndarray]  # per image, (count, 4) pixel boxes (x0, y0, x1, y1), step order
    presence_prob: np.ndarray  # (N, T) q's probability that step t is on, given it ran
    reconstructions: np.ndarray  # (N, H, W) canvases drawn from the inferred objects


@dataclass
class LoadedRun:
    cfg: RunConfig
    model: AIR
    iteration: int
    run_dir: Path

    @torch.no_grad()
    def infer(self, images: np.ndarray | torch.Tensor, batch_size: int = 500) -> Inference:
        """Counts, boxes, presence probabilities and reconstructions for images in [0, 1]."""
        x = _check_images(images, self.cfg.model.canvas)
        device = next(self.model.parameters()).device
        prior = prior_prob_at(self.cfg.prior, self.iteration)
        counts, boxes, probs, recon = [], [], [], []
        for start in range(0, len(x), batch_size):
            trace = self.model(x[start : start + batch_size].to(device), prior, sample=False)
            counts.append(trace.counts().cpu())
            boxes += [b.numpy() for b in self.model.present_boxes(trace)]
            probs.append((trace.pres_prob * trace.ran).T.cpu())
            recon.append(trace.canvas.cpu())
        return Inference(
            counts=torch.cat(counts).numpy(),
            boxes=boxes,
            presence_prob=torch.cat(probs).numpy(),
            reconstructions=torch.cat(recon).numpy(),
        )


def _check_images(images: np.ndarray | torch.Tensor, canvas: int) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or tuple(x.shape[1:]) != (canvas, canvas):
        raise ValueError(
            f"images: expected shape (N, {canvas}, {canvas}) or ({canvas}, {canvas}), "
            f"got {tuple(x.shape)}"
        )
    if not torch.is_floating_point(x):
        raise ValueError(f"images: expected floats in [0, 1], got dtype {x.dtype} (divide by 255)")
    x = x.float()
    if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise ValueError(
            f"images: values must be finite and in [0, 1], got range "
            f"[{x.min().item():.3g}, {x.max().item():.3g}]"
        )
    return x


def load_run(run_dir: str | Path, device: str = "cpu") -> LoadedRun:
    """The model of a run folder: its config.yaml, and the newest checkpoint of an unfinished
    run or else the finished run's model.pt.

    `run_dir` is a run folder or a glob pattern matching exactly one (e.g.
    `results/count/air_nvil_fixed/*/seed_0`, without the config hash); several matches raise
    ValueError listing them (pick one, or use `find_runs`).
    """
    run_dir = _one_run_dir(run_dir)
    config_path = run_dir / CONFIG
    try:
        cfg = load_config([config_path])
    except ConfigError as err:
        raise ConfigError(f"{run_dir}: {err}") from err
    ckpt = load_checkpoint(run_dir, expected_hash=None)
    source = run_dir / CHECKPOINT
    if ckpt is None:
        try:
            ckpt = load_final_model(run_dir)
        except ModelFileError as err:
            raise CheckpointError(str(err)) from err
        source = run_dir / MODEL_FILE
    if ckpt is None:
        raise CheckpointError(
            f"{run_dir}: no {MODEL_FILE} and no {CHECKPOINT}; the run has not saved a model yet"
        )
    model = AIR(cfg.model)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{source} does not match its config: {err}") from err
    model.to(device).eval()
    return LoadedRun(cfg=cfg, model=model, iteration=int(ckpt["iteration"]), run_dir=run_dir)


def find_runs(
    results: str | Path = "results",
    experiment: str = "*",
    variant: str = "*",
    seed: int | str = "*",
    config_hash: str = "*",
) -> list[Path]:
    """Run folders under `results` (layout `<experiment>/<variant>/<hash>/seed_<n>`), sorted;
    each argument is a name or a glob pattern. Only folders with a config.yaml count."""
    root = Path(results)
    if not root.is_dir():
        raise FileNotFoundError(f"results folder {root} does not exist")
    pattern = f"{experiment}/{variant}/{config_hash}/seed_{seed}"
    return sorted(p for p in root.glob(pattern) if (p / CONFIG).is_file())


def _one_run_dir(run_dir: str | Path) -> Path:
    """The run folder `run_dir` names, directly or as a glob pattern matching one folder."""
    path = Path(run_dir)
    if (path / CONFIG).is_file():
        return path
    text = str(run_dir)
    if glob.has_magic(text):
        anchor = Path(text).anchor
        relative = text[len(anchor) :] if anchor else text
        matches = sorted(p for p in Path(anchor or ".").glob(relative) if (p / CONFIG).is_file())
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            listed = ", ".join(str(p) for p in matches[:5])
            more = f" and {len(matches) - 5} more" if len(matches) > 5 else ""
            raise ValueError(
                f"{text} matches {len(matches)} run folders ({listed}{more}); name one, or loop "
                "over bench.api.find_runs(...)"
            )
    raise FileNotFoundError(
        f"{text}: no run folder (a folder with config.yaml) there; run folders are "
        "<results>/<experiment>/<variant>/<config hash>/seed_<n>, e.g. "
        "results/count/air_nvil_fixed/*/seed_0 (bench.api.find_runs lists them)"
    )
