"""`--cluster slurm`: submit the grid as job arrays and a report job, follow them, settle the
runs whose jobs died.

Jobs with identical resources share an array (one task per job: a run, or a group of seeds),
split at the cluster's MaxArraySize, at most `array_parallelism` tasks at once; every array is
checked with `sbatch --test-only` before any is submitted. A run's folder records which array
task holds it (submission.json) before sbatch runs, so a crash can never submit it twice. The
report job runs after every array (afterany), settles dead jobs, gathers and writes the report.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from bench.cli import UsageError
from bench.grid import (
    Profile,
    RunGroup,
    SlurmError,
    live_job,
    new_session_dir,
    slurm_final_states,
    slurm_queue,
)
from bench.local import tail_text
from bench.run_folder import (
    SUBMISSION,
    RunIdentity,
    failure_record,
    read_result,
    read_submission,
    write_result,
    write_submission,
)
from bench.storage import atomic_write_json

log = logging.getLogger("air-repro")

DEAD_STATES = {
    "TIMEOUT": "timeout",
    "FAILED": "error",
    "CANCELLED": "error",
    "NODE_FAIL": "error",
    "OUT_OF_MEMORY": "error",
    "BOOT_FAIL": "error",
    "DEADLINE": "error",
}


def array_groups(jobs: list[RunGroup], profile: Profile) -> list[list[RunGroup]]:
    """Jobs with identical resources share an array, one task per job (a run or a group of
    seeds); arrays hold at most max_array_size tasks."""
    by_resources: dict[str, list[RunGroup]] = {}
    for job in jobs:
        by_resources.setdefault(json.dumps(asdict(job.resources), sort_keys=True), []).append(job)
    size = profile.slurm.max_array_size or cluster_max_array_size()
    return [
        tasks[i : i + size] for tasks in by_resources.values() for i in range(0, len(tasks), size)
    ]


def cluster_max_array_size() -> int:
    """Tasks one array may hold: the cluster's MaxArraySize (indices 0 .. MaxArraySize - 1)."""
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=60)
    for line in out.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "MaxArraySize" and value.strip().isdigit():
            return max(int(value.strip()), 1)
    return 1000


def _executor_params(resources: Any, profile: Profile, name: str) -> dict[str, Any]:
    """submitit AutoExecutor parameters for one array (None: SLURM's own default)."""
    params: dict[str, Any] = {
        "name": name,
        "slurm_array_parallelism": profile.slurm.array_parallelism,
        "slurm_signal_delay_s": profile.slurm.signal_delay_s,
    }
    if profile.slurm.setup:
        params["slurm_setup"] = list(profile.slurm.setup)
    generic = {
        "timeout_min": resources.timeout_min,
        "gpus_per_node": resources.gpus_per_node,
        "cpus_per_task": resources.cpus_per_task,
        "mem_gb": resources.mem_gb,
        "slurm_partition": resources.partition,
        "slurm_account": resources.account,
        "slurm_qos": resources.qos,
    }
    params.update({k: v for k, v in generic.items() if v is not None})
    if resources.additional:
        params["slurm_additional_parameters"] = dict(resources.additional)
    return params


def _slurm_executor(folder: Path, params: dict[str, Any], profile: Profile) -> Any:
    import submitit

    # slurm_max_num_timeout only works through the constructor (SLURM_NOTES).
    executor = submitit.AutoExecutor(
        folder=folder / "%j", cluster="slurm", slurm_max_num_timeout=profile.slurm.max_num_timeout
    )
    executor.update_parameters(**params)
    return executor


def check_submission(executor: Any, tasks: int) -> None:
    """`sbatch --test-only` with the exact script submitit would submit: nothing is queued."""
    from submitit.slurm.slurm import _make_sbatch_string

    inner = executor._executor
    script = _make_sbatch_string(
        command="true", folder=inner.folder, map_count=tasks, **inner.parameters
    )
    out = subprocess.run(
        ["sbatch", "--test-only"], input=script, capture_output=True, text=True, timeout=60
    )
    if out.returncode != 0:
        options = [ln for ln in script.splitlines() if ln.startswith("#SBATCH")]
        raise UsageError(
            f"SLURM rejects these job options: {out.stderr.strip()}\n  " + "\n  ".join(options)
        )


