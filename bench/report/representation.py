"""The `representation` experiment's figure and table: downstream accuracy against labels.

Reads only the runs table (gather's `final_probe_*` columns, bench/probes/suite.py writes the
keys): `probe_<task>_acc_<budget>` from each run's latents (mean over its downstream seeds),
`probe_cnn_<task>_acc_<budget>` from the pixel CNN (the same in every run of a data set: it is
computed once and cached), `probe_<task>_n_test` (the task's test images) and
`probe_<task>_chance` (the accuracy of always answering the training images' commonest class).

Intervals (95 %): over the training seeds of a row when it has at least two runs (t interval of
the mean of the per-run accuracies); with one run, the Wilson interval of its accuracy on the
task's test images (test-set noise only, the spread over training seeds unknown).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from bench.report import stats

#: gather's columns of the probe scores: (cnn_, task, budget).
COLUMN = re.compile(r"^final_probe_(cnn_)?(sum|order)_acc_(\d+)$")
#: The paper's figure for both tasks (Eslami et al. 2016, section 3.1.2).
PAPER_ACCURACY = 0.95
TASK_TITLES = {"sum": "sum of the digits", "order": "digits in ascending order (2-digit images)"}
CNN_ROW = "pixel CNN"


def has_probes(runs: pd.DataFrame) -> bool:
    """Whether some run has a probe score (other experiments' pages have the columns, empty)."""
    return any(COLUMN.match(c) and runs[c].notna().any() for c in runs.columns)


def long_scores(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (row key, run, source, task, budget): columns key, seed, source ("latents"
    or "pixel CNN"), task, budget, acc, n_test. The CNN appears once per distinct run."""
    records: list[dict[str, Any]] = []
    for column in runs.columns:
        m = COLUMN.match(column)
        if not m:
            continue
        cnn, task, budget = bool(m[1]), m[2], int(m[3])
        n_column = f"final_probe_{task}_n_test"
        for _, run in runs.iterrows():
            acc = run[column]
            if acc is None or not np.isfinite(acc):
                continue
            n = run.get(n_column)
            records.append({
                "key": CNN_ROW if cnn else run["variant"],
                "seed": run.get("seed"),
                "run": f"{run.get('variant')}/{run.get('config_hash')}/{run.get('seed')}",
                "source": CNN_ROW if cnn else "latents",
                "task": task, "budget": budget, "acc": float(acc),
                "n_test": int(n) if n is not None and np.isfinite(n) else 0,
            })  # fmt: skip
    frame = pd.DataFrame.from_records(
        records, columns=["key", "seed", "run", "source", "task", "budget", "acc", "n_test"]
    )
    # The CNN's score is the data set's, repeated in every run: keep one per distinct value.
    cnn = frame[frame.source == CNN_ROW].drop_duplicates(["task", "budget", "acc"])
    return pd.concat([frame[frame.source != CNN_ROW], cnn], ignore_index=True)


def interval(accs: np.ndarray, n_test: int) -> tuple[float, float, str]:
    """The 95 % interval of a row's accuracy (see the module docstring) and its kind."""
    if len(accs) >= 2:
        mean, sem = float(np.mean(accs)), float(np.std(accs, ddof=1) / math.sqrt(len(accs)))
        half = float(scipy_stats.t.ppf(0.975, len(accs) - 1)) * sem
        return max(0.0, mean - half), min(1.0, mean + half), "seeds"
    if n_test > 0:
        lo, hi = stats.wilson_interval(int(round(accs[0] * n_test)), n_test)
        return lo, hi, "test images"
    return math.nan, math.nan, "none"


def table(runs: pd.DataFrame) -> list[dict[str, Any]]:
    """The page's table: per task, row and budget, runs, mean accuracy and its interval."""
    if not has_probes(runs):
        return []
    scores = long_scores(runs)
    out = []
    for (task, key, budget), group in scores.groupby(["task", "key", "budget"], sort=True):
        accs = group["acc"].to_numpy()
        lo, hi, kind = interval(accs, int(group["n_test"].max()))
        out.append({
            "task": task, "row": key, "budget": int(budget), "runs": len(accs),
            "mean": float(np.mean(accs)), "lo": lo, "hi": hi, "interval": kind,
            "n_test": int(group["n_test"].max()),
        })  # fmt: skip
    out.sort(key=lambda r: (r["task"] != "sum", r["row"] == CNN_ROW, r["row"], r["budget"]))
    return out


def draw(runs: pd.DataFrame, colours: Mapping[str, Any]) -> Any:
    """Accuracy against labelled images (log axis), one panel per task, one line per row (the
    mean over its runs, each run a dot), the pixel CNN dashed, the paper's ~95 % dotted.
    Returns a matplotlib Figure, or None without probe scores."""
    from matplotlib.figure import Figure

    if not has_probes(runs):
        return None
    scores = long_scores(runs)
    tasks = [t for t in TASK_TITLES if t in set(scores.task)]
    if not tasks:
        return None
    fig = Figure(figsize=(4.6 * len(tasks), 3.3), layout="constrained")
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks, strict=True):
        part = scores[scores.task == task]
        for key, group in part.groupby("key", sort=True):
            cnn = key == CNN_ROW
            colour = "black" if cnn else colours.get(key, "grey")
            means = group.groupby("budget")["acc"].mean()
            ax.plot(means.index, means.values, "--" if cnn else "-", color=colour, marker="o",
                    markersize=3, label=str(key))  # fmt: skip
            ax.scatter(group["budget"], group["acc"], color=colour, s=10, alpha=0.4)
        chance = runs.get(f"final_probe_{task}_chance")
        if chance is not None and chance.notna().any():
            ax.axhline(float(chance.median()), color="grey", linestyle="-.", linewidth=0.8)
            ax.annotate("commonest class", (0.01, float(chance.median())), fontsize=8,
                        xycoords=("axes fraction", "data"), va="bottom", color="grey")  # fmt: skip
        ax.axhline(PAPER_ACCURACY, color="grey", linestyle=":", linewidth=1)
        ax.annotate("paper ~95 %", (0.01, PAPER_ACCURACY), xycoords=("axes fraction", "data"),
                    va="bottom", fontsize=8, color="grey")  # fmt: skip
        ax.set_xscale("log")
        budgets = sorted(set(part["budget"]))
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("labelled training images")
        ax.set_ylabel("test accuracy")
        ax.set_title(TASK_TITLES[task])
        ax.legend(fontsize=7, loc="lower right")
    return fig
