"""`--cluster local` and `--cluster debug`: train the grid's jobs on this machine.

local: up to `local.jobs` worker processes at once (one per job, through submitit's
LocalExecutor), or, when the jobs train on CUDA, one job per visible GPU, each job seeing only
its own GPU (CUDA_VISIBLE_DEVICES). Each job's controller runs in a process group of its own
(bench/local_controller.py), so Ctrl-C reaches this process alone, which then stops each job
once: SIGTERM to the controller, forwarded to the worker, which checkpoints after its current
iteration and records the run "interrupted". Jobs that have not stopped within
`stop_wait_s` (or at a second Ctrl-C) are killed; their runs resume from their last checkpoint.
SIGTERM to this process does the same (`sigterm_as_interrupt`).

debug: one job after another inside this process (errors reach pdb).

While jobs run, one console bar per running job shows its iterations, the count accuracy of
its last evaluation, its speed and its ETA (bench/progress.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
from submitit.local.local import LocalJob

from bench.grid import Profile, RunGroup, RunSpec, new_session_dir
from bench.local_controller import PARENT_ENV
from bench.progress import JobBars
from bench.run_folder import (
    RESULT,
    RunIdentity,
    failure_record,
    read_result,
    write_result,
    write_submission,
)

STOP_WAIT_S = 120.0  # how long stopped jobs get to checkpoint (a first step compiles ~25-60 s)


class Terminated(KeyboardInterrupt):
    """SIGTERM to the launcher, handled as Ctrl-C is: running jobs checkpoint and stop."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within: SIGTERM raises Terminated (a KeyboardInterrupt) in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------- GPUs
def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries ([] without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None and listed.strip():
        return [t.strip() for t in listed.split(",") if t.strip()][:count]
    return [str(k) for k in range(count)]


def needs_gpu(group: RunGroup) -> bool:
    return group.runs[0].cfg.train.device.startswith("cuda")


def local_slots(jobs: list[RunGroup], profile: Profile, gpus: list[str], cap: int | None) -> int:
    """Jobs at once: one per GPU when the jobs train on CUDA and GPUs are visible (at most
    `cap`, the command line's --jobs), else the profile's `local.jobs`."""
    if gpus and any(needs_gpu(job) for job in jobs):
        return min(len(gpus), cap) if cap else len(gpus)
    return profile.local.jobs


class LocalJobs(submitit.LocalExecutor):
    """submitit's LocalExecutor, with each job's controller in a process group of its own
    (bench/local_controller.py) and the GPUs it may see set per job (`next_gpus`)."""

    next_gpus = ""  # CUDA_VISIBLE_DEVICES of the next job submitted ("" : none)

    def _submit_command(self, command: str) -> LocalJob:
        env = controller_env(
            dict(os.environ),
            command=command,
            gpus=self.next_gpus,
            timeout_min=float(self.parameters.get("timeout_min", 2.0)),
            signal_delay_s=int(self.parameters.get("signal_delay_s", 30)),
        )
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.local_controller", str(self.folder)],
            env=env,
            start_new_session=True,  # Ctrl-C in the terminal reaches run_all.py alone
        )
        return LocalJob(folder=self.folder, job_id=str(process.pid), process=process, tasks=[0])


def controller_env(
    base: dict[str, str], command: str, gpus: str, timeout_min: float, signal_delay_s: int
) -> dict[str, str]:
    """The environment of a local job's controller (and so of its worker): what submitit's
    local controller reads, and CUDA_VISIBLE_DEVICES = `gpus` ("" hides every GPU)."""
    return {
        **base,
        "SUBMITIT_LOCAL_NTASKS": "1",
        "SUBMITIT_LOCAL_COMMAND": command,
        "SUBMITIT_LOCAL_TIMEOUT_S": str(int(60 * timeout_min)),
        "SUBMITIT_LOCAL_SIGNAL_DELAY_S": str(signal_delay_s),
        "SUBMITIT_LOCAL_NODEID": "0",
        "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
        "SUBMITIT_STDERR_TO_STDOUT": "",
        "SUBMITIT_EXECUTOR": "local",
        "SUBMITIT_LOCAL_WITH_SHELL": "",
        "CUDA_VISIBLE_DEVICES": gpus,
        PARENT_ENV: str(os.getpid()),
    }


# ---------------------------------------------------------------------------------------- run
@dataclass
class _Running:
    job: Any
    group: RunGroup
    submitted_at: float
    gpus: str | None  # CUDA_VISIBLE_DEVICES it was given (None: debug, in this process)


