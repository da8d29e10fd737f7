"""What a training run is built from: seeding, model/estimator/optimiser, RNG states,
checkpoints, the compiled loss and the device (bench/trainer.py's Trainer and the seed groups of
bench/seedgroup.py both use these)."""

from __future__ import annotations

import logging
import random
import socket
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.config import RunConfig
from bench.counter_noise import TrainingNoise
from bench.run_folder import CHECKPOINT, PREVIOUS_CHECKPOINT
from bench.variants import ensure_registered
from implementations.core.estimators import Estimator
from implementations.core.model import AIR
from implementations.registry import build_estimator

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not belong to this run."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def build(cfg: RunConfig, device: torch.device) -> tuple[AIR, Estimator, torch.optim.Optimizer]:
    """Model, estimator and optimiser, initialised from the run seed."""
    ensure_registered(cfg.estimator.name)
    seed_everything(cfg.seed)
    model = AIR(cfg.model).to(device)
    estimator = build_estimator(cfg.estimator, model).to(device)
    groups = [{"params": list(model.parameters()), "lr": cfg.train.lr, "name": "model"}]
    groups += estimator.param_groups(cfg.train.lr)
    # The fused kernel updates the ~5M parameters (mostly the two 2500 x 1024 image projections)
    # in one pass: about 3x faster than the foreach path on CPU.
    optimiser = torch.optim.Adam(groups, fused=True)
    return model, estimator, optimiser


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def load_checkpoint(run_dir: Path, expected_hash: str | None) -> dict[str, Any] | None:
    """The newest readable checkpoint of a run folder, or None if it has none.

    A corrupt latest checkpoint falls back to the previous one (kept for this reason) with a
    warning; if neither can be read, a CheckpointError names both files.
    """
    tried = []
    for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
        path = run_dir / name
        if not path.exists():
            continue
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
            if not isinstance(ckpt, dict) or "iteration" not in ckpt:
                raise ValueError("not an air-repro checkpoint (no 'iteration' entry)")
        except Exception as err:  # torch raises several types for truncated files
            log.warning("checkpoint %s is unreadable (%s); trying an older one", path, err)
            tried.append(f"{path}: {err}")
            continue
        if expected_hash is not None and ckpt.get("config_hash") != expected_hash:
            raise CheckpointError(
                f"{path} was written by a run with config hash {ckpt.get('config_hash')}, "
                f"but this config hashes to {expected_hash}; use another out_dir or delete it"
            )
        return ckpt
    if tried:
        raise CheckpointError("no readable checkpoint: " + "; ".join(tried))
    return None


def compile_loss(
    estimator: Estimator, model: AIR, device: torch.device, noise: TrainingNoise | None = None
) -> Any:
    """`estimator.loss` under torch.compile: (images, prior as a 0-d tensor) -> (loss, logs).

    `fallback_random` makes the compiled graph draw its noise with torch's own generator, in
    the same order as the eager code: the same seed gives the same samples either way, and a
    resumed run (whose checkpoint holds that generator's state) continues the same stream.
    With `noise` (train.noise=counter) it takes a third input, the step's noise tensors
    (`TrainingNoise.given`), which the model's draws answer from.
    """

    def loss_and_logs(
        x: torch.Tensor, prior: torch.Tensor, noises: list[tuple] | None = None
    ) -> tuple[torch.Tensor, dict]:
        if noise is not None and noises is not None:
            noise.load(noises)
        out = estimator.loss(model, x, prior)
        return out.loss, out.logs

    return torch.compile(loss_and_logs, options={"fallback_random": True, **device_options(device)})


def device_options(device: torch.device) -> dict[str, Any]:
    """Inductor options every compiled function of a run gets on `device` (the loss, a seed
    group's vectorised loss and update)."""
    if device.type == "cpu":
        # A C++ wrapper calls the graph's ~100 kernels and matrix products without a Python
        # frame each: measured 31 -> 26 ms per NVIL step on 2 cores. (CUDA: untested, no GPU.)
        return {"cpp_wrapper": True}
    return {}


def compile_error(err: BaseException) -> str:
    """The first line of a compiler error, for the warning that says a run went eager."""
    text = str(err)
    return text.splitlines()[0] if text else ""


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"train.device={name!r} but CUDA is not available on {socket.gethostname()}"
        )
    return device
