"""The launcher behind `run_all.py`: plan the grid, run it here or submit it to SLURM, gather.

Every job goes through the same worker (`bench.worker.Worker`, pickled by submitit):
  --cluster local   a bounded pool of processes on this machine (submitit's LocalExecutor)
  --cluster slurm   job arrays grouped by resources, then a report job (afterany)
  --cluster debug   one job after another inside this process (errors reach pdb)

A job trains one run or, with the profile's `group_size` > 1, up to that many seeds of one
(experiment, variant, config) together (bench/seedgroup.py); results stay one folder per seed.

The plan is read from the run folders and, for SLURM, the queue: complete runs are skipped,
partial ones resume from their checkpoint, failed ones are retried, runs with an unreadable
result are redone (and the plan says so), and runs whose SLURM job is still queued or running
are never submitted again. A run's folder records which job holds it (submission.json) before
the job is submitted, and jobs are found again by their array's unique name and index; the
members of a group share their job's name and index.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import secrets
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from bench.config import ConfigError
from bench.grid import (
    EXPERIMENTS_DIR,
    RESULT,
    SUBMISSION,
    GridError,
    Profile,
    RunGroup,
    RunSpec,
    RunState,
    SlurmError,
    available,
    build_grid,
    group_runs,
    inspect_run,
    live_job,
    load_profile,
    parse_names,
    parse_seeds,
    read_json,
    read_result,
    slurm_available,
    slurm_final_states,
    slurm_queue,
)
from bench.storage import atomic_write_json

log = logging.getLogger("air-repro")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_RUNS_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
DEFAULT_PROFILE = "cpu"
ACTIONS = {  # run state -> what the launcher does, as the plan prints it
    "complete": "skip",
    "queued": "skip",
    "running": "skip",
    "new": "start",
    "partial": "resume",
    "corrupt": "redo",
    "error": "retry",
    "timeout": "retry",
}
DEAD_STATES = {
    "TIMEOUT": "timeout",
    "FAILED": "error",
    "CANCELLED": "error",
    "NODE_FAIL": "error",
    "OUT_OF_MEMORY": "error",
    "BOOT_FAIL": "error",
    "DEADLINE": "error",
}


class UsageError(ValueError):
    """A bad command line; reported before anything runs (exit status 2)."""


# ---------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="run_all.py",
        description="Train the AIR grid (experiments x variants x seeds) here or on SLURM, "
        "skip what is done, resume what is not, gather the metrics and write the report.",
        epilog="Examples:\n"
        "  python run_all.py                        # cpu profile, count, all variants\n"
        "  python run_all.py --profile smoke --seeds 0-1 --dry-run\n"
        "  python run_all.py --cluster slurm --profile paper --seeds 0-19 "
        "profile.resources.account=me\n"
        "  python run_all.py --variants air_nvil_fixed train.lr=3e-4   # a config override\n"
        "  python run_all.py -c configs/smoke.yaml -o results/try      # one run, no grid",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--cluster",
        choices=["local", "slurm", "debug"],
        default="local",
        help="where runs train (default: local)",
    )
    p.add_argument("-e", "--experiments", help="comma-separated, or 'all' (default: profile's)")
    p.add_argument("-v", "--variants", help="comma-separated, or 'all' (default: profile's)")
    p.add_argument("-s", "--seeds", help="e.g. 0-19, 3 or 0-2,7 (default: profile's)")
    p.add_argument(
        "-p",
        "--profile",
        default=DEFAULT_PROFILE,
        help=f"smoke, cpu, paper or a YAML path (default: {DEFAULT_PROFILE})",
    )
    p.add_argument(
        "-n",
        "--dry-run",
        action="store_true",
        help="print the grid and what would be skipped, resumed or submitted",
    )
    p.add_argument("--report-only", action="store_true", help="gather and write the report")
    p.add_argument(
        "-w", "--wait", action="store_true", help="slurm: follow the jobs until the report job ends"
    )
    p.add_argument("-j", "--jobs", type=int, help="local: jobs at once (default: profile's)")
    p.add_argument(
        "-g",
        "--group-size",
        type=int,
        help="seeds of one config trained together by one job (default: profile's group_size)",
    )
    p.add_argument(
        "--results", type=Path, default=Path("results"), help="results folder (default: results/)"
    )
    p.add_argument(
        "--reports", type=Path, default=Path("reports"), help="reports folder (default: reports/)"
    )
    p.add_argument("-d", "--device", help="cpu or cuda (same as train.device=...)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "-c",
        "--config",
        action="append",
        default=[],
        help="one run, no grid: YAML config file(s) merged in order (needs -o)",
    )
    p.add_argument("-o", "--out", help="one run, no grid: the run folder")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="run-config overrides (omegaconf dotlist, e.g. train.lr=3e-4); "
        "profile.<key>=value overrides the profile (e.g. profile.resources.qos=high)",
    )
    return p.parse_args(argv)


def split_overrides(words: list[str]) -> tuple[list[str], list[str]]:
    """key=value words -> (run-config overrides, profile overrides without 'profile.')."""
    bad = [w for w in words if "=" not in w or w.startswith("=")]
    if bad:
        raise UsageError(f"expected key=value overrides, got {bad}")
    run = [w for w in words if not w.startswith("profile.")]
    profile = [w.removeprefix("profile.") for w in words if w.startswith("profile.")]
    return run, profile


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    try:
        if args.config or args.out:
            return single_run(args)
        return run_grid(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except SlurmError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\ninterrupted; the same command resumes where the runs stopped", file=sys.stderr)
        return EXIT_INTERRUPTED


def single_run(args: argparse.Namespace) -> int:
    """`-c FILE -o DIR`: train (or resume, or skip) one run, print a JSON summary."""
    from bench.config import load_config

    seed = args.seeds if args.seeds and args.seeds.isdigit() else None  # old `-s N`: one seed
    grid_flags = [args.experiments, args.variants, args.seeds and seed is None]
    grid_flags += [args.report_only, args.wait, args.group_size is not None]
    if any(grid_flags) or args.cluster != "local" or not args.out:
        raise UsageError("-c/--config with -o/--out trains one run; grid options do not apply")
    overrides, profile_words = split_overrides(args.overrides)
    if profile_words:
        raise UsageError("profile.* overrides need the grid (drop -c/-o)")
    overrides.append(f"out_dir={args.out}")
    if seed is not None:
        overrides.append(f"seed={seed}")
    if args.device:
        overrides.append(f"train.device={args.device}")
    if args.no_progress:
        overrides.append("train.progress=false")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        raise UsageError(str(err)) from err
    from bench.trainer import train_run

    result = train_run(cfg)
    summary = {k: result.get(k) for k in ("status", "outcome", "iterations", "wall_time_s")}
    if result.get("final"):
        summary.update({k: result["final"].get(k) for k in ("count_accuracy", "elbo", "iw_bound")})
    print(json.dumps(summary, indent=2))
    return EXIT_OK


# ---------------------------------------------------------------------------------------- plan
def plan_grid(args: argparse.Namespace) -> tuple[Profile, list[RunSpec], dict[str, str]]:
    """Profile, runs and broken variants from the command line; UsageError if anything is off."""
    from bench.variants import discover

    overrides, profile_words = split_overrides(args.overrides)
    try:
        profile = load_profile(args.profile, profile_words)
        if args.jobs is not None:
            if args.jobs < 1:
                raise GridError(f"--jobs must be >= 1, got {args.jobs}")
            profile.local.jobs = args.jobs
        if args.group_size is not None:
            if args.group_size < 1:
                raise GridError(f"--group-size must be >= 1, got {args.group_size}")
            profile.group_size = args.group_size
        experiments = parse_names(
            args.experiments or profile.experiments, available(EXPERIMENTS_DIR), "experiment"
        )
        seeds = parse_seeds(args.seeds or profile.seeds)
        found = discover()
        known = sorted([*found.variants, *found.broken])
        wanted = parse_names(args.variants or profile.variants or "all", known, "variant")
    except GridError as err:
        raise UsageError(str(err)) from err
    broken = {name: found.broken[name] for name in wanted if name in found.broken}
    variants = [found.variants[name] for name in wanted if name in found.variants]
    if args.device:
        overrides.append(f"train.device={args.device}")
    overrides.append("train.progress=false")  # the grid has its own bar; not part of the hash
    try:
        runs = build_grid(experiments, variants, seeds, profile, overrides, args.results.resolve())
    except (ConfigError, GridError) as err:
        raise UsageError(str(err)) from err
    return profile, runs, broken


def print_plan(runs: list[RunSpec], states: list[RunState], everything: bool) -> None:
    """Counts per action, then one line per run (only the noteworthy ones unless `everything`)."""
    counts = Counter(ACTIONS[s.status] for s in states)
    print(f"{len(runs)} runs: " + ", ".join(f"{n} to {a}" for a, n in sorted(counts.items())))
    for run, state in zip(runs, states, strict=True):
        if everything or state.status not in ("complete", "new"):
            print(f"  {ACTIONS[state.status]:6s} {run.name:45s} {run.config_hash}  {state.detail}")


def print_jobs(jobs: list[RunGroup], group_size: int) -> None:
    """How the runs to train are split into jobs."""
    if not jobs:
        return
    runs = sum(len(job.runs) for job in jobs)
    how = f"groups of up to {group_size} seeds" if group_size > 1 else "one run per job"
    print(f"{_count(runs, 'run')} in {_count(len(jobs), 'job')} ({how})")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def print_broken(broken: dict[str, str]) -> None:
    for name, reason in broken.items():
        print(f"broken variant {name} (not run): {reason}", file=sys.stderr)


def current_queue(cluster: str, results: Path, settle: bool) -> dict | None:
    """The SLURM queue (None where there is no SLURM); runs whose jobs died are settled first."""
    if cluster != "slurm" and not slurm_available():
        return None
    try:
        queue = slurm_queue()
    except SlurmError:
        if cluster == "slurm":
            raise
        return None  # SLURM tools without a reachable controller: nothing can be queued there
    if settle:
        settle_dead_jobs(results, queue)
    return queue


def run_grid(args: argparse.Namespace) -> int:
    results, reports = args.results.resolve(), args.reports.resolve()
    if args.report_only:
        return report_only(results, reports)
    profile, runs, broken = plan_grid(args)
    print_broken(broken)
    slurm = args.cluster == "slurm"
    if slurm and not slurm_available():
        raise UsageError("--cluster slurm: sbatch/squeue/sacct/scontrol not found on this machine")
    print(
        f"grid: profile {args.profile}, {len({r.experiment for r in runs})} experiment(s) x "
        f"{len({r.variant for r in runs})} variant(s) x {len({r.seed for r in runs})} seed(s), "
        f"cluster {args.cluster}, results in {results}"
    )
    session = None
    with launch_lock(results, exclusive=slurm and not args.dry_run):
        queue = current_queue(args.cluster, results, settle=not args.dry_run)
        states = [inspect_run(r.run_dir, r.config_hash, queue) for r in runs]
        print_plan(runs, states, everything=args.dry_run)
        jobs = group_runs(runs, states, profile.group_size)
        print_jobs(jobs, profile.group_size)
        if args.dry_run:
            if slurm:
                describe_arrays(array_groups(jobs, profile), profile)
            return EXIT_RUNS_FAILED if broken else EXIT_OK
        if slurm:
            session = submit_slurm(array_groups(jobs, profile), profile, results, reports)
    if not slurm:
        run_local(jobs, profile, results, args.cluster, progress=not args.no_progress)
        return finish(runs, results, reports, broken, report=True)
    if session is None:  # nothing submitted: all done, or still in the queue from before
        pending = any(s.status in ("queued", "running") for s in states)
        return finish(runs, results, reports, broken, report=not pending)
    if not args.wait:
        return EXIT_RUNS_FAILED if broken else EXIT_OK
    wait_slurm(session, progress=not args.no_progress)
    return finish(runs, results, reports, broken, report=False)


@contextmanager
def launch_lock(results: Path, exclusive: bool) -> Iterator[None]:
    """One SLURM launcher at a time per results folder: two would both submit the same runs."""
    if not exclusive:
        yield
        return
    results.mkdir(parents=True, exist_ok=True)
    with open(results / ".launch.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("another run_all.py is submitting to this results folder; waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


# ---------------------------------------------------------------------------------------- local
def _new_session_dir(results: Path) -> tuple[Path, str]:
    """A fresh submitit folder per invocation (SLURM_NOTES pitfall 9: job ids get reused)."""
    token = secrets.token_hex(3)
    folder = results / ".submitit" / f"{time.strftime('%Y%m%d-%H%M%S')}-{token}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder, token


def _local_timeout_min(profile: Profile) -> float:
    return profile.local.timeout_min or 60 * 24 * 365  # submitit's default would be 2 minutes


def run_local(
    jobs: list[RunGroup], profile: Profile, results: Path, cluster: str, progress: bool
) -> None:
    """Train `jobs` here: `profile.local.jobs` worker processes at a time (debug: in-process)."""
    import submitit
    from tqdm import tqdm

    from bench.worker import Worker

    if not jobs:
        return
    folder, _ = _new_session_dir(results)
    grace = max(5.0, profile.slurm.signal_delay_s / 2)
    if cluster == "debug":
        executor: Any = submitit.DebugExecutor(folder / "%j")
        slots, worker = 1, Worker(raise_errors=True)
    else:
        executor = submitit.LocalExecutor(folder / "%j")
        executor.update_parameters(timeout_min=_local_timeout_min(profile))
        slots, worker = profile.local.jobs, Worker()
    pending = list(jobs)
    running: list[tuple[Any, RunGroup, float]] = []
    total = sum(len(group.runs) for group in jobs)
    bar = tqdm(total=total, desc="grid", unit="run", disable=not progress, dynamic_ncols=True)
    try:
        with bar:
            while pending or running:
                while pending and len(running) < slots:
                    group = pending.pop(0)
                    submitted_at = time.time()
                    job = executor.submit(worker, group.task(grace))
                    _record_local_submission(group, job, cluster, folder, submitted_at)
                    running.append((job, group, submitted_at))
                    if cluster == "debug":
                        break  # a DebugJob runs when its result is asked for, just below
                for entry in list(running):
                    if cluster != "debug" and not entry[0].done():
                        continue
                    running.remove(entry)
                    lines = _collect(*entry)
                    bar.update(len(lines))
                    for line in lines:
                        bar.write(line) if progress else print(line, flush=True)
                if running:
                    time.sleep(0.2)
    except KeyboardInterrupt:
        for job, _, _ in running:
            job.cancel()  # SIGINT to the worker: it keeps its last checkpoint
        raise


def _record_local_submission(
    group: RunGroup, job: Any, cluster: str, folder: Path, submitted_at: float
) -> None:
    """submission.json in each member's folder: the local job that holds it."""
    record = {
        "cluster": cluster,
        "job_id": str(job.job_id),
        "submitted_at": submitted_at,
        "submitit_folder": str(folder),
        "stdout": str(job.paths.stdout),
        "stderr": str(job.paths.stderr),
    }
    if len(group.runs) > 1:
        record["group_seeds"] = group.seeds
    for run in group.runs:
        atomic_write_json(run.run_dir / SUBMISSION, record)


