"""Every run under a results folder, into pandas: one row per run, one row per evaluation.

    from bench.gather import gather
    g = gather(Path("results"))       # also writes results/runs.csv and results/evals.csv
    g.runs.groupby(["experiment", "variant"]).final_count_accuracy.describe()
    g.evals.query("variant == 'air_nvil_fixed'").plot(x="iteration", y="count_accuracy")

Only the run folders are read (`<experiment>/<variant>/<config_hash>/seed_<n>/`), plus the
SLURM queue for runs submitted but not finished. A file that cannot be read is reported in
`problems` and in the row's `error` column, never raised: gathering must work on a results
folder that jobs are writing to right now. The CSV files are replaced atomically, so two
gathers at once leave one complete file or the other. A run's `status` is the planner's own
decision (`bench.runstate.run_state`, as `RunState.table_status` shows it); the files are read
through bench/run_folder.py and the fixed columns are bench/run_table.py's.

Final metrics: every key of a result.json's "final" becomes a column `final_<key>`, and every
key of its "final_protocols" (the same metrics on a reference protocol's test images, e.g.
addtt's) a column `final_<protocol>_<key>`: numbers as floats, text as text, matrices as JSON.
No list names them, so a new metric needs no edit here. What each key means:
bench/evaluate.py. `final_metrics_version` is empty for results of older code, whose
`final_count_accuracy` counts the posterior mode rather than one sample.

`run_dir` in the returned table is the run folder as found under `results_root`; in runs.csv it
is relative to the folder the CSV sits in (the results folder), so the CSV names no path of the
machine that wrote it and stays right when the results folder is moved or copied.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from bench.run_folder import ATTEMPTS, CONFIG, METRICS, read_lines, read_result, read_submission
from bench.run_table import EVAL_KEYS, FIXED_FINAL, RUN_COLUMNS
from bench.runstate import (  # not bench.grid: gathering imports no model code
    Queue,
    SlurmError,
    run_state,
    slurm_available,
    slurm_queue,
)
from bench.storage import atomic_write_text

log = logging.getLogger(__name__)

# The fixed columns (and what a table lacking one holds): bench/run_table.py.
NAN = float("nan")


@dataclass
class Gathered:
    runs: pd.DataFrame  # one row per run folder (RUN_COLUMNS, then every other final_* key)
    evals: pd.DataFrame  # one row per line of every metrics.jsonl
    problems: list[str] = field(default_factory=list)  # files that could not be read


def run_folders(results_root: Path) -> list[Path]:
    """Every `<experiment>/<variant>/<hash>/seed_<n>` folder, in a stable order."""
    found = [p for p in results_root.glob("*/*/*/seed_*") if p.is_dir()]
    return sorted(p for p in found if not any(part.startswith(".") for part in p.parts[-4:]))


def _identity(run_dir: Path) -> dict[str, Any]:
    seed = run_dir.name.removeprefix("seed_")
    return {
        "experiment": run_dir.parents[2].name,
        "variant": run_dir.parents[1].name,
        "seed": int(seed) if seed.isdigit() else -1,
        "config_hash": run_dir.parent.name,
    }


def _config_fields(run_dir: Path, problems: list[str]) -> dict[str, Any]:
    path = run_dir / CONFIG
    out = {"target_iterations": NAN, "converged_accuracy": NAN, "converged_evals": NAN}
    if not path.exists():
        return out
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(path))
        out["target_iterations"] = cfg["train"]["iterations"]
        out["converged_accuracy"] = cfg["eval"]["converged_accuracy"]
        out["converged_evals"] = cfg["eval"]["converged_evals"]
    except Exception as err:  # yaml raises several types; a missing key is a KeyError
        problems.append(f"{path}: {type(err).__name__}: {err}")
    return out


def _run_row(
    run_dir: Path, queue: Queue | None, problems: list[str], history: list[dict[str, Any]]
) -> dict[str, Any]:
    row: dict[str, Any] = {**_identity(run_dir), "run_dir": str(run_dir)}
    row.update(_config_fields(run_dir, problems))
    row["attempts"] = len(read_lines(run_dir / ATTEMPTS, problems))
    submission = read_submission(run_dir) or {}
    # The planner's decision (bench.runstate), under the hash the folder is named by; a run
    # submitted while the queue cannot be asked, with nothing to say it started, is queued.
    state = run_state(run_dir, run_dir.parent.name, queue, unasked_is_queued=True)
    problem = state.problem
    if problem is not None:
        problems.append(f"{run_dir}: {problem}")
    record = state.record or {}
    provenance = record.get("provenance") or {}
    final = record.get("final") or {}
    status = state.table_status
    row.update(
        {
            "status": status,
            "outcome": record.get("outcome") or "",
            "diverged_at": _num(record.get("diverged_at")),
            "iterations": _num(
                record.get("iterations", history[-1].get("iteration") if history else None)
            ),
            "wall_time_s": _num(
                record.get("wall_time_s", history[-1].get("wall_time") if history else None)
            ),
            "iterations_to_target": _num(record.get("iterations_to_target")),
            **{col: NAN for col in FIXED_FINAL if col != "final_confusion"},
            "final_confusion": "",
            # after the final-metric defaults, whose prefix "final_evaluation_s" shares
            "evaluation_s": _num(record.get("evaluation_s")),
            "final_evaluation_s": _num(record.get("final_evaluation_s")),
            **final_columns(final),
            **protocol_columns(record.get("final_protocols")),
            "error": record.get("error") or problem or "",
            "slurm_job_id": (
                submission.get("job_id") if submission.get("cluster") == "slurm" else None
            )
            or provenance.get("slurm_job_id")
            or "",
            "git_commit": provenance.get("git_commit") or "",
            "device": provenance.get("device") or "",
            "host": provenance.get("host") or "",
        }
    )
    return row


def _cell(value: Any) -> Any:
    """A final metric as one table cell: numbers as floats, text as it is, lists and mappings
    (confusion matrices) as JSON; None (an unset metric) as NaN."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return _num(value)


