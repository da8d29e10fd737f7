"""A worker's group task: the seeds of one (experiment, variant, config) trained together.

Each member is treated like a single run (bench/worker.py): its own lock (a member another
process holds is left out), attempts line, result file and error or interruption record. One
member that diverges or whose checkpoint is unreadable does not stop the others.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from submitit.core.utils import UncompletedJobError

from bench.config import RunConfig, config_hash
from bench.grid import ATTEMPTS
from bench.seedgroup import SeedGroup
from bench.stopping import StopOnSignal
from bench.storage import append_json_line
from bench.trainer import CheckpointError, Trainer, load_checkpoint
from bench.worker import (
    _busy,
    _complete_record,
    _new_attempt,
    _record_failure,
    _record_interrupted,
    _save_result,
    _setup_logging,
    _task_config,
    run_lock,
    run_task,
)

log = logging.getLogger("bench.worker")


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


def train_group_task(task: dict[str, Any], raise_errors: bool = False) -> list[dict[str, Any]]:
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
        if stopper.interrupted:  # what a stop cut short is an interruption, not a crash
            _interrupt_unfinished(members, stopper.interrupt_signum, err)
            return
        _fail_unfinished(members, "error", err)
        if raise_errors:
            raise
    except SystemExit:
        for member in members:
            member.attempt.setdefault("end", "requeued")  # submitit's handler requeued
        raise
    except KeyboardInterrupt as err:  # a second Ctrl-C, or one before training started
        _interrupt_unfinished(members, stopper.interrupt_signum, err)
        if not stopper.interrupted:
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
    if unfinished and stopper.interrupted:
        for member in unfinished:
            iteration = member.trainer.iteration if member.trainer else None
            member.record = _record_interrupted(member.task, stopper.interrupt_signum, iteration)
            member.attempt["end"] = "interrupted"
        return
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
    timeout) record with the traceback."""
    _close_unfinished(members, status, lambda task: _record_failure(task, status, err))


def _interrupt_unfinished(members: list[_Member], signum: int | None, err: BaseException) -> None:
    """After an exception or a forced stop: each member not yet finished is interrupted."""
    _close_unfinished(
        members, "interrupted", lambda task: _record_interrupted(task, signum, None, err)
    )


def _close_unfinished(
    members: list[_Member], end: str, record: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    """Each member without a record: complete if Trainer.finish wrote its result before the
    exception or stop (it keeps it), else `record(task)`, its attempt ending as `end`."""
    for member in members:
        if member.record is not None:
            continue
        done = _complete_record(member.task)
        if done is not None:
            member.record, member.attempt["end"] = _save_result(member.task, done), "complete"
        else:
            member.record, member.attempt["end"] = record(member.task), end


def _append_attempt(member: _Member) -> None:
    member.attempt["ended_at"] = time.time()
    if member.trainer is not None:
        member.attempt["start_iteration"] = member.trainer.start_iteration
        member.attempt["end_iteration"] = member.trainer.iteration
    append_json_line(member.run_dir / ATTEMPTS, member.attempt)
