"""The final metrics of one verdict row, each computed the way its name says.

Runs record their final metrics in result.json (bench/evaluate.py lists every key). Since
`metrics_version` 2 the counts come from one posterior sample per image (the references'
definition) and the mode-based counts sit beside them (`count_accuracy_mode`); results of older
code carry no `metrics_version` and have mode counts in `count_accuracy`, ELBOs at the run's own
prior (the relaxed objective for Concrete runs) and no addtt estimator. A row never mixes the
two silently:

- sampled figures (headline accuracy, per-count accuracy, bounds, boxes) come from version-2
  runs only; a row with only older runs has none, and says so;
- mode figures pool version-2 runs' `count_accuracy_mode` with older runs' `count_accuracy`
  (the same definition);
- every row carries `versions` (runs of each kind) and `count_definition` ("sampled", "mode"
  for rows of older runs only, "mixed"), which the page prints beside its numbers.

Generalisation rows (interpolation, extrapolation): a run that draws 3 objects everywhere scores
100 % on 3-digit images, so the accuracy on the unseen count is shown beside the same run's
in-distribution accuracy and over-count rate, and the headline uses only runs that count the
training counts: final in-distribution accuracy >= GENERALISATION_MIN_IN_DISTRIBUTION.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from bench.report import stats
from bench.report.experiments import HEADLINE

METRICS_VERSION = 2  # bench/evaluate.py: the first version with sampled counts
MAX_COUNT = 3  # count_accuracy_0..3
# Generalisation experiments and the count never seen in training that they are judged on:
# from the experiments' YAML as the grid records stored it (bench/report/experiments.py).
GENERALISATION = HEADLINE
# The headline generalisation figure counts a run only if it counts the training counts.
GENERALISATION_MIN_IN_DISTRIBUTION = 0.9
REFERENCE_PRIOR = 0.01  # bench.scoring.REFERENCE_PRIOR: the "_at_0.01" keys
AT = f"_at_{REFERENCE_PRIOR}"


def generalisation_rule() -> str:
    """The headline rule of the generalisation pages, in words."""
    return (
        "the headline accuracy on the unseen count uses only runs whose final sampled count "
        f"accuracy on the training counts (in-distribution) is at least "
        f"{GENERALISATION_MIN_IN_DISTRIBUTION:g}; the other runs are listed, marked, and left out"
    )


def versions(runs: pd.DataFrame) -> pd.Series:
    """Metrics version of each run: 1 where the result records none (older code)."""
    if "final_metrics_version" not in runs:
        return pd.Series(1, index=runs.index, dtype=int)
    found = pd.to_numeric(runs["final_metrics_version"], errors="coerce")
    return found.fillna(1).astype(int)


def column(runs: pd.DataFrame, name: str) -> pd.Series:
    """A numeric column, all NaN where the table lacks it (a metric older runs never wrote)."""
    if name not in runs:
        return pd.Series(np.nan, index=runs.index, dtype=float)
    return pd.to_numeric(runs[name], errors="coerce").astype(float)


def triple(values: pd.Series | np.ndarray, old: bool = False) -> dict[str, Any]:
    """Median, interquartile range and number of finite values; `old`: from older runs."""
    values = np.asarray(values, dtype=float)
    med, q25, q75 = stats.median_iqr(values)
    return {"median": med, "q25": q25, "q75": q75, "n": int(np.isfinite(values).sum()),
            "old": old}  # fmt: skip


def qualifies(runs: pd.DataFrame) -> pd.Series:
    """Runs that count their training counts (the generalisation headline rule)."""
    ok = column(runs, "final_count_accuracy_in_distribution") >= GENERALISATION_MIN_IN_DISTRIBUTION
    return ok & (versions(runs) >= METRICS_VERSION)


def count_definition(n_new: int, n_old: int) -> str:
    if n_new and n_old:
        return "mixed"
    return "sampled" if n_new else ("mode" if n_old else "none")


def scale_of(likelihood: Any, sd: Any) -> str:
    """The scale of an ELBO in words: "Gaussian sd 0.3", "Bernoulli", or "" when unknown."""
    if likelihood == "bernoulli":
        return "Bernoulli"
    if likelihood == "gaussian":
        return f"Gaussian sd {float(sd):g}" if _finite(sd) else "Gaussian, sd unknown"
    return ""


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def config_scale(raw_config: Mapping[str, Any] | None) -> str:
    """The scale a run config trains on (model.likelihood; the schema default is Gaussian 0.3)."""
    from bench.report.configs import flatten

    if raw_config is None:
        return ""
    flat = flatten(raw_config)  # a resolved config (config.yaml or the grid record's) has all
    return scale_of(flat.get("model.likelihood"), flat.get("model.likelihood_sd"))


def row_scale(complete: pd.DataFrame, raw_config: Mapping[str, Any] | None) -> str:
    """The likelihood scale of a row's ELBOs: from its results, else from its config."""
    if "final_likelihood" in complete:
        sds = column(complete, "final_likelihood_sd")
        found = {scale_of(lik, sd) for lik, sd in zip(complete["final_likelihood"], sds,
                                                      strict=True)} - {""}  # fmt: skip
        if len(found) == 1:
            return found.pop()
        if len(found) > 1:
            return "mixed: " + " and ".join(sorted(found))
    return config_scale(raw_config)


