"""The worker: trains one run of the grid. Local processes and SLURM jobs run this same code.

`Worker()(task)` is what submitit pickles and runs (`--cluster local|slurm|debug`). It trains,
resumes or skips the run in `task["run_dir"]` and always leaves a result there: the trainer's
record when the run completes, or `{"status": "error"|"timeout", "error": <traceback>, ...}`
when it fails, so one bad run never stops the grid.

Timeouts and preemption: SLURM (or submitit's local controller) sends SIGUSR2 before the time
limit. submitit's own handler would requeue at once and lose the work since the last periodic
checkpoint; the worker instead asks the trainer to stop after the current iteration, saves a
checkpoint there, and only then hands over to submitit's handler, which requeues the job. If
the trainer does not stop within `stop_grace_s` (it may be in the final evaluation), the
handler runs anyway and the run resumes from its last checkpoint.

Every worker process appends one line to the run's attempts.jsonl: where it started and
stopped, why it ended, and its SLURM job and restart count.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import UncompletedJobError

from bench.config import config_hash, load_config
from bench.grid import ATTEMPTS, LOCK, RESULT, read_result
from bench.storage import append_json_line, atomic_write_json
from bench.trainer import Trainer

log = logging.getLogger(__name__)


class Worker(submitit.helpers.Checkpointable):
    """submitit's callable. On a timeout it is requeued with the same task, and resumes it."""

    def __init__(self, raise_errors: bool = False) -> None:
        self.raise_errors = raise_errors  # --cluster debug: let the exception reach pdb

    def __call__(self, task: dict[str, Any]) -> dict[str, Any]:
        return run_task(task, raise_errors=self.raise_errors)


@contextmanager
def run_lock(run_dir: Path) -> Iterator[bool]:
    """Hold the run's lock (True), or yield False if another live process holds it.

    flock is released by the kernel when its holder dies, even by SIGKILL, so a killed run is
    never locked out; the pid and host written inside let others say who is training it.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        try:
            yield True
        finally:
            os.ftruncate(fd, 0)  # no stale holder left behind by a clean exit
    finally:
        os.close(fd)


class StopOnSignal:
    """Turns the scheduler's timeout/preemption signal into a checkpoint at the next iteration."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.original = signal.getsignal(signal.SIGUSR2)  # submitit's checkpoint-and-requeue
        self.trainer: Any = None
        self.signum: int | None = None
        self._timer: threading.Timer | None = None
        # Only inside submitit (local or SLURM) is there a handler to hand over to.
        self.active = callable(self.original)
        if self.active:
            signal.signal(signal.SIGUSR2, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is not None or self.trainer is None:
            self.original(signum, frame)  # second signal, or nothing to save yet: requeue now
            return
        log.warning("signal %d: checkpointing after the current iteration, then requeueing", signum)
        self.signum = signum
        self.trainer.stop_requested = True
        self._timer = threading.Timer(self.grace_s, os.kill, (os.getpid(), signum))
        self._timer.daemon = True
        self._timer.start()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def requeue(self) -> None:
        """Hand over to submitit: it pickles the task again, requeues the job and exits."""
        self.cancel()
        self.original(self.signum, None)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def restore(self) -> None:
        self.cancel()
        if self.active:
            signal.signal(signal.SIGUSR2, self.original)


def _job_id() -> str | None:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def _setup_logging() -> None:
    if not logging.getLogger().handlers:  # a job process: its stderr is the job's log file
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )


def run_task(task: dict[str, Any], raise_errors: bool = False) -> dict[str, Any]:
    """Train, resume or skip one run; returns its result record (also in result.json)."""
    _setup_logging()
    run_dir = Path(task["run_dir"])
    with run_lock(run_dir) as mine:
        if not mine:
            log.warning("%s is being trained by another process; left to it", run_dir)
            return {"status": "busy", "run_dir": str(run_dir)}
        attempt: dict[str, Any] = {
            "started_at": time.time(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": _job_id(),
            "restart_count": os.environ.get("SLURM_RESTART_COUNT"),
        }
        stopper = StopOnSignal(float(task.get("stop_grace_s", 60)))
        try:
            return _train(task, run_dir, stopper, attempt)
        except UncompletedJobError as err:  # submitit: timed out too many times
            attempt["end"] = "timeout"
            return _record_failure(task, "timeout", err)
        except Exception as err:
            attempt["end"] = "error"
            record = _record_failure(task, "error", err)
            if raise_errors:
                raise
            return record
        except SystemExit:
            attempt.setdefault("end", "requeued")  # submitit's handler requeued and exits
            raise
        except BaseException:
            attempt["end"] = "interrupted"  # Ctrl-C, or a kill the process could see
            raise
        finally:
            stopper.restore()
            attempt["ended_at"] = time.time()
            if stopper.trainer is not None:
                attempt["start_iteration"] = stopper.trainer.start_iteration
                attempt["end_iteration"] = stopper.trainer.iteration
            append_json_line(run_dir / ATTEMPTS, attempt)


def _train(
    task: dict[str, Any], run_dir: Path, stopper: StopOnSignal, attempt: dict[str, Any]
) -> dict[str, Any]:
    cfg = load_config([(f"task {run_dir}", task["config"])])
    if config_hash(cfg) != task["config_hash"]:
        raise RuntimeError(
            f"config hash {config_hash(cfg)} != the task's {task['config_hash']}: "
            "the code that resolves configs differs between launcher and worker"
        )
    done, problem = read_result(run_dir)
    if (
        done is not None
        and done["status"] == "complete"
        and done.get("config_hash") == task["config_hash"]
    ):
        attempt["end"] = "already complete"
        return done
    if problem is not None:
        log.warning("%s: %s; the run is finished again from its checkpoint", run_dir, problem)
    trainer = Trainer(cfg)
    stopper.trainer = trainer
    result = trainer.run()
    if result["status"] == "partial" and stopper.requested:
        attempt["end"] = "requeued"
        log.info("%s: checkpointed at iteration %d; requeueing", run_dir, trainer.iteration)
        stopper.requeue()  # exits the process (SystemExit) once the job is requeued
    stopper.cancel()
    if result["status"] != "complete":
        raise RuntimeError(f"training stopped early at iteration {trainer.iteration}")
    result = {**result, "experiment": task["experiment"], "variant": task["variant"]}
    atomic_write_json(run_dir / RESULT, result)
    attempt["end"] = "complete"
    return result


def _record_failure(task: dict[str, Any], status: str, err: BaseException) -> dict[str, Any]:
    text = "".join(traceback.format_exception(err))
    log.error("%s: %s\n%s", task["run_dir"], status, text)
    record = {
        "status": status,
        "error": text,
        "experiment": task["experiment"],
        "variant": task["variant"],
        "seed": task["seed"],
        "config_hash": task["config_hash"],
        "provenance": {
            "host": socket.gethostname(),
            "slurm_job_id": _job_id(),
            "failed_at": time.time(),
        },
    }
    atomic_write_json(Path(task["run_dir"]) / RESULT, record)
    return record