def final_columns(final: Any, prefix: str = "final_") -> dict[str, Any]:
    """Every key of result.json's "final" as a column `final_<key>`: no list to keep up to
    date, so a metric added to the evaluation reaches the tables by itself."""
    if not isinstance(final, dict):
        return {}
    return {f"{prefix}{key}": _cell(value) for key, value in final.items()}


def protocol_columns(protocols: Any) -> dict[str, Any]:
    """result.json's "final_protocols" ({protocol: metrics like "final"}) as columns
    `final_<protocol>_<key>`; a skipped protocol gives `final_<protocol>_skipped` (its reason)."""
    if not isinstance(protocols, dict):
        return {}
    out: dict[str, Any] = {}
    for name, metrics in sorted(protocols.items()):
        out.update(final_columns(metrics, f"final_{name}_"))
    return out


def _num(value: Any) -> float:
    if value is None or isinstance(value, bool):
        return NAN
    try:
        return float(value)
    except (TypeError, ValueError):
        return NAN


def _eval_rows(run_dir: Path, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ident = _identity(run_dir)
    rows = []
    for record in history:
        row = {**ident}
        for key, value in record.items():
            if isinstance(value, (list, dict)):
                value = json.dumps(value)  # the confusion matrix, as one cell
            row[key] = value
        rows.append(row)
    return rows


def _queue_if_needed(folders: list[Path]) -> Queue | None:
    """The SLURM queue, if some run not yet complete was submitted there and it can be asked;
    else None."""
    waiting = any(
        (read_submission(d) or {}).get("cluster") == "slurm"
        and (read_result(d)[0] or {}).get("status") != "complete"
        for d in folders
    )
    if not waiting or not slurm_available():
        return None
    try:
        return slurm_queue()
    except SlurmError as err:
        log.warning("cannot ask SLURM which runs are queued or running: %s", err)
        return None


def gather(results_root: Path = Path("results"), write_csv: bool = True) -> Gathered:
    """Read every run folder under `results_root`; write runs.csv and evals.csv there."""
    results_root = Path(results_root)
    folders = run_folders(results_root)
    queue = _queue_if_needed(folders)
    problems: list[str] = []
    runs, evals = [], []
    for run_dir in folders:
        history = read_lines(run_dir / METRICS, problems)
        runs.append(_run_row(run_dir, queue, problems, history))
        evals.extend(_eval_rows(run_dir, history))
    extra = sorted({key for row in runs for key in row} - set(RUN_COLUMNS))
    runs_df = pd.DataFrame(runs, columns=RUN_COLUMNS + extra)  # the fixed columns first
    evals_df = pd.DataFrame(evals)
    if evals_df.empty:
        evals_df = pd.DataFrame(columns=EVAL_KEYS)
    else:  # identity first, then the metrics in a stable order
        rest = sorted(c for c in evals_df.columns if c not in EVAL_KEYS)
        evals_df = evals_df[EVAL_KEYS + rest]
    for problem in problems:
        log.warning("gather: %s", problem)
    if write_csv and results_root.is_dir():
        relative = runs_df.assign(run_dir=[_relative(d, results_root) for d in runs_df["run_dir"]])
        atomic_write_text(results_root / "runs.csv", relative.to_csv(index=False))
        atomic_write_text(results_root / "evals.csv", evals_df.to_csv(index=False))
    return Gathered(runs=runs_df, evals=evals_df, problems=problems)


def _relative(run_dir: str, results_root: Path) -> str:
    """A run folder relative to the results folder (POSIX separators), as runs.csv stores it."""
    try:
        return Path(run_dir).relative_to(results_root).as_posix()
    except ValueError:
        return run_dir


def summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Per experiment, variant and config: iterations, runs by status, converged, mean final
    accuracy. Runs of different configs (a smoke run and a full one) are never pooled."""
    if runs.empty:
        return pd.DataFrame()
    keys = ["experiment", "variant", "config_hash"]
    runs = runs.assign(config_hash=runs["config_hash"].fillna("").astype(str))
    g = runs.groupby(keys)
    out = g["status"].value_counts().unstack(fill_value=0)
    out.insert(0, "iterations", g["target_iterations"].first())
    complete = runs[runs["status"] == "complete"].groupby(keys)
    converged = complete["outcome"].apply(lambda s: int((s == "converged").sum()))
    # Numeric before filling: with no complete run the grouped result is an empty str column.
    converged = pd.to_numeric(converged.reindex(out.index), errors="coerce")
    out["converged"] = converged.fillna(0).astype(int)
    out["count_acc"] = complete["final_count_accuracy"].mean().round(3)
    return out.reset_index()
