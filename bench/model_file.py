"""The final model file of a finished run: `model.pt`, weights only.

While a run trains, its folder holds two resumable checkpoints (`checkpoint.pt` and the
previous one, `checkpoint.prev.pt`): model, estimator, Adam's moments and every RNG state,
about 5x the model's own size (74 MB each for the default NVIL model). A finished run needs
none of that for the report or `bench.api.load_run`, so at completion the trainer writes
`model.pt` (the model's weights, on CPU, and what `load_run` needs besides the config: the
iteration, for the presence prior) and then deletes the checkpoints (`Trainer.finish`).

The file holds only tensors, numbers and strings, so it loads with `weights_only=True`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.run_folder import MODEL_FILE
from bench.storage import atomic_torch_save

FORMAT = "air-repro final model v1"


class ModelFileError(RuntimeError):
    """A final model file that cannot be read, with the path and the reason."""


def save_final_model(
    run_dir: Path,
    model: nn.Module,
    *,
    iteration: int,
    config_hash: str,
    diverged_at: int | None = None,
) -> Path:
    """Write `run_dir/model.pt` atomically; returns its path."""
    path = Path(run_dir) / MODEL_FILE
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    atomic_torch_save(
        path,
        {
            "format": FORMAT,
            "iteration": int(iteration),
            "config_hash": config_hash,
            "diverged_at": diverged_at,
            "model": state,
        },
    )
    return path


def load_final_model(run_dir: Path) -> dict[str, Any] | None:
    """The contents of `run_dir/model.pt`, or None if there is none (ModelFileError if it is
    unreadable or not one of ours)."""
    path = Path(run_dir) / MODEL_FILE
    if not path.exists():
        return None
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ModelFileError(f"{path} is unreadable: {type(err).__name__}: {err}") from err
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise ModelFileError(f"{path}: expected an {FORMAT!r} file, found {found!r}")
    for key, kind in (("iteration", int), ("model", dict)):
        if not isinstance(record.get(key), kind):
            raise ModelFileError(f"{path}: entry {key!r} is missing or not a {kind.__name__}")
    return record
