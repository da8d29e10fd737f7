"""The worker: trains one run of the grid, or a group of its seeds. Local processes and SLURM
jobs run this same code.

`Worker()(task)` is what submitit pickles and runs (`--cluster local|slurm|debug`). It trains,
resumes or skips the run in `task["run_dir"]` and always leaves a result there: the trainer's
record when the run completes, or `{"status": "error"|"timeout", "error": <traceback>, ...}`
when it fails, so one bad run never stops the grid.

A group task (`{"group": [run task, ...]}`, profile `group_size` > 1) trains its members
together (`bench.seedgroup.SeedGroup`) and treats each like a single run: its own lock (a member
another process holds is left out), attempts line, result file and error record. One member
that diverges or whose checkpoint is unreadable does not stop the others.

Timeouts and preemption: SLURM (or submitit's local controller) sends SIGUSR2 before the time
limit. submitit's own handler would requeue at once and lose the work since the last periodic
checkpoint; the worker instead asks the trainer to stop after the current iteration, saves a
checkpoint there, and only then hands over to submitit's handler, which requeues the job. If
the trainer does not stop within `stop_grace_s` (it may be in the final evaluation), the
handler runs anyway and the run resumes from its last checkpoint.

Every worker process appends one line to the run's attempts.jsonl: where it started and
stopped, why it ended, its SLURM job and restart count, and for a group the seeds in it.
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
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import UncompletedJobError

from bench.config import RunConfig, config_hash, load_config
from bench.grid import ATTEMPTS, LOCK, RESULT, read_result
from bench.seedgroup import SeedGroup
from bench.storage import append_json_line, atomic_write_json
from bench.trainer import CheckpointError, Trainer, load_checkpoint

log = logging.getLogger(__name__)


class Worker(submitit.helpers.Checkpointable):
    """submitit's callable. On a timeout it is requeued with the same task, and resumes it."""

    def __init__(self, raise_errors: bool = False) -> None:
        self.raise_errors = raise_errors  # --cluster debug: let the exception reach pdb

    def __call__(self, task: dict[str, Any]) -> dict[str, Any] | list[dict[str, Any]]:
        if "group" in task:
            return run_group_task(task, raise_errors=self.raise_errors)
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
    """Turns the scheduler's timeout/preemption signal into a checkpoint at the next iteration.

    `target` is what trains: a Trainer or a SeedGroup. Both read their `stop_requested` flag
    after every iteration, checkpoint and return partial results.
    """

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.original = signal.getsignal(signal.SIGUSR2)  # submitit's checkpoint-and-requeue
        self.target: Trainer | SeedGroup | None = None
        self.signum: int | None = None
        self._timer: threading.Timer | None = None
        # Only inside submitit (local or SLURM) is there a handler to hand over to.
        self.active = callable(self.original)
        if self.active:
            signal.signal(signal.SIGUSR2, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is not None or self.target is None:
            self.original(signum, frame)  # second signal, or nothing to save yet: requeue now
            return
        log.warning("signal %d: checkpointing after the current iteration, then requeueing", signum)
        self.signum = signum
        self.target.stop_requested = True
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


def _new_attempt() -> dict[str, Any]:
    """The start of a run's attempts.jsonl line: this process, and its SLURM job."""
    return {
        "started_at": time.time(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": _job_id(),
        "restart_count": os.environ.get("SLURM_RESTART_COUNT"),
    }


def _busy(task: dict[str, Any]) -> dict[str, Any]:
    run_dir = task["run_dir"]
    log.warning("%s is being trained by another process; left to it", run_dir)
    return {"status": "busy", "run_dir": str(run_dir)}


def run_task(task: dict[str, Any], raise_errors: bool = False) -> dict[str, Any]:
    """Train, resume or skip one run; returns its result record (also in result.json)."""
    _setup_logging()
    run_dir = Path(task["run_dir"])
    with run_lock(run_dir) as mine:
        if not mine:
            return _busy(task)
        attempt = _new_attempt()
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
            if isinstance(stopper.target, Trainer):
                attempt["start_iteration"] = stopper.target.start_iteration
                attempt["end_iteration"] = stopper.target.iteration
            append_json_line(run_dir / ATTEMPTS, attempt)


def _task_config(task: dict[str, Any]) -> RunConfig:
    """The task's run config, checked against the hash the launcher planned it under."""
    cfg = load_config([(f"task {task['run_dir']}", task["config"])])
    if config_hash(cfg) != task["config_hash"]:
        raise RuntimeError(
            f"config hash {config_hash(cfg)} != the task's {task['config_hash']}: "
            "the code that resolves configs differs between launcher and worker"
        )
    return cfg


def _complete_record(task: dict[str, Any]) -> dict[str, Any] | None:
    """The run's result record if it is complete under the task's config; else None."""
    run_dir = Path(task["run_dir"])
    done, problem = read_result(run_dir)
    if problem is not None:
        log.warning("%s: %s; the run is finished again from its checkpoint", run_dir, problem)
    if (
        done is not None
        and done["status"] == "complete"
        and done.get("config_hash") == task["config_hash"]
    ):
        return done
    return None


def _save_result(task: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """The trainer's record with the run's grid identity added, written atomically."""
    result = {**result, "experiment": task["experiment"], "variant": task["variant"]}
    atomic_write_json(Path(task["run_dir"]) / RESULT, result)
    return result


def _train(
    task: dict[str, Any], run_dir: Path, stopper: StopOnSignal, attempt: dict[str, Any]
) -> dict[str, Any]:
    cfg = _task_config(task)
    done = _complete_record(task)
    if done is not None:
        attempt["end"] = "already complete"
        return done
    trainer = Trainer(cfg)
    stopper.target = trainer
    result = trainer.run()
    if result["status"] == "partial" and stopper.requested:
        attempt["end"] = "requeued"
        log.info("%s: checkpointed at iteration %d; requeueing", run_dir, trainer.iteration)
        stopper.requeue()  # exits the process (SystemExit) once the job is requeued
    stopper.cancel()
    if result["status"] != "complete":
        raise RuntimeError(f"training stopped early at iteration {trainer.iteration}")
    attempt["end"] = "complete"
    return _save_result(task, result)


# ---------------------------------------------------------------------------------------- groups
@dataclass
class _Member:
    """One run of a group task, as this process works on it."""

    task: dict[str, Any]
    attempt: dict[str, Any] = field(default_factory=_new_attempt)
    record: dict[str, Any] | None = None  # set once the run is complete, skipped or failed
    trainer: Trainer | None = None  # its trainer inside the SeedGroup, once built

    @property
    def run_dir(self) -> Path:
        return Path(self.task["run_dir"])


def run_group_task(task: dict[str, Any], raise_errors: bool = False) -> list[dict[str, Any]]:
    """Train, resume or skip the seeds of a group task together; one record per member, in
    the task's order (a member another live process holds: `{"status": "busy"}`)."""
    tasks = task["group"]
    if len(tasks) == 1:
        return [run_task(tasks[0], raise_errors=raise_errors)]
    _setup_logging()
    seeds = [t["seed"] for t in tasks]
    with ExitStack() as locks:  # every lock held until the group is done
        slots: list[_Member | dict[str, Any]] = [
            _Member(t) if locks.enter_context(run_lock(Path(t["run_dir"]))) else _busy(t)
            for t in tasks
        ]
        members = [m for m in slots if isinstance(m, _Member)]
        busy = [t["seed"] for t, m in zip(tasks, slots, strict=True) if not isinstance(m, _Member)]
        for member in members:
            member.attempt.update(group_seeds=seeds, busy_seeds=busy)
        _run_members(members, float(task.get("stop_grace_s", 60)), raise_errors)
        return [m.record if isinstance(m, _Member) else m for m in slots]  # type: ignore[misc]


def _run_members(members: list[_Member], grace_s: float, raise_errors: bool) -> None:
    """The group's training with the single-run path's failure handling, member by member."""
    stopper = StopOnSignal(grace_s)
    try:
        _train_members(members, stopper, raise_errors)
    except UncompletedJobError as err:  # submitit: timed out too many times
        _fail_unfinished(members, "timeout", err)
    except Exception as err:
        _fail_unfinished(members, "error", err)
        if raise_errors:
            raise
    except SystemExit:
        for member in members:
            member.attempt.setdefault("end", "requeued")  # submitit's handler requeued
        raise
    except BaseException:
        for member in members:
            member.attempt.setdefault("end", "interrupted")
        raise
    finally:
        stopper.restore()
        for member in members:
            _append_attempt(member)


def _train_members(members: list[_Member], stopper: StopOnSignal, raise_errors: bool) -> None:
    todo: list[tuple[_Member, RunConfig]] = []
    broken: list[Exception] = []
    for member in members:
        cfg = _task_config(member.task)
        done = _complete_record(member.task)
        if done is not None:
            member.record, member.attempt["end"] = done, "already complete"
        elif (err := _checkpoint_error(cfg)) is not None:
            member.record = _record_failure(member.task, "error", err)
            member.attempt["end"] = "error"
            broken.append(err)
        else:
            todo.append((member, cfg))
    if todo:
        _train_together(todo, stopper)
    if broken and raise_errors:
        raise broken[0]  # --cluster debug: to pdb, once the others have trained


def _checkpoint_error(cfg: RunConfig) -> CheckpointError | None:
    """Why the run's checkpoint cannot be resumed, if it cannot. Checked before the group is
    built (which reads it again): one unreadable checkpoint must not fail its whole group at
    every retry."""
    try:
        load_checkpoint(Path(cfg.out_dir), config_hash(cfg))
    except CheckpointError as err:
        return err
    return None


def _train_together(todo: list[tuple[_Member, RunConfig]], stopper: StopOnSignal) -> None:
    group = SeedGroup([cfg for _, cfg in todo])
    for (member, _), trainer in zip(todo, group.trainers, strict=True):
        member.trainer = trainer
    stopper.target = group
    results = group.run()
    for (member, _), result in zip(todo, results, strict=True):
        if result["status"] == "complete":
            member.record, member.attempt["end"] = _save_result(member.task, result), "complete"
    unfinished = [m for m, _ in todo if m.record is None]
    if unfinished and stopper.requested:
        for member in unfinished:
            member.attempt["end"] = "requeued"
        log.info("seeds %s: checkpointed; requeueing", [m.task["seed"] for m in unfinished])
        stopper.requeue()  # exits the process (SystemExit) once the job is requeued
    stopper.cancel()
    if unfinished:
        where = {m.task["seed"]: m.trainer.iteration for m in unfinished if m.trainer}
        raise RuntimeError(f"training stopped early (seed: iteration) {where}")


def _fail_unfinished(members: list[_Member], status: str, err: BaseException) -> None:
    """After an exception in the group: each member that did not complete gets an error (or
    timeout) record with the traceback; one the trainer did finish keeps its result."""
    for member in members:
        if member.record is not None:
            continue
        done = _complete_record(member.task)  # Trainer.finish wrote it before the exception
        if done is not None:
            member.record, member.attempt["end"] = _save_result(member.task, done), "complete"
        else:
            member.record, member.attempt["end"] = _record_failure(member.task, status, err), status


def _append_attempt(member: _Member) -> None:
    member.attempt["ended_at"] = time.time()
    if member.trainer is not None:
        member.attempt["start_iteration"] = member.trainer.start_iteration
        member.attempt["end_iteration"] = member.trainer.iteration
    append_json_line(member.run_dir / ATTEMPTS, member.attempt)


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