def row_measures(
    complete: pd.DataFrame, experiment: str, raw_config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Every final figure of one row's complete runs (see the module docstring)."""
    v = versions(complete)
    new, old = complete[v >= METRICS_VERSION], complete[v < METRICS_VERSION]
    out: dict[str, Any] = {
        "versions": {"new": len(new), "old": len(old)},
        "count_definition": count_definition(len(new), len(old)),
        "accuracy": triple(column(new, "final_count_accuracy")),
        "accuracy_mode": triple(
            pd.concat(
                [column(new, "final_count_accuracy_mode"), column(old, "final_count_accuracy")]
            )
        ),  # fmt: skip
        "in_distribution": triple(column(new, "final_count_accuracy_in_distribution")),
        "over_count": triple(column(new, "final_over_count_rate")),
        "under_count": triple(column(new, "final_under_count_rate")),
        "mean_count": triple(column(new, "final_mean_count")),
        "scale": row_scale(new if len(new) else old, raw_config),
        "prior": triple(column(new, "final_prior_prob")),
        "iw_samples": triple(column(new, "final_iw_samples")),
    }
    per_count, per_count_mode = [], []
    for c in range(MAX_COUNT + 1):
        sampled = column(new, f"final_count_accuracy_{c}")
        mode = pd.concat([column(new, f"final_count_accuracy_mode_{c}"),
                          column(old, f"final_count_accuracy_{c}")])  # fmt: skip
        if np.isfinite(sampled).any():
            per_count.append({"count": c, "median": stats.median_iqr(sampled)[0]})
        if np.isfinite(mode).any():
            per_count_mode.append({"count": c, "median": stats.median_iqr(mode)[0]})
    out["per_count"], out["per_count_mode"] = per_count, per_count_mode
    # Likelihood scores and boxes: version-2 runs; a row of older runs only shows theirs, marked.
    source, is_old = (new, False) if len(new) else (old, True)
    for key in ("elbo", "iw_bound", "box_iou"):
        out[key] = triple(column(source, f"final_{key}"), old=is_old)
    for key in ("lme_elbo_bound", "elbo_relaxed", "box_iou_frame", "box_precision", "box_recall",
                f"elbo{AT}", f"iw_bound{AT}", f"lme_elbo_bound{AT}"):  # fmt: skip
        out[key.replace(AT, "_ref")] = triple(column(new, f"final_{key}"))
    prior = out["prior"]["median"]
    out["rescored"] = _finite(prior) and abs(prior - REFERENCE_PRIOR) > 1e-12
    held = GENERALISATION.get(experiment)
    if held is not None:
        out["generalisation"] = _generalisation(new, old, held)
    return out


def _generalisation(new: pd.DataFrame, old: pd.DataFrame, held: int) -> dict[str, Any]:
    """The unseen count's accuracy beside each run's in-distribution accuracy and over-counting."""
    col = f"final_count_accuracy_{held}"
    ok = qualifies(new)
    runs = [
        {"seed": int(seed), "held": acc, "in_distribution": ind, "over_count": over,
         "qualifies": bool(q), "old": False}
        for seed, acc, ind, over, q in zip(
            new["seed"], column(new, col), column(new, "final_count_accuracy_in_distribution"),
            column(new, "final_over_count_rate"), ok, strict=True)
    ] + [
        {"seed": int(seed), "held": acc, "in_distribution": math.nan, "over_count": math.nan,
         "qualifies": False, "old": True}
        for seed, acc in zip(old["seed"], column(old, col), strict=True)
    ]  # fmt: skip
    return {
        "count": held,
        "headline": triple(column(new[ok], col)),  # runs that count the training counts
        "all": triple(column(new, col)),  # every version-2 run, qualifying or not
        "mode": triple(
            pd.concat([column(new, f"final_count_accuracy_mode_{held}"), column(old, col)])
        ),  # fmt: skip
        "qualifying": int(ok.sum()),
        "runs": sorted(runs, key=lambda r: r["seed"]),
    }
