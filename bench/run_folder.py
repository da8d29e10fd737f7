"""The run folder's contract: the names of its files, and reading and writing the records in it.

A run folder is `<results>/<experiment>/<variant>/<config_hash>/seed_<n>/` (or the `out_dir`
of a single run). Every module that names one of its files imports the name from here, and
result.json and metrics.jsonl are read and written only through these functions:

- `run.json` (`IDENTITY`): the run's identity (experiment, variant, seed, config hash) and the
  command that asked for it, written by the worker when it takes the run on, before training.
- `result.json` (`RESULT`): one writer, `write_result`, which adds that identity (and the
  command, to the provenance) to whatever record it is given: the trainer's complete record,
  or a record of a run that did not complete, built by `failure_record` (the worker's error,
  timeout and interruption records, the launcher's records of jobs that died). A complete
  record's time fields (`TIME_FIELDS`): `wall_time_s` training seconds, `evaluation_s` seconds
  of the periodic evaluations, `final_evaluation_s` of the final one (the reference protocols'
  included), all over every session of the run and disjoint; in a seed group each seed records
  the group's training time, and its share (the time divided by the seeds evaluated together)
  of a vectorised evaluation's.
- `metrics.jsonl` (`METRICS`): one line per evaluation, appended by the trainer
  (`append_evaluation`), cut back to a checkpoint on resume (`keep_evaluations`).

Where a run stands (complete, to resume, redo or retry) is decided from these files by one
function, `bench.runstate.run_state`, for the planner and for `bench.gather` alike.

This module imports neither torch nor the model: the report reads results through it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.storage import (
    append_json_line,
    atomic_write_json,
    read_json_lines,
    write_json_lines,
)

# ------------------------------------------------------------------------------------ file names
CONFIG = "config.yaml"  # the resolved run config (the trainer, at the start of each session)
METRICS = "metrics.jsonl"  # one line per periodic evaluation (the trainer)
PROGRESS = "progress.json"  # iteration and speed, about once a second (bench/progress.py)
CHECKPOINT = "checkpoint.pt"  # the resumable state (the trainer); deleted once complete
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"  # the checkpoint before it, kept in case it is torn
MODEL_FILE = "model.pt"  # a finished run's weights (bench/model_file.py)
SAMPLES_FILE = "samples.npz"  # a finished run's samples for the report (bench/samples_file.py)
IDENTITY = "run.json"  # who the run is and the command that asked for it (the worker)
RESULT = "result.json"  # how the run ended (`write_result`)
ATTEMPTS = "attempts.jsonl"  # one line per worker process that worked on the run
SUBMISSION = "submission.json"  # which job holds the run (written before it is submitted)
LOCK = ".lock"  # flock held by the worker training the run; holds its pid and host

FILE_NAMES = (CONFIG, METRICS, PROGRESS, CHECKPOINT, PREVIOUS_CHECKPOINT, MODEL_FILE,
              SAMPLES_FILE, IDENTITY, RESULT, ATTEMPTS, SUBMISSION, LOCK)  # fmt: skip

# A complete result's seconds: training, periodic evaluations, final evaluation (see above).
TIME_FIELDS = ("wall_time_s", "evaluation_s", "final_evaluation_s")

# Statuses of a result.json: complete (the trainer), or a run that did not complete.
FAILED = ("error", "timeout")
NOT_COMPLETED = (*FAILED, "interrupted")


# ------------------------------------------------------------------------------------ identity
@dataclass(frozen=True)
class RunIdentity:
    """Which run of the grid a folder holds."""

    experiment: str
    variant: str
    seed: int
    config_hash: str

    @classmethod
    def from_task(cls, task: Mapping[str, Any]) -> RunIdentity:
        """From a worker's task (bench.grid.RunSpec.task)."""
        return cls(str(task["experiment"]), str(task["variant"]), int(task["seed"]),
                   str(task["config_hash"]))  # fmt: skip

    @classmethod
    def from_folder(cls, run_dir: Path) -> RunIdentity:
        """From the folder's place, `<experiment>/<variant>/<config_hash>/seed_<n>`."""
        experiment, variant, digest, seed = Path(run_dir).parts[-4:]
        if not seed.startswith("seed_") or not seed.removeprefix("seed_").isdigit():
            raise ValueError(
                f"{run_dir}: not a grid run folder (expected <experiment>/<variant>/"
                f"<config_hash>/seed_<n>, got last part {seed!r})"
            )
        return cls(experiment, variant, int(seed.removeprefix("seed_")), digest)

    def as_dict(self) -> dict[str, Any]:
        return {"experiment": self.experiment, "variant": self.variant, "seed": self.seed,
                "config_hash": self.config_hash}  # fmt: skip


def write_identity(run_dir: Path, identity: RunIdentity, command: str | None = None) -> None:
    """run.json: the run's identity and the command line that asked for it, written atomically
    when a worker takes the run on (again at each attempt: the command is the latest one)."""
    atomic_write_json(Path(run_dir) / IDENTITY, {**identity.as_dict(), "command": command})


def read_identity(run_dir: Path) -> dict[str, Any]:
    """run.json's fields, or {} when there is none or it cannot be read (a single run's folder,
    or one from before the file existed)."""
    return read_json(Path(run_dir) / IDENTITY) or {}