def _local_timeout_min(profile: Profile) -> float:
    return profile.local.timeout_min or 60 * 24 * 365  # submitit's default would be 2 minutes


def run_local(
    jobs: list[RunGroup],
    profile: Profile,
    results: Path,
    cluster: str,
    progress: bool,
    max_jobs: int | None = None,
    command: str | None = None,
    stop_wait_s: float = STOP_WAIT_S,
) -> None:
    """Train `jobs` here (see the module doc); `max_jobs`: --jobs, `command`: the user's
    command line (for the runs' provenance). KeyboardInterrupt (Ctrl-C, or Terminated) stops
    the running jobs, each checkpointed, and is raised again."""
    from tqdm import tqdm

    from bench.worker import Worker

    if not jobs:
        return
    folder, _ = new_session_dir(results)
    grace = max(5.0, profile.slurm.signal_delay_s / 2)
    gpus: list[str] = []
    if cluster == "debug":
        executor: Any = submitit.DebugExecutor(folder / "%j")
        slots, worker = 1, Worker(raise_errors=True)
    else:
        executor = LocalJobs(folder / "%j")
        executor.update_parameters(timeout_min=_local_timeout_min(profile))
        cuda = any(needs_gpu(job) for job in jobs)
        gpus = visible_gpus() if cuda else []
        slots, worker = local_slots(jobs, profile, gpus, max_jobs), Worker()
        if cuda and gpus:
            print(f"CUDA jobs: {len(gpus)} GPU(s): {', '.join(gpus)}; {slots} job(s) at once, "
                  "one GPU each")  # fmt: skip
        elif cuda:
            print("CUDA jobs, but no GPU is visible here: they will stop at their start")
    free_gpus = list(gpus)
    pending = list(jobs)
    running: list[_Running] = []
    total = sum(len(group.runs) for group in jobs)
    bar = tqdm(total=total, desc="grid", unit="run", disable=not progress, dynamic_ncols=True)
    bars = JobBars(enabled=progress and cluster != "debug")

    def report(lines: list[str]) -> None:
        bar.update(len(lines))
        for line in lines:
            bar.write(line) if progress else print(line, flush=True)

    try:
        while pending or running:
            while pending and len(running) < slots:
                group = pending.pop(0)
                gpu = None  # debug: this process, with every GPU it sees
                if cluster != "debug":  # at most len(gpus) jobs run: a CUDA job finds one free
                    gpu = free_gpus.pop(0) if needs_gpu(group) and free_gpus else ""
                    executor.next_gpus = gpu
                submitted_at = time.time()
                job = executor.submit(worker, group.task(grace, command))
                _record_local_submission(group, job, cluster, folder, submitted_at, gpu)
                running.append(_Running(job, group, submitted_at, gpu))
                first = group.runs[0]
                bars.start(job.job_id, _label(group), first.run_dir, first.cfg.train.iterations)
                if cluster == "debug":
                    break  # a DebugJob runs when its result is asked for, just below
            for entry in list(running):
                if cluster != "debug" and not entry.job.done():
                    continue
                running.remove(entry)
                bars.close(entry.job.job_id)
                if entry.gpus:
                    free_gpus.append(entry.gpus)
                records = _collect(entry, stopping=False)
                report(_lines(entry.group, records))
                if cluster == "debug":
                    _stop_if_interrupted(records)
            if running:
                bars.refresh()
                time.sleep(0.2)
    except KeyboardInterrupt as err:
        bars.close_all()
        if cluster != "debug":  # the jobs get the signal this process got
            report(stop_jobs(running, stop_wait_s, getattr(err, "signum", signal.SIGINT)))
        raise
    finally:
        bars.close_all()
        bar.close()


def _label(group: RunGroup) -> str:
    run = group.runs[0]
    if len(group.runs) == 1:
        return run.name
    return f"{run.experiment}/{run.variant}/seeds {','.join(map(str, group.seeds))}"


def _stop_if_interrupted(records: list[dict[str, Any]]) -> None:
    """--cluster debug: a run stopped by Ctrl-C/SIGTERM in this process stops the grid."""
    for record in records:
        if record.get("status") == "interrupted":
            if record.get("signal") == "SIGTERM":
                raise Terminated(signal.SIGTERM)
            raise KeyboardInterrupt


