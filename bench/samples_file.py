"""The run's samples file, `samples.npz`: a few reconstructions with their boxes, for the report.

Written by the trainer at the end of a run (`write_samples`, from `Trainer.finish`) so that the
report can draw reconstructions from files alone, without loading a model, torch or the data
generator (`read_samples` needs numpy only). Arrays, for N (~8) held-out test images spread over
the true counts, T steps, canvas H x W:

    version          ()          int, FORMAT_VERSION
    index            (N,)        int, positions of the images in the run's test set
    images           (N, H, W)   uint8, the input canvases (0-255)
    true_counts      (N,)        int, digits on each canvas
    true_boxes       (N, K, 4)   float32, ground-truth pixel boxes (x0, y0, x1, y1), NaN padded
    reconstructions  (N, H, W)   float16, the model's canvas (deterministic pass, in [0, 1])
    counts           (N,)        int, inferred counts
    boxes            (N, T, 4)   float32, every step's pixel box
    on               (N, T)      bool, steps that are on (their boxes are the inferred objects)
    presence         (N, T)      float32, q's presence probability times "the step ran"
    iteration        ()          int, the iteration the model was at

About 100 KB for 8 images of 50 x 50. Everything is written atomically.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.run_folder import SAMPLES_FILE

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
N_IMAGES = 8
_KEYS = ("index", "images", "true_counts", "true_boxes", "reconstructions", "counts", "boxes",
         "on", "presence")  # fmt: skip


@dataclass
class RunSamples:
    """The contents of one run's samples file (shapes in the module docstring)."""

    index: np.ndarray
    images: np.ndarray  # float32 in [0, 1] once read
    true_counts: np.ndarray
    true_boxes: np.ndarray
    reconstructions: np.ndarray  # float32 once read
    counts: np.ndarray
    boxes: np.ndarray
    on: np.ndarray
    presence: np.ndarray
    iteration: int

    def present_boxes(self) -> list[np.ndarray]:
        """Per image, the (count, 4) boxes of the steps that are on, in step order."""
        return [self.boxes[i][self.on[i]] for i in range(len(self.boxes))]


def spread(counts: np.ndarray, n: int) -> np.ndarray:
    """Indices of the first images taking each true count in turn, so that all counts show."""
    by_count = [list(np.flatnonzero(counts == c)[:n]) for c in np.unique(counts)]
    out: list[int] = []
    while len(out) < min(n, len(counts)) and any(by_count):
        for queue in by_count:
            if queue and len(out) < n:
                out.append(int(queue.pop(0)))
    return np.array(sorted(out), dtype=int)


def write_samples(
    run_dir: str | Path, model: Any, test: Any, prior_prob: float, iteration: int
) -> Path | None:
    """Run `model` (an implementations.core AIR) on N_IMAGES of `test` (images uint8, counts,
    boxes) and write `run_dir/samples.npz`. Returns the path, or None (logged) if it failed: a
    missing samples file only costs the report a figure, never the run."""
    import torch  # the trainer's side only: reading needs numpy alone

    path = Path(run_dir) / SAMPLES_FILE
    try:
        pick = spread(np.asarray(test.counts), N_IMAGES)
        images = np.asarray(test.images)[pick]
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                x = torch.as_tensor(images).to(device=device, dtype=torch.float32) / 255.0
                trace = model(x, prior_prob, sample=False)
                arrays = {
                    "version": np.array(FORMAT_VERSION),
                    "iteration": np.array(int(iteration)),
                    "index": pick,
                    "images": images.astype(np.uint8),
                    "true_counts": np.asarray(test.counts)[pick].astype(np.int64),
                    "true_boxes": np.asarray(test.boxes)[pick].astype(np.float32),
                    "reconstructions": trace.canvas.cpu().numpy().astype(np.float16),
                    "counts": trace.counts().cpu().numpy().astype(np.int64),
                    "boxes": model.boxes(trace).cpu().numpy().transpose(1, 0, 2)
                    .astype(np.float32),
                    "on": trace.on_mask().cpu().numpy().T.astype(bool),
                    "presence": (trace.pres_prob * trace.ran).cpu().numpy().T.astype(np.float32),
                }  # fmt: skip
        finally:
            model.train(was_training)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        from bench.storage import atomic_write_bytes

        atomic_write_bytes(path, buf.getvalue())
        return path
    except Exception as err:  # noqa: BLE001  (the run's result matters more than its figure)
        log.warning("%s: could not write %s: %s", run_dir, SAMPLES_FILE, err)
        return None


def read_samples(run_dir: str | Path) -> RunSamples | None:
    """The samples file of a run folder; None when the run has none (finished before samples
    were recorded). ValueError naming the file when it exists but cannot be read."""
    path = Path(run_dir) / SAMPLES_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except Exception as err:
        raise ValueError(f"{path}: not a readable samples file ({err})") from err
    missing = [k for k in (*_KEYS, "version", "iteration") if k not in data]
    if missing:
        raise ValueError(f"{path}: missing arrays {missing}")
    if int(data["version"]) > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format version {int(data['version'])}, this code reads <= {FORMAT_VERSION}"
        )
    n = len(data["index"])
    for k in _KEYS:
        if len(data[k]) != n:
            raise ValueError(f"{path}: {k} has {len(data[k])} entries, expected {n}")
    return RunSamples(
        index=data["index"],
        images=data["images"].astype(np.float32) / 255.0,
        true_counts=data["true_counts"],
        true_boxes=data["true_boxes"],
        reconstructions=data["reconstructions"].astype(np.float32),
        counts=data["counts"],
        boxes=data["boxes"],
        on=data["on"].astype(bool),
        presence=data["presence"],
        iteration=int(data["iteration"]),
    )