# ------------------------------------------------------------------------------------ result.json
def read_result(run_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None), (None, why it is unreadable), or (None, None) when there is none."""
    path = Path(run_dir) / RESULT
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as err:
        return None, f"{RESULT} is unreadable ({type(err).__name__}: {err})"
    if not isinstance(record, dict) or "status" not in record:
        return None, f"{RESULT} has no 'status' field"
    return record, None


def complete_result(run_dir: Path, config_hash: str) -> tuple[dict[str, Any] | None, str | None]:
    """(the record, None) if the run is complete under `config_hash`, else (None, why the
    result file is unreadable, or None)."""
    record, problem = read_result(run_dir)
    if record is not None and record["status"] == "complete":
        return (record, None) if record.get("config_hash") == config_hash else (None, None)
    return None, problem


def write_result(run_dir: Path, record: Mapping[str, Any]) -> dict[str, Any]:
    """Write result.json atomically: `record` with the identity from run.json added (the
    record's own fields win) and run.json's command in its provenance, if it has one. Returns
    what was written. The only writer of result.json."""
    if record.get("status") not in ("complete", *NOT_COMPLETED):
        raise ValueError(
            f"{Path(run_dir) / RESULT}: status must be one of complete, "
            f"{', '.join(NOT_COMPLETED)}; got {record.get('status')!r}"
        )
    for key in TIME_FIELDS:
        value = record.get(key)
        if value is not None and not (isinstance(value, int | float) and value >= 0):
            raise ValueError(
                f"{Path(run_dir) / RESULT}: {key} must be a number of seconds >= 0, got {value!r}"
            )
    identity = read_identity(run_dir)
    command = identity.pop("command", None)
    out = {**identity, **record}
    if command and isinstance(out.get("provenance"), dict):
        out["provenance"] = {**out["provenance"], "command": command}
    atomic_write_json(Path(run_dir) / RESULT, out)
    return out


def failure_record(
    identity: RunIdentity,
    status: str,
    *,
    error: str | None = None,
    signal: str | None = None,
    iteration: int | None = None,
    exception: str | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The result record of a run that did not complete.

    error / timeout: `error` is the traceback or message (its last line says most: plans show
    it). interrupted: `signal` that stopped it (None: unknown), `iteration` where it stopped and
    checkpointed (None: it resumes from its last periodic checkpoint), `exception` what a stop
    cut short, if anything. `provenance`: where and when, if known.
    """
    if status in FAILED:
        if error is None:
            raise ValueError(f"a {status!r} record needs its error text")
        fields: dict[str, Any] = {"error": error}
    elif status == "interrupted":
        fields = {"signal": signal, "iteration": iteration}
        if exception is not None:
            fields["exception"] = exception
    else:
        raise ValueError(f"status must be one of {', '.join(NOT_COMPLETED)}; got {status!r}")
    record = {"status": status, **fields, **identity.as_dict()}
    if provenance is not None:
        record["provenance"] = dict(provenance)
    return record


# ------------------------------------------------------------------------------------ metrics.jsonl
def append_evaluation(run_dir: Path, record: Mapping[str, Any]) -> None:
    """One evaluation's line at the end of metrics.jsonl."""
    append_json_line(Path(run_dir) / METRICS, dict(record))


def read_evaluations(run_dir: Path) -> list[dict[str, Any]]:
    """Every evaluation of the run, oldest first; a torn last line (a writer at work or killed)
    is left out, a bad line before it is a ValueError naming the file and line."""
    return read_json_lines(Path(run_dir) / METRICS)


def keep_evaluations(run_dir: Path, up_to_iteration: int) -> None:
    """Drop the evaluations after `up_to_iteration` (a resumed run writes them again)."""
    kept = [r for r in read_evaluations(run_dir) if r["iteration"] <= up_to_iteration]
    write_json_lines(Path(run_dir) / METRICS, kept)


def clear_evaluations(run_dir: Path) -> None:
    """A run that starts from scratch rewrites its history."""
    (Path(run_dir) / METRICS).unlink(missing_ok=True)


def last_evaluated_iteration(run_dir: Path) -> int | None:
    try:
        history = read_evaluations(run_dir)
    except (OSError, ValueError):
        return None
    return history[-1].get("iteration") if history else None


def read_lines(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file of a run folder (metrics.jsonl, attempts.jsonl) for
    readers that must not fail: a line that does not parse is skipped and reported in
    `problems`, except a torn last line, which is a writer at work."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    except OSError as err:
        problems.append(f"{path}: {err}")
        return []
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if i < len(lines) - 1:
                problems.append(f"{path}: line {i + 1} is not valid JSON (skipped)")
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


# ------------------------------------------------------------------------------------ other files
def has_checkpoint(run_dir: Path) -> bool:
    """Whether the run has a resumable checkpoint (the latest or the one before)."""
    return (Path(run_dir) / CHECKPOINT).exists() or (Path(run_dir) / PREVIOUS_CHECKPOINT).exists()


def read_submission(run_dir: Path) -> dict[str, Any] | None:
    """submission.json (the job that holds the run), or None if none or unreadable."""
    return read_json(Path(run_dir) / SUBMISSION)


def write_submission(run_dir: Path, record: Mapping[str, Any]) -> None:
    atomic_write_json(Path(run_dir) / SUBMISSION, dict(record))


def append_attempt(run_dir: Path, attempt: Mapping[str, Any]) -> None:
    """One worker process's line of attempts.jsonl."""
    append_json_line(Path(run_dir) / ATTEMPTS, dict(attempt))


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, or None when it is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
