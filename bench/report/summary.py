"""From gathered results to the numbers a page shows: status, verdicts, failures, comparisons.

Everything here is plain data (dicts, lists, floats) so that the tests can check the numbers
without parsing HTML, and the templates only lay them out.

Which runs count where:
- finished  status complete, error or timeout. `n` in "converged k/n" counts every finished run,
            crashed ones included: a variant whose runs crash has not converged.
- pending   status queued, running or partial; listed as still to come, never in k/n.
- converged outcome "converged", decided by the trainer from the config's
            `eval.converged_accuracy` and `eval.converged_evals`.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.report import stats
from bench.report.failures import KINDS, classify, parse_confusion, traceback_excerpt

log = logging.getLogger(__name__)

FINISHED = ("complete", "error", "timeout")
PENDING = ("running", "queued", "partial")
MAX_COUNT = 3  # count_accuracy_0..3 columns of the gathered tables
# Generalisation experiments and the held-out count their headline accuracy is measured on.
GENERALISATION = {"interpolation": 2, "extrapolation": 3}
# The AIR paper's strong-generalisation figures (../shared/docs/REFERENCE.md, section 3.1.1).
PAPER_GENERALISATION = {
    "interpolation": {"AIR": 0.60, "DAIR": 0.95},
    "extrapolation": {"AIR": 0.00, "DAIR": 0.80},
}
IGNORED_CONFIG_KEYS = ("seed", "out_dir", "train.progress")  # differ per run by design

RUN_COLUMNS: dict[str, Any] = {
    "experiment": "",
    "variant": "",
    "seed": -1,
    "config_hash": None,
    "run_dir": None,
    "status": "partial",
    "outcome": None,
    "diverged_at": math.nan,
    "iterations": math.nan,
    "target_iterations": math.nan,
    "wall_time_s": math.nan,
    "iterations_to_target": math.nan,
    "final_count_accuracy": math.nan,
    **{f"final_count_accuracy_{k}": math.nan for k in range(MAX_COUNT + 1)},
    "final_elbo": math.nan,
    "final_iw_bound": math.nan,
    "final_box_iou": math.nan,
    "final_mean_count": math.nan,
    "final_confusion": None,
    "error": None,
    "slurm_job_id": None,
    "git_commit": None,
    "device": None,
    "host": None,
    "converged_accuracy": math.nan,
    "converged_evals": math.nan,
}
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


# ---------------------------------------------------------------------------------- variants
@dataclass
class VariantInfo:
    """What the report knows about a variant beyond its results."""

    name: str
    description: str = ""
    reference: Any = None  # bench.variants.Reference, or None when unknown
    folder: bool = False  # its folder exists under implementations/
    broken: str | None = None  # why its folder cannot be loaded, if so
    dair: bool | None = None  # model.dair of its config (None: unknown)
    config_known: bool = False  # a config was found (folder or run); else config_diff is empty
    config_diff: list[tuple[str, Any, Any]] = field(default_factory=list)  # (key, base, ours)


class _Absent:
    """A key one side of a config difference does not have (unlike an explicit null)."""

    def __repr__(self) -> str:
        return "(not set)"

    __str__ = __repr__


ABSENT = _Absent()


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> {"a.b.c": value}; lists stay values, empty mappings vanish."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` deep-merged onto `base`: a key a config file leaves out has its default value."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def config_diff(config: Mapping[str, Any], base: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, base value, this value) for every key that differs, seed and out_dir excluded."""
    ours, theirs = flatten(_merged(base, config)), flatten(base)
    keys = sorted(set(ours) | set(theirs))
    return [
        (k, theirs.get(k, ABSENT), ours.get(k, ABSENT))
        for k in keys
        if k not in IGNORED_CONFIG_KEYS and ours.get(k, ABSENT) != theirs.get(k, ABSENT)
    ]


def base_config() -> dict[str, Any]:
    """The schema defaults every variant's difference is measured against."""
    from bench.config import load_config, to_dict

    return to_dict(load_config())


def read_run_config(run_dir: Any) -> dict[str, Any] | None:
    """The resolved config.yaml of a run folder as a dict, or None when unreadable."""
    if not isinstance(run_dir, str | Path) or not str(run_dir):
        return None
    path = Path(run_dir) / "config.yaml"
    try:
        from omegaconf import OmegaConf

        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception:  # a missing or damaged file only loses the config column
        return None
    return loaded if isinstance(loaded, dict) else None


