"""The launcher behind `run_all.py`: plan the grid, run it here or submit it to SLURM, gather.

Every job goes through the same worker (`bench.worker.Worker`, pickled by submitit):
  --cluster local   a bounded pool of processes on this machine, one job per GPU for CUDA runs
                    (bench/local.py)
  --cluster slurm   job arrays grouped by resources, then a report job (afterany) (bench/slurm.py)
  --cluster debug   one job after another inside this process (errors reach pdb)

A job trains one run or, with the profile's `group_size` > 1, up to that many seeds of one
(experiment, variant, config) together (bench/seedgroup.py); results stay one folder per seed.

The plan is read from the run folders and, for SLURM, the queue: complete runs are skipped,
partial and interrupted ones resume from their checkpoint, failed ones are retried, runs with an
unreadable result are redone (and the plan says so), and runs whose SLURM job is still queued or
running are never submitted again. A run's folder records which job holds it (submission.json)
before the job is submitted, and jobs are found again by their array's unique name and index;
the members of a group share their job's name and index. Before anything starts, the MNIST
files are looked up once (bench/data/mnist.py): missing ones stop the grid with where to put
them. Ctrl-C or SIGTERM stops running local jobs, each checkpointed (exit 130 / 143).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.cli import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RUNS_FAILED,
    EXIT_USAGE,
    UsageError,
    parse_args,
    split_overrides,
    user_command,
)
from bench.config import ConfigError
from bench.grid import (
    EXPERIMENTS_DIR,
    RESULT,
    GridError,
    Profile,
    RunGroup,
    RunSpec,
    RunState,
    SlurmError,
    available,
    build_grid,
    group_runs,
    load_profile,
    parse_names,
    parse_seeds,
    read_result,
    run_state,
    slurm_available,
    slurm_queue,
)
from bench.local import run_local, sigterm_as_interrupt
from bench.preflight import DataMissing, check_data
from bench.slurm import array_groups, describe_arrays, settle_dead_jobs, submit_slurm, wait_slurm

__all__ = ["EXIT_OK", "EXIT_USAGE", "UsageError", "main", "parse_args", "plan_grid", "run_grid"]

log = logging.getLogger("air-repro")

ACTIONS = {  # run state -> what the launcher does, as the plan prints it
    "complete": "skip",
    "queued": "skip",
    "running": "skip",
    "new": "start",
    "partial": "resume",
    "interrupted": "resume",
    "corrupt": "redo",
    "error": "retry",
    "timeout": "retry",
}


def main(argv: list[str] | None = None) -> int:
    """run_all.py. Exit status: 0 ok, 1 failed before training (SLURM, data), 2 bad command
    line, 3 a run failed or a variant is broken, 130 / 143 stopped by SIGINT / SIGTERM."""
    words = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(words)
    args.command = user_command(words)  # for each run's provenance
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    try:
        with sigterm_as_interrupt():
            if args.config or args.out:
                return single_run(args)
            return run_grid(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (SlurmError, DataMissing) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (bench.local.Terminated)
        print("\ninterrupted; the same command resumes where the runs stopped", file=sys.stderr)
        signum = getattr(err, "signum", None)
        return 128 + signum if signum else EXIT_INTERRUPTED


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
            if args.group_size < 0:
                raise GridError(f"--group-size must be >= 1, or 0 (auto), got {args.group_size}")
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
    from bench.disk import disk_line  # checkpoint and model.pt sizes (issue 14 point 8)

    print(disk_line(runs, states))


def print_jobs(jobs: list[RunGroup], group_size: int) -> None:
    """How the runs to train are split into jobs."""
    if not jobs:
        return
    runs = sum(len(job.runs) for job in jobs)
    how = f"groups of up to {group_size} seeds" if group_size > 1 else "one run per job"
    print(f"{_count(runs, 'run')} in {_count(len(jobs), 'job')} ({how})")


def resolve_group_size(group_size: int, runs: list[RunSpec]) -> int:
    """The profile's group size, or with 0 (auto) as many seeds as the free GPU memory holds."""
    from bench.gpu_plan import AUTO, auto_group_size

    if group_size != AUTO:
        return group_size
    per_config = Counter((r.experiment, r.variant, r.config_hash) for r in runs)
    device = str(runs[0].cfg.train.device) if runs else "cpu"
    size, why = auto_group_size(max(per_config.values(), default=1), device)
    print(why)
    return size


def expected_wall(jobs: list[RunGroup], results: Path) -> str:
    """The plan's line on how long the runs to train should take on this device."""
    import torch

    from bench.gpu_plan import expected_wall_line
    from bench.provenance import device_name

    todo = [run for job in jobs for run in job.runs]
    device = torch.device(str(todo[0].cfg.train.device) if todo else "cpu")
    usable = device.type != "cuda" or torch.cuda.is_available()
    label = device_name(device) if usable else str(device)
    return expected_wall_line([r.cfg.train.iterations for r in todo], results, label)


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
        states = [run_state(r.run_dir, r.config_hash, queue) for r in runs]
        print_plan(runs, states, everything=args.dry_run)
        group_size = resolve_group_size(profile.group_size, runs)
        jobs = group_runs(runs, states, group_size)
        print_jobs(jobs, group_size)
        print(expected_wall(jobs, results))
        from bench.grid_record import record_grid  # the asked grid, for the report (issue 14)

        record_grid(results, args, profile, runs, broken)  # writes nothing for --dry-run
        if args.dry_run:
            if slurm:
                describe_arrays(array_groups(jobs, profile), profile)
            return EXIT_RUNS_FAILED if broken else EXIT_OK
        check_data(run.cfg for job in jobs for run in job.runs)  # once, before any job starts
        command = getattr(args, "command", None)
        if slurm:
            session = submit_slurm(array_groups(jobs, profile), profile, results, reports, command)
    if not slurm:
        run_local(
            jobs, profile, results, args.cluster, progress=not args.no_progress,
            max_jobs=args.jobs, command=command,
        )  # fmt: skip
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
        elif record and record.get("status") == "interrupted":  # its worker was stopped alone
            print(f"interrupted: {run.name} (the same command resumes it)", file=sys.stderr)
    print_broken(broken)
    return EXIT_RUNS_FAILED if broken or failed else status
