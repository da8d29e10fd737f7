"""Where each run of the grid stands: its folder's files, its lock, and the SLURM queue.

A run's state is read from its folder alone (result.json, checkpoint, submission.json, the
lock its worker holds; names and readers: bench/run_folder.py) plus, for runs submitted to
SLURM, the scheduler's queue; nothing else keeps track of runs. `run_state` is the one place
that decides it: the launcher's plan (skip, resume, redo, retry; bench/launcher.py) and
`bench.gather`'s status column both come from it.
"""

from __future__ import annotations

import fcntl
import getpass
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.run_folder import (
    ATTEMPTS,
    LOCK,
    RESULT,
    SUBMISSION,
    has_checkpoint,
    last_evaluated_iteration,
    read_json,
    read_result,
    read_submission,
)

# The run folder's names and readers live in bench/run_folder.py; these are re-exported.
__all__ = [
    "ATTEMPTS", "LIVE_STATES", "LOCK", "RESULT", "SUBMISSION", "RunState", "SlurmError",
    "inspect_run", "last_evaluated_iteration", "live_job", "lock_holder", "read_json",
    "read_result", "run_state", "slurm_available", "slurm_final_states", "slurm_queue",
]  # fmt: skip

Queue = dict[tuple[str, int], tuple[str, str]]  # (job name, array index) -> (job id, state)


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


def slurm_queue() -> Queue:
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

    status: complete, error, timeout, corrupt (unreadable result, or one of another config or
    status), partial (a checkpoint, no result), interrupted (stopped by SIGINT/SIGTERM,
    checkpointed), new, queued or running.
    """

    status: str
    detail: str  # one line for people
    job_id: str | None = None  # SLURM job holding the run, if any
    record: dict[str, Any] | None = None  # its result.json, when readable
    problem: str | None = None  # why its result.json is unreadable, if it is

    @property
    def to_run(self) -> bool:
        return self.status in ("error", "timeout", "corrupt", "partial", "interrupted", "new")

    @property
    def table_status(self) -> str:
        """The status a runs table shows (bench.gather; bench/report/status.py counts them):
        what the result file says unless something holds the run, else where it stands; a run
        with no readable result and nothing holding it is "partial" (started, not finished)."""
        if self.status == "corrupt" and self.record is not None:
            return str(self.record["status"])  # another config hash or status: as recorded
        return "partial" if self.status in ("corrupt", "new") else self.status


def live_job(run_dir: Path, queue: Queue | None) -> tuple[str, str] | None:
    """(job id, state) of the SLURM job that holds the run, if it is still queued or running."""
    record = read_submission(run_dir)
    if queue is None or not record or record.get("cluster") != "slurm":
        return None
    return queue.get((record.get("job_name", ""), int(record.get("array_index", 0))))


def run_state(
    run_dir: Path, expected_hash: str, queue: Queue | None, *, unasked_is_queued: bool = False
) -> RunState:
    """The run's state from its folder and the SLURM queue (None: not consulted).

    In order: a complete result under `expected_hash` is complete; a live SLURM job or a
    worker holding the lock makes it queued or running; then what the result file says (an
    unreadable one is redone); then a checkpoint makes it partial. `unasked_is_queued`: a run
    that was submitted, while the queue could not be asked, and shows no sign of having started
    (no result, lock or checkpoint) is queued rather than new (for reading results; the planner
    instead treats it as new when it has no queue to ask, so it never waits on one).
    """
    record, problem = read_result(run_dir)
    done = record if record is not None and record["status"] == "complete" else None
    if done is not None and done.get("config_hash") == expected_hash:
        return RunState("complete", f"complete ({done.get('outcome')})", record=done)
    job = live_job(run_dir, queue)
    if job is not None:
        status = "running" if job[1] in ("RUNNING", "COMPLETING") else "queued"
        detail = f"{status} on SLURM as job {job[0]} ({job[1]})"
        return RunState(status, detail, job[0], record, problem)
    holder = lock_holder(run_dir)
    if holder is not None:
        return RunState("running", f"being trained by {holder}", None, record, problem)
    if problem is not None:
        return RunState("corrupt", f"redo: {problem}", problem=problem)
    if record is not None:
        status = record["status"]
        if status in ("error", "timeout"):
            detail = f"retry after {status}: {_last_line(record.get('error'))}"
            return RunState(status, detail, record=record)
        if status == "interrupted" and record.get("config_hash") in (expected_hash, None):
            return RunState("interrupted", _interrupted_detail(run_dir, record), record=record)
        detail = f"redo: {RESULT} has status {status!r} / another config hash"
        return RunState("corrupt", detail, record=record)
    if has_checkpoint(run_dir):
        it = last_evaluated_iteration(run_dir)
        where = f" (last evaluation at iteration {it})" if it is not None else ""
        return RunState("partial", f"resume from its checkpoint{where}")
    if unasked_is_queued and queue is None and read_submission(run_dir):
        return RunState("queued", "submitted; no queue to ask, and nothing says it started")
    return RunState("new", "new")


inspect_run = run_state  # its former name


def _interrupted_detail(run_dir: Path, record: dict[str, Any]) -> str:
    by = f" by {record['signal']}" if record.get("signal") else ""
    if not has_checkpoint(run_dir):
        return f"interrupted{by} before its first checkpoint: starts over"
    it = record.get("iteration")
    where = f" at iteration {it}" if it is not None else ""
    return f"interrupted{by}{where}: resume from its checkpoint"


def _last_line(text: Any) -> str:
    lines = [ln for ln in str(text or "").strip().splitlines() if ln.strip()]
    return lines[-1][:160] if lines else "(no message)"  # a traceback's last line says most
