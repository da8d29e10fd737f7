"""Python API: load a finished (or partial) run and apply its model to new images.

from bench.api import load_run
run = load_run("results/single")
out = run.infer(images)          # images: (N, 50, 50) floats in [0, 1]
out.counts, out.boxes[0], out.presence_prob, out.reconstructions
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.config import ConfigError, RunConfig, load_config
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
    """The model of a run folder (its config.yaml and newest readable checkpoint)."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml; is this a run folder?")
    try:
        cfg = load_config([config_path])
    except ConfigError as err:
        raise ConfigError(f"{run_dir}: {err}") from err
    ckpt = load_checkpoint(run_dir, expected_hash=None)
    if ckpt is None:
        raise CheckpointError(f"{run_dir}: no checkpoint.pt; the run has not saved a model yet")
    model = AIR(cfg.model)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{run_dir}/checkpoint.pt does not match its config: {err}") from err
    model.to(device).eval()
    return LoadedRun(cfg=cfg, model=model, iteration=int(ckpt["iteration"]), run_dir=run_dir)
