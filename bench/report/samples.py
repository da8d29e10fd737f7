"""Reconstructions with the inferred boxes, for one converged and one failed seed per variant.

Read from each run's samples file (`samples.npz`, written by the trainer at the end of the run:
bench.samples_file), never by loading a model: a report shows what the runs recorded. A run
finished before samples were recorded, or whose file is damaged, becomes a note on the page
("no samples recorded") instead of an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from bench.report.failures import classify
from bench.report.figures import figure_style, to_uri
from bench.samples_file import read_samples

log = logging.getLogger(__name__)

STEP_COLOURS = ("#e41a1c", "#4daf4a", "#377eb8", "#984ea3", "#ff7f00", "#a65628")


@dataclass
class Samples:
    """A variant's reconstruction figure (or None) and the notes explaining what is missing."""

    uri: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class _Row:
    label: str
    counts: np.ndarray
    boxes: list[np.ndarray]
    recon: np.ndarray


def pick_runs(group: pd.DataFrame) -> list[tuple[str, pd.Series | None]]:
    """(label, run) for the lowest converged seed and the lowest failed seed of a variant."""
    complete = group[group["status"] == "complete"]
    conv = complete[complete["outcome"] == "converged"]
    failed = complete[complete["outcome"] == "not_converged"]
    if failed.empty:  # a diverged model still has its last finite weights
        failed = complete[complete["outcome"] == "diverged"]
    out: list[tuple[str, pd.Series | None]] = []
    out.append(("converged", conv.iloc[0] if len(conv) else None))
    out.append(("failed", failed.iloc[0] if len(failed) else None))
    return out


def variant_samples(group: pd.DataFrame) -> Samples:
    """The reconstruction figure of one variant in one experiment, from its samples files."""
    result = Samples()
    rows: list[_Row] = []
    truth = None
    for label, run in pick_runs(group):
        if run is None:
            result.notes.append(f"no {label} seed with a finished run to show")
            continue
        seed = int(run["seed"])
        try:
            recorded = read_samples(run["run_dir"]) if isinstance(run["run_dir"], str) else None
        except ValueError as err:  # a note, never a broken report
            result.notes.append(f"{label} seed {seed}: cannot show reconstructions ({err})")
            continue
        if recorded is None:
            result.notes.append(f"{label} seed {seed}: no samples recorded (run finished "
                                "before runs wrote samples.npz)")  # fmt: skip
            continue
        x = recorded.images
        if truth is None:
            truth = (x, recorded.true_counts, recorded.true_boxes)
        elif not np.array_equal(truth[0], x):  # a run with other test data: rows would lie
            result.notes.append(f"{label} seed {seed}: its runs were tested on other images")
            continue
        tag = label if label == "converged" else f"failed: {classify(run).kind}"
        rows.append(_Row(f"seed {seed} ({tag})", recorded.counts, recorded.present_boxes(),
                         recorded.reconstructions))  # fmt: skip
    if truth is None or not rows:
        return result
    try:
        result.uri = _draw(truth, rows)
    except Exception as err:  # drawing must not take the page down either
        log.warning("reconstruction figure failed: %s", err)
        result.notes.append(f"cannot draw reconstructions ({err})")
    return result


def _draw(truth: tuple[np.ndarray, np.ndarray, np.ndarray], rows: list[_Row]) -> str:
    """All rows as one mosaic in a single axes: one axes per image would take seconds."""
    images, counts, true_boxes = truth
    n, side = len(images), images.shape[-1]
    gap_x, gap_y = 6, 14  # pixels between cells; gap_y leaves room for a title
    cell_w, cell_h = side + gap_x, side + gap_y
    canvases = [images] + [np.clip(r.recon, 0, 1) for r in rows]
    mosaic = np.zeros((len(canvases) * cell_h, n * cell_w), dtype=np.float32)
    for i, canvas in enumerate(canvases):
        for j in range(n):
            y, x = i * cell_h + gap_y, j * cell_w
            mosaic[y : y + side, x : x + side] = canvas[j]
    with figure_style():
        scale = 1 / 42  # inches per pixel of the mosaic: a 50-pixel image ~1.2 in wide
        fig = Figure(figsize=(mosaic.shape[1] * scale + 1.6, mosaic.shape[0] * scale))
        ax = fig.add_axes((1.6 / (mosaic.shape[1] * scale + 1.6), 0, 1 - 1.6 / (
            mosaic.shape[1] * scale + 1.6), 1))  # fmt: skip
        ax.imshow(mosaic, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_axis_off()
        labels = ["input"] + [r.label for r in rows]
        for i, label in enumerate(labels):
            top = i * cell_h + gap_y
            ax.text(-4, top + side / 2, label, ha="right", va="center", fontsize=8,
                    wrap=True)  # fmt: skip
            for j in range(n):
                x0 = j * cell_w
                ax.add_patch(Rectangle((x0 - 0.5, top - 0.5), side, side, fill=False,
                                       ec="0.75", lw=0.6))  # fmt: skip
                if i == 0:
                    k = int(counts[j])
                    title, colour = f"{k} digit{'s' if k != 1 else ''}", "black"
                    for box in true_boxes[j]:
                        if np.isfinite(box).all():
                            _box(ax, box, (x0, top), "0.5", ls="--", side=side)
                else:
                    row = rows[i - 1]
                    k = int(row.counts[j])
                    title = f"count {k}"
                    colour = "black" if k == int(counts[j]) else "#c00000"
                    for step, box in enumerate(row.boxes[j]):
                        _box(ax, box, (x0, top), STEP_COLOURS[step % len(STEP_COLOURS)], side=side)
                ax.text(x0 + side / 2, top - 2, title, ha="center", va="bottom", fontsize=7.5,
                        color=colour)  # fmt: skip
        ax.set_xlim(-1, mosaic.shape[1] - gap_x + 1)  # room for the frames of the last cell
        ax.set_ylim(mosaic.shape[0] - 0.5, -0.5)
        return to_uri(fig)


def _box(
    ax: Any, box: np.ndarray, origin: tuple[float, float], colour: Any, ls: str = "-", side=50
) -> None:
    """A pixel box (x0, y0, x1, y1) of one image, drawn in that image's cell of the mosaic."""
    if not np.isfinite(np.asarray(box, dtype=float)).all():
        return  # a diverged model's box: nothing sensible to draw
    x0, y0, x1, y1 = np.clip(np.asarray(box, dtype=float), 0, side)  # stay in its own cell
    ox, oy = origin
    ax.add_patch(
        Rectangle((ox + x0 - 0.5, oy + y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec=colour,
                  lw=1.3, ls=ls)
    )  # fmt: skip


def experiment_samples(runs: pd.DataFrame) -> dict[str, Samples]:
    """Reconstruction figures of every variant (row) of one experiment."""
    return {str(v): variant_samples(g) for v, g in runs.groupby("variant")}
