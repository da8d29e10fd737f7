"""Print the verdict tables of a results folder as markdown (the README's verdict section).

Reads only what `bench.gather` wrote (runs.csv, evals.csv): one row per (experiment, variant),
with how many runs are complete, how many met the convergence rule (sampled count accuracy on
the training counts >= the target over consecutive evaluations; `outcome` in result.json), the
median and range of the final sampled count accuracy, the iterations to the target and the
periodic accuracy at a few iterations. Generalisation experiments add the unseen count's
accuracy beside the in-distribution accuracy and the over-count rate.

    python docs/verdict/summarise.py results/verdict [--at 5000 10000 25000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

UNSEEN = {"interpolation": 2, "extrapolation": 3}


def _spread(values: pd.Series, digits: int = 3) -> str:
    v = pd.to_numeric(values, errors="coerce").dropna()
    if v.empty:
        return "-"
    med = f"{v.median():.{digits}f}"
    return med if len(v) == 1 else f"{med} [{v.min():.{digits}f}-{v.max():.{digits}f}]"


def _iterations(values: pd.Series) -> str:
    v = pd.to_numeric(values, errors="coerce").dropna()
    if v.empty:
        return "-"
    return f"{v.median():.0f}" if len(v) == 1 else f"{v.median():.0f} [{v.min():.0f}-{v.max():.0f}]"


def table(runs: pd.DataFrame, evals: pd.DataFrame, experiment: str, at: list[int]) -> str:
    mine = runs[runs["experiment"] == experiment]
    unseen = UNSEEN.get(experiment)
    head = ["variant", "complete", "converged", "final sampled accuracy"]
    if unseen is not None:
        head += [f"on {unseen} (unseen)", "in-distribution", "over-count rate"]
    else:
        head += ["mode-count accuracy", "iterations to 98 %"]
    head += [f"at {a // 1000}k" for a in at] + ["wall time per run (min)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, rows in mine.groupby("variant", sort=True):
        done = rows[rows["status"] == "complete"]
        cells = [
            variant,
            f"{len(done)} / {len(rows)}",
            str(int((done["outcome"] == "converged").sum())),
            _spread(done["final_count_accuracy"]),
        ]
        if unseen is not None:
            cells += [
                _spread(done[f"final_count_accuracy_{unseen}"]),
                _spread(done.get("final_count_accuracy_in_distribution", pd.Series())),
                _spread(done.get("final_over_count_rate", pd.Series())),
            ]
        else:
            cells += [
                _spread(done.get("final_count_accuracy_mode", pd.Series())),
                _iterations(done["iterations_to_target"]),
            ]
        ev = evals[(evals["experiment"] == experiment) & (evals["variant"] == variant)]
        for a in at:
            cells.append(_spread(ev.loc[ev["iteration"] == a, "count_accuracy"]))
        cells.append(_spread(done["wall_time_s"] / 60, digits=0))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path)
    p.add_argument("--at", type=int, nargs="*", default=[5000, 10000, 25000])
    a = p.parse_args()
    runs = pd.read_csv(a.results / "runs.csv")
    evals = pd.read_csv(a.results / "evals.csv")
    for experiment in sorted(runs["experiment"].unique(), key=lambda e: (e in UNSEEN, e)):
        print(f"\n{experiment}\n")
        print(table(runs, evals, experiment, a.at))


if __name__ == "__main__":
    main()
