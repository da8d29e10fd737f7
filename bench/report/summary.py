"""From gathered results to the numbers a page shows: verdicts, failures, comparisons.

Everything here is plain data (dicts, lists, floats) so that the tests can check the numbers
without parsing HTML, and the templates only lay them out. A verdict is about one row: the runs
of one variant under one config (bench.report.rows); runs of different configs are never pooled.

Which runs count where:
- finished  status complete, error or timeout. `n` in "converged k/n" counts every finished run,
            crashed ones included: a variant whose runs crash has not converged.
- pending   status queued, running, partial or interrupted; listed as still to come, never in k/n.
- converged outcome "converged", decided by the trainer from the config's
            `eval.converged_accuracy` and `eval.converged_evals`.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.report import stats
from bench.report.configs import VariantInfo
from bench.report.experiments import (  # noqa: F401  (headline_*: re-exported)
    PAPER,
    PAPER_SOURCE,
    headline_column,
    headline_label,
)
from bench.report.failures import KINDS, classify, parse_confusion, traceback_excerpt
from bench.report.fidelity import published_comparison
from bench.report.measures import (  # noqa: F401  (GENERALISATION, MAX_COUNT: re-exported)
    GENERALISATION,
    MAX_COUNT,
    METRICS_VERSION,
    column,
    qualifies,
    row_measures,
    versions,
)
from bench.report.rows import ROW, Row, rule_text
from bench.run_folder import read_result as read_result_file
from bench.run_table import RUN_SCHEMA

log = logging.getLogger(__name__)

FINISHED = ("complete", "error", "timeout")
PENDING = ("running", "queued", "partial", "interrupted")
# The paper's figure per experiment and model family, from the experiments' YAML as recorded.
PAPER_GENERALISATION = PAPER

RUN_COLUMNS: dict[str, Any] = RUN_SCHEMA  # one schema with bench.gather's (bench/run_table.py)
EVAL_COLUMNS: dict[str, Any] = {
    "experiment": "",
    "variant": "",
    "seed": -1,
    "config_hash": None,
    "iteration": math.nan,
    "wall_time": math.nan,
    "count_accuracy": math.nan,
    "elbo": math.nan,
}
NUMERIC_RUN_COLUMNS = [k for k, v in RUN_COLUMNS.items() if isinstance(v, float)]


def normalise_runs(runs: pd.DataFrame | None) -> pd.DataFrame:
    """The runs table with every column the report reads (missing ones filled as absent)."""
    df = pd.DataFrame(columns=list(RUN_COLUMNS)) if runs is None else runs.copy()
    for col, default in RUN_COLUMNS.items():
        if col not in df.columns:
            df[col] = default
    for col in NUMERIC_RUN_COLUMNS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    for col in ("experiment", "variant", "status"):
        df[col] = df[col].astype(str)
    df["seed"] = pd.to_numeric(df["seed"], errors="coerce").fillna(-1).astype(int)
    return df.sort_values(["experiment", "variant", "seed"], kind="stable").reset_index(drop=True)


def normalise_evals(evals: pd.DataFrame | None) -> pd.DataFrame:
    """The evaluations table with the columns the learning curves read."""
    df = pd.DataFrame(columns=list(EVAL_COLUMNS)) if evals is None else evals.copy()
    for col, default in EVAL_COLUMNS.items():
        if col not in df.columns:
            df[col] = default
    for col in ("experiment", "variant"):
        df[col] = df[col].astype(str)
    for col in ("iteration", "count_accuracy", "elbo"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    return df


# ---------------------------------------------------------------------------------- verdicts
def experiment_order(names: Iterable[str]) -> list[str]:
    """Experiments in reading order: the others by name, then interpolation, extrapolation."""
    gen = sorted(GENERALISATION, key=lambda e: (GENERALISATION[e], e))
    return sorted(set(names), key=lambda n: (n in gen, gen.index(n) if n in gen else 0, n))


def verdict(
    group: pd.DataFrame,
    experiment: str,
    info: VariantInfo | None,
    row: Row,
    rule_per_row: bool = False,
) -> dict[str, Any]:
    """One row of the verdict table (the runs of one variant under one config): convergence,
    speed, the final figures (bench.report.measures), and the published figures beside ours
    computed the same way (bench.report.fidelity)."""
    finished = group[group["status"].isin(FINISHED)]
    complete = finished[finished["status"] == "complete"]
    converged = complete[complete["outcome"] == "converged"]
    k, n = len(converged), len(finished)
    lo, hi = stats.wilson_interval(k, n)
    iters = converged["iterations_to_target"].to_numpy(dtype=float)
    i_lo, i_hi = stats.bootstrap_median_ci(iters)
    out: dict[str, Any] = {
        "variant": row.variant,
        "key": row.key,
        "config_hash": row.config_hash,
        "budget": row.budget,
        "details": row.details,
        "in_grid": row.in_grid,
        "rule": rule_text(row.rule, short=True) if rule_per_row else None,
        "missing": len(set(row.asked_seeds) - set(row.seeds)),
        "k": k,
        "n": n,
        "rate": k / n if n else math.nan,
        "rate_lo": lo,
        "rate_hi": hi,
        "pending": int(group["status"].isin(PENDING).sum()),
        "iters": {
            "median": stats.median_iqr(iters)[0],
            "lo": i_lo,
            "hi": i_hi,
            "n": int(np.isfinite(iters).sum()),
        },
        "wall_time_s": stats.median_iqr(complete["wall_time_s"])[0],
        "comparable": row.comparable,
        "budget_note": row.budget_note,
    }
    out.update(row_measures(complete, experiment, row.raw_config))
    gen = out.get("generalisation")
    out["headline"] = gen["headline"] if gen else out["accuracy"]
    out["headline_mode"] = gen["mode"] if gen else out["accuracy_mode"]
    out["headline_shown"] = _shown(out["headline"], out["headline_mode"], out["versions"])
    out["published"] = published_comparison(complete, experiment, row, out)
    out["reference"] = out["published"]["items"]
    known = bool(info and info.folder) or bool(row.reference_origin)
    out["source"] = _source(row.reference) if known else None
    if experiment in GENERALISATION and out["reference"]:
        # A variant's source names where its main figures come from; these come from the paper.
        out["source"] = PAPER_SOURCE.get(experiment) or "the AIR paper (the experiment's YAML)"
    return out


def _shown(sampled: dict[str, Any], mode: dict[str, Any], versions: dict[str, int]) -> dict:
    """The accuracy an overview cell shows: sampled, or for rows of older runs only the mode,
    marked ("none" when a generalisation row has no run that counts its training counts)."""
    if versions["new"]:
        return {"value": sampled["median"], "definition": "sampled" if sampled["n"] else "none"}
    if mode["n"]:
        return {"value": mode["median"], "definition": "mode"}
    return {"value": math.nan, "definition": "none"}


def _source(ref: Any) -> str:
    if ref is None:
        return "none published"
    text = ref.source or "unnamed source"
    if ref.rows:
        text += f" (REFERENCE.md row{'s' if len(ref.rows) > 1 else ''} "
        text += ", ".join(str(r) for r in ref.rows) + ")"
    return text


def headline_values(complete: pd.DataFrame, experiment: str) -> tuple[np.ndarray, str]:
    """Per-run headline accuracies of complete runs and their count definition: sampled from
    version-2 runs (on a generalisation test only runs that count the training counts), or,
    for rows of older runs only, their mode-based figure."""
    v = versions(complete)
    new, old = complete[v >= METRICS_VERSION], complete[v < METRICS_VERSION]
    head = headline_column(experiment)
    if len(new):
        if experiment in GENERALISATION:
            new = new[qualifies(new)]
        return column(new, head).to_numpy(dtype=float), "sampled"
    return column(old, head).to_numpy(dtype=float), "mode" if len(old) else "none"


# ---------------------------------------------------------------------------------- failures
def failures(
    runs: pd.DataFrame, rows: Iterable[Row], shown_path: Callable[[Any], str] = str
) -> dict[str, Any]:
    """Every finished, not converged run classified; counts per row and class.

    `runs` carries the ROW column (bench.report.rows.label_tables); `shown_path` turns a run
    folder into what the page prints (the report shows it relative to the results folder).
    """
    failed = runs[
        runs["status"].isin(FINISHED)
        & ~((runs["status"] == "complete") & (runs["outcome"] == "converged"))
    ]
    listed = []
    for _, r in failed.iterrows():
        f = classify(r)
        listed.append({
            "key": r[ROW],
            "variant": r["variant"],
            "seed": int(r["seed"]),
            "kind": f.kind,
            "evidence": f.evidence,
            "accuracy": r["final_count_accuracy"],
            "traceback": traceback_excerpt(r["error"]),
            "run_dir": shown_path(r["run_dir"]) if isinstance(r["run_dir"], str) else "",
        })  # fmt: skip
    counts = Counter((f["key"], f["kind"]) for f in listed)
    kinds = [k for k in KINDS if any(kind == k for _, kind in counts)]
    table = []
    for row in rows:
        mine = runs[runs[ROW] == row.key]
        if mine.empty:
            continue
        finished = int(mine["status"].isin(FINISHED).sum())
        cells = [counts.get((row.key, k), 0) for k in kinds]
        table.append({"key": row.key, "variant": row.variant, "finished": finished,
                      "failed": sum(cells), "cells": cells})  # fmt: skip
    return {"kinds": kinds, "table": table, "runs": listed}


# ---------------------------------------------------------------------------------- comparisons
def comparisons(runs: pd.DataFrame, rows: Iterable[Row], experiment: str) -> list[dict[str, Any]]:
    """Every pair of rows with the same budget, convergence rule and count definition:
    convergence-rate difference (Fisher exact p) and P(A beats B) on the headline accuracy.
    Rows trained for different numbers of iterations are not compared (the longer one would win
    by its budget alone), nor rows whose accuracies count differently (sampled against mode)."""
    groups = {}
    for row in rows:
        g = runs[runs[ROW] == row.key]
        finished = g[g["status"].isin(FINISHED)]
        if len(finished) == 0:
            continue
        complete = finished[finished["status"] == "complete"]
        k = int((complete["outcome"] == "converged").sum())
        values, definition = headline_values(complete, experiment)
        if definition == "sampled" and (versions(complete) < METRICS_VERSION).any():
            definition = "mixed"  # its rate counts runs converged under either definition
        like = (row.iterations if row.iterations == row.iterations else None, row.rule,
                definition)  # fmt: skip
        groups[row.key] = (k, len(finished), values, like)
    out = []
    for a, b in itertools.combinations(sorted(groups), 2):
        (ka, na, acc_a, like_a), (kb, nb, acc_b, like_b) = groups[a], groups[b]
        if like_a != like_b:
            continue
        out.append({
            "a": a, "b": b, "ka": ka, "na": na, "kb": kb, "nb": nb,
            "diff": ka / na - kb / nb,
            "fisher_p": stats.fisher_p(ka, na, kb, nb),
            "p_superior": stats.prob_superiority(acc_a, acc_b),
            "mw_p": stats.mann_whitney_p(acc_a, acc_b),
            "n_acc": (int(np.isfinite(acc_a).sum()), int(np.isfinite(acc_b).sum())),
            "definition": like_a[2],
        })  # fmt: skip
    return out


# ---------------------------------------------------------------------------------- provenance
def read_result(run_dir: Any) -> dict[str, Any] | None:
    if not isinstance(run_dir, str | Path) or not str(run_dir):
        return None
    return read_result_file(Path(run_dir))[0]


def _counted(values: Iterable[Any]) -> list[tuple[str, int]]:
    c = Counter(str(v) for v in values if v is not None and v == v and str(v) != "")
    return sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))


def run_provenance(runs: pd.DataFrame) -> dict[str, Any]:
    """Code versions, packages, hardware and commands behind the finished runs, with counts.

    More than one git commit or package set among the runs of one experiment is worth a reader's
    attention: the page lists every distinct value with how many runs used it.
    """
    finished = runs[runs["status"].isin(FINISHED)]
    provs = [(read_result(d) or {}).get("provenance") or {} for d in finished["run_dir"]]
    packages = [
        ", ".join(f"{k} {v}" for k, v in sorted(p["packages"].items()))
        for p in provs
        if isinstance(p.get("packages"), dict)
    ]
    commits = [p.get("git_commit") for p in provs]
    commits = [c or g for c, g in zip(commits, finished["git_commit"], strict=True)]
    devices = [p.get("device") or d for p, d in zip(provs, finished["device"], strict=True)]
    hosts = [p.get("host") or h for p, h in zip(provs, finished["host"], strict=True)]
    return {
        "commits": _counted(commits),
        "packages": _counted(packages),
        "python": _counted(p.get("python") for p in provs),
        "devices": _counted(devices),
        "hosts": _counted(hosts),
        "slurm_jobs": len(_counted(finished["slurm_job_id"])),
        "commands": _counted(p.get("command") for p in provs),
    }


def confusion_sum(group: pd.DataFrame) -> np.ndarray | None:
    """Final confusion matrices of complete runs, summed (rows true count, cols inferred)."""
    total = None
    for value in group.loc[group["status"] == "complete", "final_confusion"]:
        m = parse_confusion(value)
        if m is None:
            continue
        if total is None:
            total = m.copy()
        elif total.shape == m.shape:
            total += m
    return total
