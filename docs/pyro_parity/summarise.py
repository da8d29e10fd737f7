"""Gather the learning curves of run_ours.py / run_pyro.py into one CSV, a table and a plot.

    python docs/pyro_parity/summarise.py [--results docs/pyro_parity/results] [--plot PNG]

Writes `curves.csv` (every evaluation of every run) in the results folder, prints a markdown
table of the sampled count accuracy per implementation and iteration (median, min-max, number of
seeds) and each seed's figure at the last iteration, and draws the curves (one thin line per
seed, the median thick; default `curves.png` beside this script).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
# The runs' labels -> what they are (the `impl` column of the CSVs is kept as written).
NAMES = {
    "pyro": "pyro",
    "ours_before": "ours",  # air_nvil_fixed as it is (unscaled baseline, analytic KL)
    "ours_fixed": "ours+pyro_baseline",  # estimator.params.baseline_scale=64/60000
    "ours_fixed_where": "ours+pyro_baseline+where",  # ... and model.where_scale_relative=true
    "ours_pyroform_pyroinit": "ours_pyro_form_pyro_init",  # ... and kl_estimate=sampled, Pyro's
    "ours_frame": "ours",  # air_nvil_fixed as it is, on the frame layout (results_frame/)
}


def load(results: Path) -> pd.DataFrame:
    files = sorted(results.glob("*_seed*.csv"))
    if not files:
        raise SystemExit(f"{results}: no *_seed*.csv learning curves found")
    frames = [pd.read_csv(f) for f in files]
    curves = pd.concat(frames, ignore_index=True)
    curves["impl"] = curves.impl.map(lambda x: NAMES.get(x, x))
    return curves


def table(curves: pd.DataFrame, every: int = 1000) -> str:
    """Iterations down, implementations across; a cell: median [min-max] (seeds)."""
    rows = curves[curves.iteration % every == 0]
    impls = list(dict.fromkeys(NAMES.get(k, k) for k in NAMES)) + sorted(
        set(rows.impl) - set(NAMES.values())
    )
    impls = [i for i in impls if i in set(rows.impl)]
    out = ["| iteration | " + " | ".join(impls) + " |", "|---:|" + "---|" * len(impls)]
    for it in sorted(rows.iteration.unique()):
        cells = []
        for impl in impls:
            v = rows[(rows.impl == impl) & (rows.iteration == it)].count_accuracy
            if v.empty:
                cells.append("")
            elif len(v) == 1:
                cells.append(f"{v.iloc[0]:.3f} (1)")
            else:
                cells.append(f"{v.median():.3f} [{v.min():.3f}-{v.max():.3f}] ({len(v)})")
        out.append(f"| {it} | " + " | ".join(cells) + " |")
    last = curves.iteration.max()
    out.append(f"\nAt {last}, per seed:")
    for impl in impls:
        d = curves[(curves.impl == impl) & (curves.iteration == last)].sort_values("seed")
        if not d.empty:
            seeds = ", ".join(
                f"{a:.3f} (seed {s})" for s, a in zip(d.seed, d.count_accuracy, strict=True)
            )
            out.append(f"- {impl}: {seeds}")
    return "\n".join(out)


def plot(curves: pd.DataFrame, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = {
        "pyro": "tab:red",
        "ours": "tab:gray",
        "ours+pyro_baseline": "tab:blue",
        "ours+pyro_baseline+where": "tab:green",
        "ours_pyro_form_pyro_init": "tab:purple",
    }
    for impl, d in curves.groupby("impl"):
        c = colours.get(impl)
        for _, s in d.groupby("seed"):
            ax.plot(s.iteration, s.count_accuracy, color=c, alpha=0.35, lw=0.8)
        med = d.groupby("iteration").count_accuracy.median()
        n = d.seed.nunique()
        full = d[d.iteration == d.iteration.max()].seed.nunique()
        label = f"{impl} ({n} seeds, {full} to {d.iteration.max()})"
        ax.plot(med.index, med.values, color=c, lw=2.2, label=label)
    ax.set_xlabel("iteration")
    ax.set_ylabel("count accuracy (sampled)")
    ax.set_title("3000 held-out canvases; thin: seeds, thick: median", fontsize=9)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--plot", type=Path, default=HERE / "curves.png", help="where to draw")
    args = ap.parse_args()
    curves = load(args.results).sort_values(["impl", "seed", "iteration"])
    tmp = args.results / "curves.csv.tmp"
    curves.to_csv(tmp, index=False)
    os.replace(tmp, args.results / "curves.csv")
    sys.stdout.write(table(curves) + "\n")
    plot(curves, args.plot)


if __name__ == "__main__":
    main()