def variant_infos(
    names: Iterable[str], runs: pd.DataFrame, root: Path | str | None = None
) -> dict[str, VariantInfo]:
    """Descriptions, references, DAIR flags and config differences of the named variants.

    Variants come from their folders (bench.variants.discover). A variant whose folder is gone
    is still reported: no description or reference, its config read from one of its runs.
    """
    from bench.config import to_dict
    from bench.variants import IMPLEMENTATIONS, discover

    base = base_config()
    try:
        found = discover(root or IMPLEMENTATIONS)
        variants, broken = found.variants, found.broken
    except Exception as err:  # no implementations folder: every variant is "unknown"
        log.warning("cannot discover variants: %s", err)
        variants, broken = {}, {}
    infos: dict[str, VariantInfo] = {}
    for name in sorted(set(names) | set(variants) | set(broken)):
        info = VariantInfo(name=name, broken=broken.get(name))
        cfg: dict[str, Any] | None = None
        if name in variants:
            v = variants[name]
            info.folder = True
            info.description, info.reference = v.spec.description, v.spec.reference
            try:
                cfg = to_dict(v.run_config())
            except Exception as err:  # reported, never fatal
                info.broken = info.broken or str(err)
        if cfg is None:
            for run_dir in runs.loc[runs["variant"] == name, "run_dir"]:
                if (cfg := read_run_config(run_dir)) is not None:
                    break
        if cfg is not None:
            info.config_known = True
            info.config_diff = config_diff(cfg, base)
            info.dair = bool(flatten(_merged(base, cfg)).get("model.dair", False))
        elif name.lower().startswith("dair"):
            info.dair = True  # no config anywhere: the naming convention is all there is
        infos[name] = info
    return infos


# ---------------------------------------------------------------------------------- status
def convergence_rule(runs: pd.DataFrame) -> list[str]:
    """The convergence definition(s) in force, one line per distinct (accuracy, evaluations)."""
    rules = runs[["converged_accuracy", "converged_evals"]].dropna().drop_duplicates()
    if rules.empty:
        from bench.config import EvalConfig

        rules = pd.DataFrame(
            [{"converged_accuracy": EvalConfig.converged_accuracy,
              "converged_evals": EvalConfig.converged_evals}]
        )  # fmt: skip
    lines = []
    for acc, n in rules.itertuples(index=False):
        who = runs.loc[
            (runs["converged_accuracy"] == acc) & (runs["converged_evals"] == n), "variant"
        ].unique()
        last = "the last periodic evaluation" if int(n) == 1 else (
            f"each of the last {int(n)} periodic evaluations"
        )  # fmt: skip
        line = (
            f"count accuracy >= {acc:g} in {last} (eval.converged_accuracy, eval.converged_evals)"
        )
        if len(rules) > 1:
            line += " for " + ", ".join(sorted(who))
        lines.append(line)
    return lines