def stop_jobs(running: list[_Running], wait_s: float, signum: int = signal.SIGTERM) -> list[str]:
    """Stop every running local job: `signum` (SIGINT or SIGTERM) to its controller, which
    forwards it to the worker, which checkpoints and records the run interrupted; jobs still
    running after `wait_s`, or at another Ctrl-C, are killed. Returns one line per run."""
    if not running:
        return []
    print(
        f"\nstopping {len(running)} running job(s): each checkpoints after its current "
        f"iteration (up to {wait_s:.0f} s; Ctrl-C again to kill them now)",
        file=sys.stderr,
        flush=True,
    )
    for entry in running:
        _signal_job(entry.job, signum)
    lines: list[str] = []
    deadline = time.monotonic() + wait_s
    try:
        while running and time.monotonic() < deadline:
            for entry in [e for e in running if e.job.done()]:
                running.remove(entry)
                lines += _lines(entry.group, _collect(entry, stopping=True))
            time.sleep(0.1)
    except KeyboardInterrupt:
        pass  # kill the rest now
    for entry in running:
        _signal_job(entry.job, signal.SIGKILL)
        process = getattr(entry.job, "_process", None)
        if process is not None:
            process.wait()
        lines += _lines(entry.group, _collect(entry, stopping=True))
    running.clear()
    return lines


def _signal_job(job: Any, signum: int) -> None:
    """SIGKILL to the job's whole process group; another signal to its controller alone,
    which forwards it to the worker once."""
    process = getattr(job, "_process", None)
    if process is None or process.poll() is not None:
        return
    try:
        if signum == signal.SIGKILL:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
    except ProcessLookupError:
        pass


def _record_local_submission(
    group: RunGroup, job: Any, cluster: str, folder: Path, submitted_at: float, gpus: str | None
) -> None:
    """submission.json in each member's folder: the local job that holds it."""
    record: dict[str, Any] = {
        "cluster": cluster,
        "job_id": str(job.job_id),
        "submitted_at": submitted_at,
        "submitit_folder": str(folder),
        "stdout": str(job.paths.stdout),
        "stderr": str(job.paths.stderr),
    }
    if gpus is not None:
        record["cuda_visible_devices"] = gpus
    if len(group.runs) > 1:
        record["group_seeds"] = group.seeds
    for run in group.runs:
        write_submission(run.run_dir, record)


def _collect(entry: _Running, stopping: bool) -> list[dict[str, Any]]:
    """Records of a finished local job, one per run; a job that died leaves a record in the
    folders of its runs that it did not finish: interrupted if it was being stopped, else
    error."""
    try:
        returned = entry.job.result()
        return returned if isinstance(returned, list) else [returned]
    except Exception as err:  # the process died (killed, out of memory), or debug re-raised
        return [_result_or_death(run, entry, err, stopping) for run in entry.group.runs]


def _result_or_death(
    run: RunSpec, entry: _Running, err: Exception, stopping: bool
) -> dict[str, Any]:
    """The run's result if its (dead) job wrote one, else a record saying it died."""
    record, _ = read_result(run.run_dir)
    path = run.run_dir / RESULT
    if record is None or path.stat().st_mtime < entry.submitted_at:  # nothing from this job
        identity = RunIdentity(run.experiment, run.variant, run.seed, run.config_hash)
        log_tail = tail_text(Path(entry.job.paths.stderr))
        if stopping:
            record = failure_record(
                identity,
                "interrupted",
                signal="SIGKILL",
                iteration=None,
                exception=f"{log_tail}\nkilled while stopping: {err}",
            )
        else:
            error = f"{log_tail}\nworker process ended without a result: {err}"
            record = failure_record(identity, "error", error=error)
        record = write_result(run.run_dir, record)
    return record


def _lines(group: RunGroup, records: list[dict[str, Any]]) -> list[str]:
    return [describe_record(run, record) for run, record in zip(group.runs, records, strict=True)]


def describe_record(run: RunSpec, record: dict[str, Any]) -> str:
    """One console line for a run that has finished, failed or stopped."""
    status = record.get("status", "?")
    if status == "complete":
        acc = (record.get("final") or {}).get("count_accuracy")
        acc_text = f", count accuracy {acc:.3f}" if acc is not None else ""
        return (
            f"{status:8s} {run.name}: {record.get('outcome')}{acc_text}, "
            f"{record.get('iterations')} it in {record.get('wall_time_s', 0):.0f} s"
        )
    if status in ("error", "timeout"):
        error = str(record.get("error", "")).strip().splitlines()
        return f"{status:8s} {run.name}: {error[-1] if error else ''} (see {run.run_dir}/{RESULT})"
    if status == "interrupted":
        it = record.get("iteration")
        where = f"at iteration {it}" if it is not None else "from its last periodic checkpoint"
        return f"{status} {run.name}: stopped; the same command resumes it {where}"
    return f"{status:8s} {run.name}"


def tail_text(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