def _collect(job: Any, group: RunGroup, submitted_at: float) -> list[str]:
    """Results of a finished local job, one line per run; a job that died leaves error results
    in the folders of its runs that it did not finish."""
    try:
        returned = job.result()
        records = returned if isinstance(returned, list) else [returned]
    except Exception as err:  # the process died (killed, out of memory), or debug re-raised
        records = [_result_or_death(run, job, submitted_at, err) for run in group.runs]
    return [_describe(run, record) for run, record in zip(group.runs, records, strict=True)]


def _result_or_death(run: RunSpec, job: Any, submitted_at: float, err: Exception) -> dict[str, Any]:
    """The run's result if its (dead) job wrote one, else an error record saying it died."""
    record, _ = read_result(run.run_dir)
    path = run.run_dir / RESULT
    if record is None or path.stat().st_mtime < submitted_at:  # nothing from this job
        record = {
            "status": "error",
            "experiment": run.experiment,
            "variant": run.variant,
            "seed": run.seed,
            "config_hash": run.config_hash,
            "error": f"{_tail(Path(job.paths.stderr))}\n"
            f"worker process ended without a result: {err}",
        }
        atomic_write_json(path, record)
    return record


def _describe(run: RunSpec, record: dict[str, Any]) -> str:
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
    return f"{status:8s} {run.name}"


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------- SLURM
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
    arrays: list[list[RunGroup]], profile: Profile, results: Path, reports: Path
) -> dict[str, Any] | None:
    """Submit the arrays (one task per job) and the report job; returns the session record
    (None: nothing to do)."""
    from bench.worker import Worker

    if not arrays:
        print("nothing to submit")
        return None
    folder, token = _new_session_dir(results)
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
        for index, group in enumerate(
            array
        ):  # recorded first: a crash after sbatch can't repeat it
            _record_slurm_submission(group, name, index, folder, job=None)
        try:
            with executor.batch():
                jobs = [executor.submit(Worker(), group.task(grace)) for group in array]
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
        atomic_write_json(run.run_dir / SUBMISSION, record)


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
        sub = read_json(run_dir / SUBMISSION)
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
        exp, var, digest, seed = run_dir.parts[-4:]
        atomic_write_json(
            run_dir / RESULT,
            {
                "status": DEAD_STATES[state],
                "experiment": exp,
                "variant": var,
                "seed": int(seed.removeprefix("seed_")),
                "config_hash": digest,
                # Like a traceback, the summary comes last: plans show the last line.
                "error": f"last lines of {sub.get('stderr')}:\n"
                f"{_tail(Path(sub.get('stderr', '')))}\n"
                f"SLURM job {sub['job_id']} ended {state} without writing a result",
            },
        )
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


