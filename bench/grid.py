"""The grid: experiments x variants x seeds under a budget profile, and where each run stands.

The experiment and profile files and the names and seeds asked for are read by
bench/grid_config.py (re-exported here). A run is (experiment, variant, config hash, seed) and
lives in

    <results>/<experiment>/<variant>/<config_hash>/seed_<n>/

Its state is read from that folder alone (result.json, checkpoint, submission.json; the names
and readers: bench/run_folder.py) plus, for runs submitted to SLURM, the scheduler's queue;
nothing else keeps track of runs (bench/runstate.py: `run_state`).
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.config import ConfigError, RunConfig, config_hash, load_config, to_dict
from bench.grid_config import (
    EXPERIMENTS_DIR,
    PROFILES_DIR,
    PROJECT_ROOT,
    Experiment,
    GridError,
    LocalSettings,
    Profile,
    SlurmSettings,
    available,
    load_experiment,
    load_profile,
    parse_names,
    parse_seeds,
)
from bench.overrides import OverrideError, check_overrides
from bench.runstate import (
    ATTEMPTS,
    LIVE_STATES,
    LOCK,
    RESULT,
    SUBMISSION,
    RunState,
    SlurmError,
    inspect_run,
    last_evaluated_iteration,
    live_job,
    lock_holder,
    read_json,
    read_result,
    run_state,
    slurm_available,
    slurm_final_states,
    slurm_queue,
)
from bench.variants import Resources, Variant, ensure_registered
from implementations.core.estimators import ESTIMATORS

# The grid's inputs live in bench/grid_config.py, where each run stands in bench/runstate.py
# (file names: bench/run_folder.py); their names are re-exported from here.
__all__ = [
    "ATTEMPTS", "LIVE_STATES", "LOCK", "RESULT", "SUBMISSION", "EXPERIMENTS_DIR", "PROFILES_DIR",
    "PROJECT_ROOT", "Experiment", "GridError", "LocalSettings", "Profile", "RunGroup", "RunSpec",
    "RunState", "SlurmError", "SlurmSettings", "available", "build_grid", "group_runs",
    "inspect_run", "last_evaluated_iteration", "live_job", "load_experiment", "load_profile",
    "lock_holder", "merge_resources", "new_session_dir", "parse_names", "parse_seeds",
    "read_json", "read_result", "run_state", "slurm_available", "slurm_final_states",
    "slurm_queue",
]  # fmt: skip


# ---------------------------------------------------------------------------------------- runs
@dataclass
class RunSpec:
    """One run of the grid, fully resolved."""

    experiment: str
    variant: str
    seed: int
    cfg: RunConfig
    config_hash: str
    run_dir: Path
    resources: Resources  # profile defaults with the variant's own settings on top

    @property
    def name(self) -> str:
        return f"{self.experiment}/{self.variant}/seed_{self.seed}"

    def task(self, stop_grace_s: float, command: str | None = None) -> dict[str, Any]:
        """What the worker receives: plain data, so it pickles and logs simply. `command`: the
        user's command line, for the run's provenance (the worker's own is submitit's)."""
        task = {
            "experiment": self.experiment,
            "variant": self.variant,
            "seed": self.seed,
            "config_hash": self.config_hash,
            "run_dir": str(self.run_dir),
            "config": to_dict(self.cfg),
            "stop_grace_s": stop_grace_s,
        }
        if command:
            task["command"] = command
        return task


@dataclass
class RunGroup:
    """The runs one job trains: a single run, or seeds of one (experiment, variant, config)."""

    runs: list[RunSpec]

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    @property
    def resources(self) -> Resources:
        return self.runs[0].resources  # one variant: the same resources for every member

    def task(self, stop_grace_s: float, command: str | None = None) -> dict[str, Any]:
        """The worker's task: a single run's as it always was, or the list of member tasks."""
        if len(self.runs) == 1:
            return self.runs[0].task(stop_grace_s, command)
        members = [r.task(stop_grace_s, command) for r in self.runs]
        return {"group": members, "stop_grace_s": stop_grace_s}


def group_runs(runs: list[RunSpec], states: list[RunState], group_size: int) -> list[RunGroup]:
    """The runs to train, in jobs: seeds that share (experiment, variant, config hash) are
    chunked into groups of at most `group_size`; runs that need no training are left out."""
    if group_size < 1:
        raise GridError(f"group_size must be >= 1, got {group_size}")
    same_config: dict[tuple[str, str, str], list[RunSpec]] = {}
    for run, state in zip(runs, states, strict=True):
        if state.to_run:
            key = (run.experiment, run.variant, run.config_hash)
            same_config.setdefault(key, []).append(run)
    return [
        RunGroup(members[i : i + group_size])
        for members in same_config.values()
        for i in range(0, len(members), group_size)
    ]


def merge_resources(profile: Resources, variant: Resources) -> Resources:
    """The variant's settings where it has them, the profile's elsewhere."""
    values = {
        f.name: getattr(variant, f.name)
        if getattr(variant, f.name) is not None
        else getattr(profile, f.name)
        for f in dataclasses.fields(Resources)
        if f.name != "additional"
    }
    return Resources(**values, additional={**profile.additional, **variant.additional})


def build_grid(
    experiments: list[str],
    variants: list[Variant],
    seeds: list[int],
    profile: Profile,
    overrides: list[str],
    results_root: Path,
) -> list[RunSpec]:
    """Every run, with its config resolved and checked. A bad command-line override is a
    ConfigError about the override alone; one that fails only with some experiment x variant
    pair names the pair."""
    try:
        check_overrides(RunConfig, overrides, "command-line override")
    except OverrideError as err:
        raise ConfigError(str(err)) from err
    runs = []
    profile_layer = ("profile: config", profile.config)
    for exp_name in experiments:
        experiment = load_experiment(exp_name)
        exp_layer = (f"{EXPERIMENTS_DIR / exp_name}.yaml: config", experiment.config)
        for variant in variants:
            try:
                # Resolved once per pair; seed and out_dir change neither the checks nor the hash.
                base = variant.run_config([exp_layer, profile_layer], [*overrides, "seed=0"])
                ensure_registered(base.estimator.name)
                ESTIMATORS[base.estimator.name].parse_params(dict(base.estimator.params))
            except (ConfigError, TypeError, ValueError) as err:
                if overrides and _fails_alone(overrides, err):
                    raise ConfigError(f"command-line override: {err}") from err
                raise ConfigError(f"{exp_name} x {variant.name}: {err}") from err
            digest = config_hash(base)
            resources = merge_resources(profile.resources, variant.spec.resources)
            for seed in seeds:
                run_dir = results_root / exp_name / variant.name / digest / f"seed_{seed}"
                cfg = dataclasses.replace(base, seed=seed, out_dir=str(run_dir))
                runs.append(RunSpec(exp_name, variant.name, seed, cfg, digest, run_dir, resources))
    return runs


def _fails_alone(overrides: list[str], err: Exception) -> bool:
    """Whether the overrides over the schema defaults alone fail with the same error (then it
    is about them, whatever the experiment and variant)."""
    try:
        load_config(overrides=[*overrides, "seed=0"])
    except (ConfigError, TypeError, ValueError) as alone:
        return str(alone) == str(err)
    return False


def new_session_dir(results: Path) -> tuple[Path, str]:
    """A fresh submitit folder per invocation (SLURM_NOTES pitfall 9: job ids get reused)."""
    token = secrets.token_hex(3)
    folder = results / ".submitit" / f"{time.strftime('%Y%m%d-%H%M%S')}-{token}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder, token
