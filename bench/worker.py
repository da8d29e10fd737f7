"""The worker: trains one run of the grid, or a group of its seeds. Local processes and SLURM
jobs run this same code.

`Worker()(task)` is what submitit pickles and runs (`--cluster local|slurm|debug`). It trains,
resumes or skips the run in `task["run_dir"]` and always leaves a result there: the trainer's
record when the run completes, or `{"status": "error"|"timeout", "error": <traceback>, ...}`
when it fails, so one bad run never stops the grid.

A group task (`{"group": [run task, ...]}`, profile `group_size` > 1) trains its members
together (`bench.seedgroup.SeedGroup`; bench/worker_group.py) and treats each like a single
run: its own lock (a member another process holds is left out), attempts line, result file and
error record. One member that diverges or whose checkpoint is unreadable does not stop the
others.

Timeouts and preemption: SLURM (or submitit's local controller) sends SIGUSR2 before the time
limit. submitit's own handler would requeue at once and lose the work since the last periodic
checkpoint; the worker instead asks the trainer to stop after the current iteration, saves a
checkpoint there, and only then hands over to submitit's handler, which requeues the job. If
the trainer does not stop within `stop_grace_s` (it may be in the final evaluation), the
handler runs anyway and the run resumes from its last checkpoint.

Interrupts: SIGINT (Ctrl-C) and SIGTERM (`kill`, or `run_all.py` stopping its local jobs) are
turned into the same stop after the current iteration; the run checkpoints there and its
result.json says "interrupted" (replacing any earlier error), which the next `run_all.py`
resumes. Nothing is raised into the training step, so a compiled graph is never cut in half,
and an exception that still arrives while a stop is under way is recorded as the interruption
it is, never as an error. Under SLURM, SIGTERM stays submitit's (bench/stopping.py).

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
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import UncompletedJobError

from bench.config import RunConfig, config_hash, load_config
from bench.run_folder import (
    LOCK,
    RunIdentity,
    append_attempt,
    complete_result,
    failure_record,
    read_result,
    write_identity,
    write_result,
)
from bench.stopping import StopOnSignal
from bench.trainer import Trainer

log = logging.getLogger(__name__)


class Worker(submitit.helpers.Checkpointable):
    """submitit's callable. On a timeout it is requeued with the same task, and resumes it."""

    def __init__(self, raise_errors: bool = False) -> None:
        self.raise_errors = raise_errors  # --cluster debug: let the exception reach pdb

    def __call__(self, task: dict[str, Any]) -> dict[str, Any] | list[dict[str, Any]]:
        if "group" in task:
            if any((m["config"].get("probe") or {}).get("budgets") for m in task["group"]):
                # Probe runs (experiment `representation`) train in a subfolder and probe after;
                # their seeds run one after another (bench/probes/stage.py).
                return [run_task(m, raise_errors=self.raise_errors) for m in task["group"]]
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


def run_group_task(task: dict[str, Any], raise_errors: bool = False) -> list[dict[str, Any]]:
    """Train, resume or skip the seeds of a group task together; one record per member, in
    the task's order (bench/worker_group.py)."""
    from bench.worker_group import train_group_task

    return train_group_task(task, raise_errors=raise_errors)


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
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
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
            if stopper.interrupted:  # what a stop cut short is an interruption, not a crash
                attempt["end"] = "interrupted"
                return _record_interrupted(task, stopper.interrupt_signum, None, err)
            attempt["end"] = "error"
            record = _record_failure(task, "error", err)
            if raise_errors:
                raise
            return record
        except SystemExit:
            attempt.setdefault("end", "requeued")  # submitit's handler requeued and exits
            raise
        except KeyboardInterrupt as err:  # a second Ctrl-C, or one before training started
            attempt["end"] = "interrupted"
            record = _record_interrupted(task, stopper.interrupt_signum, None, err)
            if stopper.interrupted:
                return record
            raise
        except BaseException:
            attempt["end"] = "interrupted"  # a kill the process could see
            raise
        finally:
            stopper.restore()
            attempt["ended_at"] = time.time()
            target = stopper.target  # a Trainer, a group of one (train.compile_step) or None
            trainers = [target] if isinstance(target, Trainer) else getattr(target, "trainers", [])
            if len(trainers) == 1:
                attempt["start_iteration"] = trainers[0].start_iteration
                attempt["end_iteration"] = trainers[0].iteration
            append_attempt(run_dir, attempt)


