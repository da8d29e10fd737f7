"""Where each run of the grid stands: its folder's files, its lock, and the SLURM queue.

A run's state is read from its folder alone (result.json, checkpoint, submission.json, the
lock its worker holds) plus, for runs submitted to SLURM, the scheduler's queue; nothing else
keeps track of runs. `inspect_run` says what the launcher does with it (bench/launcher.py).
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.storage import read_json_lines

# Files of a run folder besides the trainer's config.yaml, metrics.jsonl and checkpoints.
RESULT = "result.json"
SUBMISSION = "submission.json"  # which scheduler job holds the run (written before submitting)
ATTEMPTS = "attempts.jsonl"  # one line per worker process that worked on the run
LOCK = ".lock"  # flock held by the worker training the run; holds its pid and host


def read_result(run_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None), (None, why it is unreadable), or (None, None) when there is none."""
    path = run_dir / RESULT
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as err:
        return None, f"{RESULT} is unreadable ({type(err).__name__}: {err})"
    if not isinstance(record, dict) or "status" not in record:
        return None, f"{RESULT} has no 'status' field"
    return record, None


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def lock_holder(run_dir: Path) -> str | None:
    """'pid N on HOST' if a live process on this host holds the run, else None.

    The worker holds an flock on the lock file while it trains; the kernel drops it when the
    holder dies (even by SIGKILL). So the flock, not the pid written inside, says whether the
    run is held: a killed worker can linger as a zombie whose pid still answers kill(pid, 0).
    A holder on another host is only known through SLURM.
    """
    holder = read_json(run_dir / LOCK)
    if not holder or holder.get("host") != socket.gethostname():
        return None
    try:
        fd = os.open(run_dir / LOCK, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return f"pid {holder.get('pid')} on {holder['host']}"
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def last_evaluated_iteration(run_dir: Path) -> int | None:
    try:
        history = read_json_lines(run_dir / "metrics.jsonl")
    except (OSError, ValueError):
        return None
    return history[-1].get("iteration") if history else None


# SLURM states in which a job may still train the run: never submit it again then.
LIVE_STATES = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
    "RESV_DEL_HOLD",
    "SPECIAL_EXIT",
    "PREEMPTED",
    "STOPPED",
}


class SlurmError(RuntimeError):
    """The SLURM commands are missing or the controller does not answer."""


def slurm_available() -> bool:
    return all(shutil.which(c) for c in ("sbatch", "squeue", "sacct", "scontrol"))


def slurm_queue() -> dict[tuple[str, int], tuple[str, str]]:
    """Live jobs of this user: (job name, array index) -> (job id, state), array tasks expanded.

    Runs are matched by the unique job name of their array and their index in it, not by job
    id alone: job ids restart at 1 on a purged cluster (SLURM_NOTES pitfall 9).
    """
    cmd = ["squeue", "--noheader", "--array", f"--user={getpass.getuser()}", "--format=%i|%j|%K|%T"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SlurmError(f"squeue failed: {err}") from err
    if out.returncode != 0:
        raise SlurmError(f"squeue failed: {out.stderr.strip() or out.returncode}")
    live = {}
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 4 or parts[3] not in LIVE_STATES:
            continue
        job_id, name, index, state = parts
        # A job that is not an array (submitit submits a one-run batch as a plain job) is index 0.
        live[(name, int(index) if index.isdigit() else 0)] = (job_id, state)
    return live


def slurm_final_states(job_ids: list[str]) -> dict[str, str]:
    """Accounting state (TIMEOUT, FAILED, CANCELLED, ...) of finished jobs; {} if unknown."""
    if not job_ids:
        return {}
    cmd = [
        "sacct",
        "--noheader",
        "--parsable2",
        "--allocations",
        "--format=JobID,State",
        f"--jobs={','.join(job_ids)}",
    ]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    states = {}
    for line in out.stdout.splitlines():
        job_id, _, state = line.partition("|")
        states[job_id] = state.split()[0] if state else ""
    return states


@dataclass
class RunState:
    """Where a run stands, and what the launcher does about it.

    status: complete, error, timeout, corrupt (unreadable result), partial (a checkpoint, no
    result), interrupted (stopped by SIGINT/SIGTERM, checkpointed), new, queued or running.
    """

    status: str
    detail: str  # one line for people
    job_id: str | None = None  # SLURM job holding the run, if any

    @property
    def to_run(self) -> bool:
        return self.status in ("error", "timeout", "corrupt", "partial", "interrupted", "new")


def live_job(
    run_dir: Path, queue: dict[tuple[str, int], tuple[str, str]] | None
) -> tuple[str, str] | None:
    """(job id, state) of the SLURM job that holds the run, if it is still queued or running."""
    record = read_json(run_dir / SUBMISSION)
    if queue is None or not record or record.get("cluster") != "slurm":
        return None
    return queue.get((record.get("job_name", ""), int(record.get("array_index", 0))))


def inspect_run(
    run_dir: Path, expected_hash: str, queue: dict[tuple[str, int], tuple[str, str]] | None
) -> RunState:
    """The run's state from its folder and the SLURM queue (None: not consulted)."""
    job = live_job(run_dir, queue)
    if job is not None:
        status = "running" if job[1] in ("RUNNING", "COMPLETING") else "queued"
        return RunState(status, f"{status} on SLURM as job {job[0]} ({job[1]})", job[0])
    holder = lock_holder(run_dir)
    if holder is not None:
        return RunState("running", f"being trained by {holder}")
    record, problem = read_result(run_dir)
    if problem is not None:
        return RunState("corrupt", f"redo: {problem}")
    if record is not None:
        status = record["status"]
        if status == "complete" and record.get("config_hash") == expected_hash:
            return RunState("complete", f"complete ({record.get('outcome')})")
        if status in ("error", "timeout"):
            return RunState(status, f"retry after {status}: {_last_line(record.get('error'))}")
        if status == "interrupted" and record.get("config_hash") in (expected_hash, None):
            return RunState("interrupted", _interrupted_detail(run_dir, record))
        return RunState("corrupt", f"redo: {RESULT} has status {status!r} / another config hash")
    if (run_dir / "checkpoint.pt").exists() or (run_dir / "checkpoint.prev.pt").exists():
        it = last_evaluated_iteration(run_dir)
        where = f" (last evaluation at iteration {it})" if it is not None else ""
        return RunState("partial", f"resume from its checkpoint{where}")
    return RunState("new", "new")


def _interrupted_detail(run_dir: Path, record: dict[str, Any]) -> str:
    by = f" by {record['signal']}" if record.get("signal") else ""
    if not (run_dir / "checkpoint.pt").exists() and not (run_dir / "checkpoint.prev.pt").exists():
        return f"interrupted{by} before its first checkpoint: starts over"
    it = record.get("iteration")
    where = f" at iteration {it}" if it is not None else ""
    return f"interrupted{by}{where}: resume from its checkpoint"


def _last_line(text: Any) -> str:
    lines = [ln for ln in str(text or "").strip().splitlines() if ln.strip()]
    return lines[-1][:160] if lines else "(no message)"  # a traceback's last line says most