def _runs_in(array: list[RunGroup]) -> int:
    return sum(len(job.runs) for job in array)


def describe_arrays(arrays: list[list[RunGroup]], profile: Profile) -> None:
    """What would be submitted, each array checked by SLURM (sbatch --test-only)."""
    import tempfile

    if not arrays:
        print("nothing to submit")
        return
    with tempfile.TemporaryDirectory() as folder:
        for k, array in enumerate(arrays):
            params = _executor_params(array[0].resources, profile, f"air-<token>-{k}")
            check_submission(_slurm_executor(Path(folder), params, profile), len(array))
            shown = {key: v for key, v in params.items() if key != "name"}
            print(
                f"array {k}: {len(array)} task(s) for {_runs_in(array)} run(s), {shown} "
                "(SLURM accepts it)"
            )
    print(f"then a report job after all arrays (afterany), {asdict(profile.slurm.report)}")


def submit_slurm(
    arrays: list[list[RunGroup]],
    profile: Profile,
    results: Path,
    reports: Path,
    command: str | None = None,
) -> dict[str, Any] | None:
    """Submit the arrays (one task per job) and the report job; returns the session record
    (None: nothing to do). `command`: the user's command line, for the runs' provenance."""
    from bench.worker import Worker

    if not arrays:
        print("nothing to submit")
        return None
    folder, token = new_session_dir(results)
    executors = []
    for k, array in enumerate(arrays):  # check every array before submitting any
        executor = _slurm_executor(
            folder, _executor_params(array[0].resources, profile, f"air-{token}-{k}"), profile
        )
        check_submission(executor, len(array))
        executors.append(executor)
    grace = max(5.0, profile.slurm.signal_delay_s / 2)
    session: dict[str, Any] = {
        "token": token,
        "folder": str(folder),
        "arrays": [],
        "runs": [],
        "results": str(results),
    }
    for k, (array, executor) in enumerate(zip(arrays, executors, strict=True)):
        name = f"air-{token}-{k}"
        # Recorded first: a crash after sbatch cannot repeat it.
        for index, group in enumerate(array):
            _record_slurm_submission(group, name, index, folder, job=None)
        try:
            with executor.batch():
                jobs = [executor.submit(Worker(), group.task(grace, command)) for group in array]
        except Exception as err:
            for group in array:
                for run in group.runs:
                    (run.run_dir / SUBMISSION).unlink(missing_ok=True)
            raise SlurmError(f"submitting array {name} failed: {err}") from err
        for index, (group, job) in enumerate(zip(array, jobs, strict=True)):
            _record_slurm_submission(group, name, index, folder, job=job)
            session["runs"] += [
                {
                    "name": run.name,
                    "run_dir": str(run.run_dir),
                    "job_name": name,
                    "array_index": index,
                    "job_id": job.job_id,
                }
                for run in group.runs
            ]
        array_id = jobs[0].job_id.split("_")[0]
        runs = _runs_in(array)
        session["arrays"].append(
            {"job_id": array_id, "name": name, "tasks": len(array), "runs": runs}
        )
        print(
            f"submitted array {array_id} ({name}): {runs} run(s) in {len(array)} task(s), "
            f"at most {profile.slurm.array_parallelism} at once"
        )
    report = _submit_report(session, profile, folder, token, results, reports)
    atomic_write_json(folder / "session.json", session)
    print(
        f"report job {report} runs after them (afterany); it writes {results}/runs.csv, "
        f"{results}/evals.csv and the HTML report under {reports}"
    )
    print(
        f"logs: {folder}; follow with: squeue --me, or python run_all.py --cluster slurm "
        f"--dry-run (same options)"
    )
    return session


def _record_slurm_submission(
    group: RunGroup, name: str, index: int, folder: Path, job: Any | None
) -> None:
    """submission.json in each member's folder: the array task that holds it. Written before
    sbatch (job None) and again with the job id, so a run is never submitted twice."""
    record: dict[str, Any] = {
        "cluster": "slurm",
        "job_name": name,
        "array_index": index,
        "job_id": job.job_id if job is not None else None,
        "submitted_at": time.time(),
        "submitit_folder": str(folder),
    }
    if job is not None:
        record.update(stdout=str(job.paths.stdout), stderr=str(job.paths.stderr))
    if len(group.runs) > 1:
        record["group_seeds"] = group.seeds
    for run in group.runs:
        write_submission(run.run_dir, record)