def _task_config(task: dict[str, Any]) -> RunConfig:
    """The task's run config, checked against the hash the launcher planned it under. First
    the run's identity and command go to its folder (run.json): this worker takes it on."""
    write_identity(Path(task["run_dir"]), RunIdentity.from_task(task), task.get("command"))
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
    done, problem = complete_result(run_dir, task["config_hash"])
    if problem is not None:
        log.warning(
            "%s: %s; the run is redone (from its checkpoint if it has one)", run_dir, problem
        )
    return done


def _save_result(task: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """`result` as the run's result.json, with its grid identity and the user's command line
    (the worker's own command is submitit's; bench.run_folder.write_result adds run.json's).
    The trainer's record already went to disk so and is not written again."""
    named = {**result, "experiment": task["experiment"], "variant": task["variant"]}
    if read_result(Path(task["run_dir"]))[0] == named:
        return named
    return write_result(Path(task["run_dir"]), named)


def _train(
    task: dict[str, Any], run_dir: Path, stopper: StopOnSignal, attempt: dict[str, Any]
) -> dict[str, Any]:
    cfg = _task_config(task)
    done = _complete_record(task)
    if done is not None:
        attempt["end"] = "already complete"
        return done
    if cfg.probe.budgets:  # experiment `representation`: a model (reused or trained), probed
        from bench.probes.stage import run_probe_task

        def fit(training_cfg: RunConfig) -> dict[str, Any]:
            return _fit(task, training_cfg, stopper, attempt)

        return run_probe_task(task, cfg, fit, _save_result, attempt)
    result = _fit(task, cfg, stopper, attempt)
    if result["status"] != "complete":
        return result  # the record of an interruption
    attempt["end"] = "complete"
    return _save_result(task, result)


def _fit(
    task: dict[str, Any], cfg: RunConfig, stopper: StopOnSignal, attempt: dict[str, Any]
) -> dict[str, Any]:
    """Train or resume `cfg` in `cfg.out_dir`: the trainer's record once complete, or the
    run's interruption record (requeued jobs exit here). With `train.compile_step` the run
    trains as a seed group of one (bench/group_step.py: its whole step is one graph there)."""
    if cfg.train.compile_step:
        from bench.seedgroup import SeedGroup

        group = SeedGroup([cfg])
        trainer = group.trainers[0]
        stopper.target = group
        (result,) = group.run()
    else:
        trainer = Trainer(cfg)
        stopper.target = trainer
        result = trainer.run()
    if result["status"] == "partial" and stopper.interrupted:
        attempt["end"] = "interrupted"
        log.info("%s: checkpointed at iteration %d; stopped", cfg.out_dir, trainer.iteration)
        return _record_interrupted(task, stopper.interrupt_signum, trainer.iteration)
    if result["status"] == "partial" and stopper.requested:
        attempt["end"] = "requeued"
        log.info("%s: checkpointed at iteration %d; requeueing", cfg.out_dir, trainer.iteration)
        stopper.requeue()  # exits the process (SystemExit) once the job is requeued
    stopper.cancel()
    if result["status"] != "complete":
        raise RuntimeError(f"training stopped early at iteration {trainer.iteration}")
    return result


def _failure_provenance(task: dict[str, Any], when: str) -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "slurm_job_id": _job_id(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "command": task.get("command"),
        when: time.time(),
    }


def _record_failure(task: dict[str, Any], status: str, err: BaseException) -> dict[str, Any]:
    """result.json of a run that failed (error, or timeout): the traceback, where and when."""
    text = "".join(traceback.format_exception(err))
    log.error("%s: %s\n%s", task["run_dir"], status, text)
    record = failure_record(RunIdentity.from_task(task), status, error=text,
                            provenance=_failure_provenance(task, "failed_at"))  # fmt: skip
    return write_result(Path(task["run_dir"]), record)


def _record_interrupted(
    task: dict[str, Any],
    signum: int | None,
    iteration: int | None,
    err: BaseException | None = None,
) -> dict[str, Any]:
    """result.json of a run stopped by SIGINT/SIGTERM (replacing any earlier error record).

    `iteration`: where it stopped and checkpointed; None when the stop cut the step short (an
    exception, a second signal), and the run resumes from its last periodic checkpoint.
    """
    record = failure_record(
        RunIdentity.from_task(task),
        "interrupted",
        signal=signal.Signals(signum).name if signum else None,
        iteration=iteration,
        exception="".join(traceback.format_exception(err)) if err is not None else None,
        provenance=_failure_provenance(task, "interrupted_at"),
    )
    where = f"at iteration {iteration}" if iteration is not None else "during a step"
    log.warning("%s: interrupted %s; the same command resumes it", task["run_dir"], where)
    return write_result(Path(task["run_dir"]), record)
