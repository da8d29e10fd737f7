"""`run_all.py`'s command line: options, their help, and how the words are split."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from bench.grid import PROFILES_DIR, GridError, available, load_profile

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_RUNS_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
DEFAULT_PROFILE = "cpu"


class UsageError(ValueError):
    """A bad command line; reported before anything runs (exit status 2)."""


def _profile_defaults() -> dict[str, tuple[str, str, str]]:
    """Each shipped profile's default (experiments, variants, seeds), for the help texts."""
    out = {}
    for name in available(PROFILES_DIR):
        try:
            profile = load_profile(name)
        except GridError:
            continue
        variants = ",".join(profile.variants) if profile.variants else "all"
        out[name] = (",".join(profile.experiments), variants, profile.seeds)
    return out


def _by_profile(defaults: dict[str, tuple[str, str, str]], index: int) -> str:
    return "; ".join(f"{name}: {values[index]}" for name, values in defaults.items())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = _profile_defaults()
    exp, var, seeds = defaults.get(DEFAULT_PROFILE, ("?", "?", "?"))
    p = argparse.ArgumentParser(
        prog="run_all.py",
        description="Train the AIR grid (experiments x variants x seeds) here or on SLURM, "
        "skip what is done, resume what is not, gather the metrics and write the report.",
        epilog="Examples:\n"
        f"  python run_all.py                        # the {DEFAULT_PROFILE} profile's grid: "
        f"{exp} x {var.count(',') + 1 if var != 'all' else 'all'} variant(s) x seeds {seeds}\n"
        "  python run_all.py --profile smoke --seeds 0-1 --dry-run\n"
        "  python run_all.py --cluster slurm --profile paper --seeds 0-19 "
        "profile.resources.account=me\n"
        "  python run_all.py --variants air_nvil_fixed,dair_nvil train.lr=3e-4   # overrides\n"
        "  python run_all.py -c configs/smoke.yaml -o results/try      # one run, no grid\n"
        "\nCtrl-C or SIGTERM: running jobs checkpoint after their current iteration and stop "
        "(exit 130 / 143);\nthe same command resumes them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--cluster",
        choices=["local", "slurm", "debug"],
        default="local",
        help="where runs train: local (this machine, a pool of processes; one job per GPU "
        "when runs train on CUDA), slurm, or debug (one by one in this process) "
        "(default: local)",
    )
    p.add_argument(
        "-e",
        "--experiments",
        help="comma-separated (a,b), or 'all' (default: the profile's; "
        f"{_by_profile(defaults, 0)})",
    )
    p.add_argument(
        "-v",
        "--variants",
        help="comma-separated (a,b), or 'all' (default: the profile's list; "
        f"{_by_profile(defaults, 1)})",
    )
    p.add_argument(
        "-s",
        "--seeds",
        help=f"e.g. 0-19, 3 or 0-2,7 (default: the profile's; {_by_profile(defaults, 2)})",
    )
    p.add_argument(
        "-p",
        "--profile",
        default=DEFAULT_PROFILE,
        help=f"{', '.join(defaults) or 'a profile'} or a YAML path (default: {DEFAULT_PROFILE})",
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
    p.add_argument(
        "-j",
        "--jobs",
        type=int,
        help="local: jobs at once (default: the profile's local.jobs; CUDA runs: one per GPU)",
    )
    p.add_argument(
        "-g",
        "--group-size",
        type=int,
        help="seeds of one config trained together by one job; 0: as many as the free GPU "
        "memory holds (default: the profile's group_size)",
    )
    p.add_argument(
        "--results", type=Path, default=Path("results"), help="results folder (default: results/)"
    )
    p.add_argument(
        "--reports", type=Path, default=Path("reports"), help="reports folder (default: reports/)"
    )
    p.add_argument(
        "-d", "--device", help="cpu or cuda (same as train.device=...; default: the config's)"
    )
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
        "--config-help",
        nargs="?",
        const="",
        metavar="PREFIX",
        help="print every run-config field (type, default, documentation), or those whose key "
        "starts with PREFIX (e.g. model. or train.lr), and exit",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="run-config overrides (omegaconf dotlist, e.g. train.lr=3e-4); "
        "profile.<key>=value overrides the profile (e.g. profile.resources.qos=high)",
    )
    args = p.parse_args(argv)
    if args.config_help is not None:  # like --help: print and exit before anything runs
        from bench.config_help import config_help

        try:
            print(config_help(args.config_help))
        except ValueError as err:
            p.exit(EXIT_USAGE, f"run_all.py: error: {err}\n")
        p.exit(EXIT_OK)
    return args


def split_overrides(words: list[str]) -> tuple[list[str], list[str]]:
    """key=value words -> (run-config overrides, profile overrides without 'profile.')."""
    bad = [w for w in words if "=" not in w or w.startswith("=")]
    if bad:
        raise UsageError(
            f"expected key=value overrides, got {bad} "
            "(lists of experiments, variants or seeds take commas: --variants a,b)"
        )
    run = [w for w in words if not w.startswith("profile.")]
    profile = [w.removeprefix("profile.") for w in words if w.startswith("profile.")]
    return run, profile


def user_command(argv: list[str]) -> str:
    """The command line as the user typed it, for each run's provenance."""
    return shlex.join(["run_all.py", *argv])