def _submit_report(
    session: dict[str, Any],
    profile: Profile,
    folder: Path,
    token: str,
    results: Path,
    reports: Path,
) -> str:
    name = f"air-{token}-report"
    report = profile.slurm.report  # where the arrays may run, the report may too
    resources = replace(
        report,
        **{
            key: getattr(report, key) or getattr(profile.resources, key)
            for key in ("partition", "account", "qos")
        },
    )
    params = _executor_params(resources, profile, name)
    params.pop("slurm_array_parallelism")
    params["slurm_dependency"] = "afterany:" + ":".join(a["job_id"] for a in session["arrays"])
    job = _slurm_executor(folder, params, profile).submit(report_job, str(results), str(reports))
    session["report"] = {"job_id": job.job_id, "name": name, "stdout": str(job.paths.stdout)}
    return job.job_id


def report_job(results: str, reports: str) -> dict[str, Any]:
    """The report job: settle runs whose jobs died, gather, write the report."""
    from bench.gather import gather
    from bench.launcher import write_report

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settle_dead_jobs(Path(results), slurm_queue())
    runs = gather(Path(results)).runs
    index = write_report(Path(results), Path(reports))
    counts = runs["status"].value_counts().to_dict() if len(runs) else {}
    print(f"runs by status: {counts}; report: {index}", flush=True)
    return {"runs": counts, "report": str(index) if index else None}


def settle_dead_jobs(results: Path, queue: dict[tuple[str, int], tuple[str, str]]) -> int:
    """Record runs whose SLURM job ended without a result (killed at its time limit, failed,
    cancelled) as timeout or error, with the end of the job's log; returns how many."""
    from bench.gather import run_folders

    dead = []
    for run_dir in run_folders(results):
        sub = read_submission(run_dir)
        if not sub or sub.get("cluster") != "slurm" or not sub.get("job_id"):
            continue
        record, problem = read_result(run_dir)
        if record is None and problem is None and live_job(run_dir, queue) is None:
            dead.append((run_dir, sub))
    states = slurm_final_states([sub["job_id"] for _, sub in dead])
    settled = 0
    for run_dir, sub in dead:
        state = states.get(sub["job_id"], "")
        if state not in DEAD_STATES:
            continue  # unknown yet (accounting lags), or ended cleanly: leave it to the plan
        # Like a traceback, the summary comes last: plans show the last line.
        error = (
            f"last lines of {sub.get('stderr')}:\n{tail_text(Path(sub.get('stderr', '')))}\n"
            f"SLURM job {sub['job_id']} ended {state} without writing a result"
        )
        identity = RunIdentity.from_folder(run_dir)
        write_result(run_dir, failure_record(identity, DEAD_STATES[state], error=error))
        settled += 1
    return settled


def wait_slurm(session: dict[str, Any], progress: bool, poll_s: float = 2.0) -> None:
    """Follow the runs of `session` until they and the report job have left the queue."""
    from tqdm import tqdm

    runs = session["runs"]
    report = session["report"]
    bar = tqdm(total=len(runs), desc="slurm", unit="run", disable=not progress, dynamic_ncols=True)
    with bar:
        while True:
            queue = slurm_queue()
            live = [r for r in runs if (r["job_name"], r["array_index"]) in queue]
            states = Counter(queue[(r["job_name"], r["array_index"])][1] for r in live)
            results = Counter(
                (read_result(Path(r["run_dir"]))[0] or {}).get("status", "none") for r in runs
            )
            bar.n = len(runs) - len(live)
            bar.set_postfix(
                pending=states.get("PENDING", 0),
                running=states.get("RUNNING", 0),
                complete=results.get("complete", 0),
                failed=results.get("error", 0) + results.get("timeout", 0),
            )
            bar.refresh()
            if not live and (report["name"], 0) not in queue:
                break
            time.sleep(poll_s)
    print(f"report job {report['job_id']} has ended; its log: {report['stdout']}")