def _seed_ranges(seeds: Iterable[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8"."""
    seeds = sorted(set(int(s) for s in seeds))
    parts = []
    for _, group in itertools.groupby(enumerate(seeds), key=lambda p: p[1] - p[0]):
        run = [s for _, s in group]
        parts.append(f"{run[0]}" if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ", ".join(parts)


def experiment_status(
    runs: pd.DataFrame,
    experiment: str,
    expected: Mapping[str, Iterable[int]] | None,
    known_variants: Iterable[str],
) -> dict[str, Any]:
    """What is finished, what is still running or queued, and what is missing."""
    by_status = Counter(runs["status"])
    pending = []
    for (variant, status), group in runs[runs["status"].isin(PENDING)].groupby(
        ["variant", "status"]
    ):
        if status == "queued":  # nothing to show but which seeds
            seeds = list(group["seed"])
            progress = [f"seed{'s' if len(seeds) > 1 else ''} {_seed_ranges(seeds)}"]
        else:
            done, total = group["iterations"], group["target_iterations"]
            progress = [
                f"seed {s}: {d:,.0f}/{t:,.0f} iterations" if d == d and t == t else f"seed {s}"
                for s, d, t in zip(group["seed"], done, total, strict=True)
            ]
        pending.append({"variant": variant, "status": status, "runs": progress})
    present = {v: set(g["seed"]) for v, g in runs.groupby("variant")}
    planned = expected is not None
    if expected is None:  # without the launcher's plan, every variant should have every seed
        all_seeds = set().union(*present.values()) if present else set()
        expected = {v: all_seeds for v in present}
    missing = []
    for variant, seeds in sorted(expected.items()):
        lost = set(seeds) - present.get(variant, set())
        if lost:
            missing.append({"variant": variant, "seeds": _seed_ranges(lost), "count": len(lost)})
    absent = sorted(set(known_variants) - set(present) - set(expected))
    n_finished = sum(by_status[s] for s in FINISHED)
    n_missing = sum(m["count"] for m in missing)
    return {
        "experiment": experiment,
        "total": len(runs) + n_missing,
        "finished": n_finished,
        "by_status": dict(sorted(by_status.items())),
        "pending": pending,
        "missing": missing,
        "planned": planned,  # False: "missing" inferred from the seeds other variants have
        "absent_variants": absent,
        "complete": n_finished == len(runs) and n_missing == 0 and len(runs) > 0,
    }


# ---------------------------------------------------------------------------------- verdicts
def experiment_order(names: Iterable[str]) -> list[str]:
    """Experiments in reading order: the others by name, then interpolation, extrapolation."""
    gen = list(GENERALISATION)
    return sorted(set(names), key=lambda n: (n in gen, gen.index(n) if n in gen else 0, n))


def headline_column(experiment: str) -> str:
    """The accuracy a variant is judged by: overall, or on the held-out count."""
    k = GENERALISATION.get(experiment)
    return "final_count_accuracy" if k is None else f"final_count_accuracy_{k}"


def headline_label(experiment: str) -> str:
    k = GENERALISATION.get(experiment)
    return "final count accuracy" if k is None else f"count accuracy on {k}-digit images"


def _triple(values: pd.Series) -> dict[str, float]:
    med, q25, q75 = stats.median_iqr(values)
    return {"median": med, "q25": q25, "q75": q75, "n": int(np.isfinite(values).sum())}


def verdict(group: pd.DataFrame, experiment: str, info: VariantInfo | None) -> dict[str, Any]:
    """One row of the verdict table: convergence, speed, accuracy, bounds, published figures."""
    finished = group[group["status"].isin(FINISHED)]
    complete = finished[finished["status"] == "complete"]
    converged = complete[complete["outcome"] == "converged"]
    k, n = len(converged), len(finished)
    lo, hi = stats.wilson_interval(k, n)
    iters = converged["iterations_to_target"].to_numpy(dtype=float)
    i_lo, i_hi = stats.bootstrap_median_ci(iters)
    head = headline_column(experiment)
    per_count = []
    for c in range(MAX_COUNT + 1):
        values = complete[f"final_count_accuracy_{c}"]
        if np.isfinite(values).any():
            per_count.append({"count": c, "median": stats.median_iqr(values)[0]})
    row: dict[str, Any] = {
        "variant": str(group["variant"].iloc[0]),
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
        "accuracy": _triple(complete["final_count_accuracy"]),
        "headline": _triple(complete[head]),
        "per_count": per_count,
        "elbo": _triple(complete["final_elbo"]),
        "iw_bound": _triple(complete["final_iw_bound"]),
        "box_iou": _triple(complete["final_box_iou"]),
        "wall_time_s": stats.median_iqr(complete["wall_time_s"])[0],
    }
    row["reference"] = reference_rows(row, experiment, info)
    ref = info.reference if info else None
    row["source"] = _source(ref) if info and info.folder else None
    if experiment in GENERALISATION and row["reference"]:
        # A variant's source names where its main figures come from; these come from the paper.
        row["source"] = "Eslami et al. 2016, section 3.1.1 (REFERENCE.md, strong generalisation)"
    return row


def _source(ref: Any) -> str:
    if ref is None:
        return "none published"
    text = ref.source or "unnamed source"
    if ref.rows:
        text += f" (REFERENCE.md row{'s' if len(ref.rows) > 1 else ''} "
        text += ", ".join(str(r) for r in ref.rows) + ")"
    return text


def reference_rows(
    row: dict[str, Any], experiment: str, info: VariantInfo | None
) -> list[dict[str, Any]]:
    """Published figures of this variant next to ours: label, ours, published, digits."""
    ref = info.reference if info else None
    if ref is None:
        return []
    items: list[tuple[str, float, float | None, int]] = []
    if experiment in GENERALISATION:
        published = getattr(ref, f"{experiment}_accuracy", None)
        items.append((headline_label(experiment), row["headline"]["median"], published, 3))
    else:
        items += [
            ("success rate", row["rate"], ref.success_rate, 2),
            ("count accuracy", row["accuracy"]["median"], ref.count_accuracy, 3),
            ("iterations to target", row["iters"]["median"], ref.iterations_to_target, 0),
            ("ELBO", row["elbo"]["median"], ref.elbo, 1),
            ("IW bound", row["iw_bound"]["median"], ref.iw_bound, 1),
        ]
        ours_by_count = {p["count"]: p["median"] for p in row["per_count"]}
        for c, published in sorted((ref.count_accuracy_by_count or {}).items()):
            items.append((f"accuracy, {c} digits", ours_by_count.get(int(c), math.nan),
                          published, 3))  # fmt: skip
    return [
        {"label": label, "ours": ours, "published": float(pub), "digits": digits,
         "delta": ours - float(pub) if ours == ours else math.nan}
        for label, ours, pub, digits in items
        if pub is not None
    ]  # fmt: skip


# ---------------------------------------------------------------------------------- failures
def failures(runs: pd.DataFrame) -> dict[str, Any]:
    """Every finished, not converged run classified; counts per variant and class."""
    failed = runs[
        runs["status"].isin(FINISHED)
        & ~((runs["status"] == "complete") & (runs["outcome"] == "converged"))
    ]
    listed = []
    for _, r in failed.iterrows():
        f = classify(r)
        listed.append({
            "variant": r["variant"],
            "seed": int(r["seed"]),
            "kind": f.kind,
            "evidence": f.evidence,
            "accuracy": r["final_count_accuracy"],
            "traceback": traceback_excerpt(r["error"]),
            "run_dir": r["run_dir"] if isinstance(r["run_dir"], str) else "",
        })  # fmt: skip
    counts = Counter((f["variant"], f["kind"]) for f in listed)
    kinds = [k for k in KINDS if any(kind == k for _, kind in counts)]
    table = []
    for variant in sorted(runs["variant"].unique()):
        finished = int(runs.loc[runs["variant"] == variant, "status"].isin(FINISHED).sum())
        cells = [counts.get((variant, k), 0) for k in kinds]
        table.append({"variant": variant, "finished": finished, "failed": sum(cells),
                      "cells": cells})  # fmt: skip
    return {"kinds": kinds, "table": table, "runs": listed}


# ---------------------------------------------------------------------------------- comparisons
def comparisons(runs: pd.DataFrame, experiment: str) -> list[dict[str, Any]]:
    """Every pair of variants: convergence-rate difference (Fisher exact p) and P(A beats B)."""
    head = headline_column(experiment)
    groups = {}
    for variant, g in runs.groupby("variant"):
        finished = g[g["status"].isin(FINISHED)]
        if len(finished) == 0:
            continue
        complete = finished[finished["status"] == "complete"]
        k = int((complete["outcome"] == "converged").sum())
        groups[variant] = (k, len(finished), complete[head].to_numpy(dtype=float))
    out = []
    for a, b in itertools.combinations(sorted(groups), 2):
        (ka, na, acc_a), (kb, nb, acc_b) = groups[a], groups[b]
        out.append({
            "a": a, "b": b, "ka": ka, "na": na, "kb": kb, "nb": nb,
            "diff": ka / na - kb / nb,
            "fisher_p": stats.fisher_p(ka, na, kb, nb),
            "p_superior": stats.prob_superiority(acc_a, acc_b),
            "mw_p": stats.mann_whitney_p(acc_a, acc_b),
            "n_acc": (int(np.isfinite(acc_a).sum()), int(np.isfinite(acc_b).sum())),
        })  # fmt: skip
    return out


# ---------------------------------------------------------------------------------- provenance
def read_result(run_dir: Any) -> dict[str, Any] | None:
    if not isinstance(run_dir, str | Path) or not str(run_dir):
        return None
    try:
        loaded = json.loads((Path(run_dir) / "result.json").read_text())
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


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


def experiment_configs(runs: pd.DataFrame, infos: Mapping[str, VariantInfo]) -> dict[str, Any]:
    """The resolved configs this experiment's runs used, as differences from the base config.

    Settings shared by every variant here (the experiment's own, e.g. its digit counts) are shown
    once; each variant then lists only what it changes on top. Falls back to the variant folder
    when no run folder has a readable config.yaml.
    """
    base = base_config()
    diffs: dict[str, dict[str, tuple[Any, Any]]] = {}
    hashes: dict[str, list[str]] = {}
    for variant, g in runs.groupby("variant"):
        hashes[variant] = sorted({str(h) for h in g["config_hash"] if isinstance(h, str)})
        cfg = next((c for d in g["run_dir"] if (c := read_run_config(d)) is not None), None)
        if cfg is not None:
            diffs[variant] = {k: (b, o) for k, b, o in config_diff(cfg, base)}
        elif variant in infos and infos[variant].config_known:
            diffs[variant] = {k: (b, o) for k, b, o in infos[variant].config_diff}
    common: dict[str, tuple[Any, Any]] = {}
    if len(diffs) > 1:
        first, *rest = diffs.values()
        common = {k: v for k, v in first.items() if all(d.get(k) == v for d in rest)}
    per_variant = {
        v: [(k, b, o) for k, (b, o) in sorted(d.items()) if k not in common]
        for v, d in diffs.items()
    }
    return {
        "common": [(k, b, o) for k, (b, o) in sorted(common.items())],
        "variants": per_variant,
        "unknown": sorted(set(hashes) - set(diffs)),  # no config anywhere
        "hashes": hashes,
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