# ---------------------------------------------------------------------------------------- report
def write_report(results: Path, reports: Path) -> Path | None:
    """The HTML report, if bench.report is installed; None (with a warning) if it is not."""
    try:
        from bench.report import build_all
    except ImportError as err:
        log.warning(
            "no HTML report: bench.report cannot be imported (%s); the CSV files "
            "in %s are up to date",
            err,
            results,
        )
        return None
    pages = build_all(results, reports)
    return pages[0] if isinstance(pages, (list, tuple)) else pages  # the index comes first


def report_only(results: Path, reports: Path) -> int:
    from bench.gather import gather, summary

    gathered = gather(results)
    print(summary(gathered.runs).to_string(index=False) if len(gathered.runs) else "no runs")
    index = write_report(results, reports)
    print(f"runs: {results / 'runs.csv'}, evaluations: {results / 'evals.csv'}")
    if index:
        print(f"report: {index}")
    return EXIT_OK


def finish(
    runs: list[RunSpec], results: Path, reports: Path, broken: dict[str, str], report: bool
) -> int:
    """Gather (and write the report); exit status 3 if a variant was broken or a run failed."""
    from bench.gather import gather, summary

    gathered = gather(results)
    if len(gathered.runs):
        print(summary(gathered.runs).to_string(index=False))
    print(f"runs: {results / 'runs.csv'}, evaluations: {results / 'evals.csv'}")
    status = EXIT_OK
    if report:
        try:
            index = write_report(results, reports)
            if index:
                print(f"report: {index}")
        except Exception:
            log.exception("writing the report failed")
            status = EXIT_FAILED
    failed = 0
    for run in runs:
        record, _ = read_result(run.run_dir)
        if record and record.get("status") in ("error", "timeout"):
            failed += 1
            print(f"{record['status']}: {run.name} (see {run.run_dir / RESULT})", file=sys.stderr)
    print_broken(broken)
    return EXIT_RUNS_FAILED if broken or failed else status
