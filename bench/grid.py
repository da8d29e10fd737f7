"""The grid: experiments x variants x seeds under a budget profile, and where each run stands.

An experiment (`configs/experiments/<name>.yaml`) fixes the data: which digit counts are trained
and tested, and the data seed. A profile (`configs/profiles/<name>.yaml`) fixes the budget:
run-config overrides (iterations, evaluation sizes), default seeds, local parallelism and SLURM
resources. A run is (experiment, variant, config hash, seed) and lives in

    <results>/<experiment>/<variant>/<config_hash>/seed_<n>/

Its state is read from that folder alone (result.json, checkpoint, submission.json) plus, for
runs submitted to SLURM, the scheduler's queue; nothing else keeps track of runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import fcntl
import getpass
import json
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from bench.config import ConfigError, RunConfig, config_hash, to_dict
from bench.storage import read_json_lines
from bench.variants import Resources, Variant, ensure_registered
from implementations.core.estimators import ESTIMATORS

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS_DIR = PROJECT_ROOT / "configs" / "experiments"
PROFILES_DIR = PROJECT_ROOT / "configs" / "profiles"

# Files of a run folder besides the trainer's config.yaml, metrics.jsonl and checkpoints.
RESULT = "result.json"
SUBMISSION = "submission.json"  # which scheduler job holds the run (written before submitting)
ATTEMPTS = "attempts.jsonl"  # one line per worker process that worked on the run
LOCK = ".lock"  # flock held by the worker training the run; holds its pid and host


class GridError(ValueError):
    """A bad grid request: unknown name, bad seed range, bad experiment or profile file."""


# ---------------------------------------------------------------------------------------- schemas
@dataclass
class Experiment:
    """Schema of `configs/experiments/<name>.yaml`."""

    description: str = ""  # one line: what the experiment measures
    config: dict[str, Any] = field(default_factory=dict)  # run-config overrides (data.*)


@dataclass
class LocalSettings:
    """How `--cluster local` runs the grid on this machine."""

    jobs: int = 1  # runs trained at once, one process each
    timeout_min: float = 0  # time limit per run (then checkpoint and restart); 0: none


@dataclass
class SlurmSettings:
    """How `--cluster slurm` submits the grid."""

    array_parallelism: int = 16  # tasks of one array running at once (sbatch --array=0-N%this)
    max_array_size: int | None = None  # tasks per array; None: the cluster's MaxArraySize
    max_num_timeout: int = 10  # requeues after time limits before a run is recorded as timeout
    signal_delay_s: int = 120  # SIGUSR2 this long before the time limit: checkpoint, requeue
    setup: list[str] = field(default_factory=list)  # shell lines run first (module load, ...)
    report: Resources = field(  # the report job, run after every array (afterany)
        default_factory=lambda: Resources(
            gpus_per_node=0, cpus_per_task=1, mem_gb=4, timeout_min=30
        )
    )


@dataclass
class Profile:
    """Schema of `configs/profiles/<name>.yaml`: a budget for the whole grid."""

    description: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # run-config overrides (train.*, eval.*)
    seeds: str = "0-2"  # default --seeds
    experiments: list[str] = field(default_factory=lambda: ["count"])  # default --experiments
    variants: list[str] = field(default_factory=list)  # default --variants; empty: all valid
    resources: Resources = field(default_factory=Resources)  # per job; a variant's own win
    # Seeds of one (experiment, variant, config) trained together by one job (bench/seedgroup.py,
    # vectorised over the seeds); 1: one run per job. Results stay one folder per seed.
    group_size: int = 1
    local: LocalSettings = field(default_factory=LocalSettings)
    slurm: SlurmSettings = field(default_factory=SlurmSettings)


def available(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml"))


def _suggest(name: str, known: list[str]) -> str:
    guess = difflib.get_close_matches(name, known, n=1)
    return f"; did you mean {guess[0]!r}?" if guess else ""


def _load_typed(schema_cls: type, path: Path, overrides: list[str] | None = None) -> Any:
    """A YAML file merged over a dataclass schema; unknown keys and bad types are GridErrors."""
    schema = OmegaConf.structured(schema_cls)
    try:
        raw = OmegaConf.load(path)
    except Exception as err:  # yaml raises several types
        raise GridError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, DictConfig):
        raise GridError(f"{path}: expected a mapping at the top level")
    source = str(path)
    try:
        merged = OmegaConf.merge(schema, raw)
        if overrides:
            source = "command-line profile override"
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(overrides))
        return OmegaConf.to_object(merged)
    except ConfigKeyError as err:
        key = err.full_key or ""
        raise GridError(f"{source}: unknown key {key!r}{_suggest(key, _keys(schema))}") from err
    except OmegaConfBaseException as err:
        raise GridError(f"{source}: bad value for {err.full_key!r}: {err.msg}") from err


def _keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted names of every key of a structured config, for suggestions."""
    out = []
    if isinstance(node, DictConfig):
        for key in node:
            out.append(f"{prefix}{key}")
            out += _keys(node._get_node(key), f"{prefix}{key}.")
    return out


def load_experiment(name: str) -> Experiment:
    path = EXPERIMENTS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = available(EXPERIMENTS_DIR)
        raise GridError(f"unknown experiment {name!r}{_suggest(name, known)} (known: {known})")
    return _load_typed(Experiment, path)


def load_profile(name: str, overrides: list[str] | None = None) -> Profile:
    """A profile by name (configs/profiles/) or YAML path, then dotlist overrides."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = available(PROFILES_DIR)
        raise GridError(f"unknown profile {name!r}{_suggest(name, known)} (known: {known})")
    profile: Profile = _load_typed(Profile, path, overrides)
    if profile.local.jobs < 1 or profile.slurm.array_parallelism < 1:
        raise GridError(f"{path}: local.jobs and slurm.array_parallelism must be >= 1")
    if profile.slurm.max_array_size is not None and profile.slurm.max_array_size < 1:
        raise GridError(f"{path}: slurm.max_array_size must be >= 1 (or null: the cluster's)")
    if profile.group_size < 1:
        raise GridError(
            f"{path}: group_size must be >= 1 (seeds trained by one job), got {profile.group_size}"
        )
    return profile


def parse_seeds(text: str) -> list[int]:
    """'0-19', '3', '0-2,7' -> sorted unique seeds."""
    seeds: set[int] = set()
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise GridError(f"bad seed range {text!r}: expected e.g. '0-19', '3' or '0-2,7'")
        lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if hi < lo:
            raise GridError(f"bad seed range {part.strip()!r}: {hi} < {lo}")
        seeds.update(range(lo, hi + 1))
    return sorted(seeds)


def parse_names(text: str | list[str], known: list[str], kind: str) -> list[str]:
    """'a,b' or a list -> names, each checked against `known` ('all': every known name)."""
    words = text.split(",") if isinstance(text, str) else list(text)
    names = [w.strip() for w in words if w.strip()]
    if names == ["all"]:
        return list(known)
    if not names:
        raise GridError(f"no {kind} given")
    for name in names:
        if name not in known:
            raise GridError(f"unknown {kind} {name!r}{_suggest(name, known)} (known: {known})")
    return list(dict.fromkeys(names))


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

    def task(self, stop_grace_s: float) -> dict[str, Any]:
        """What the worker receives: plain data, so it pickles and logs simply."""
        return {
            "experiment": self.experiment,
            "variant": self.variant,
            "seed": self.seed,
            "config_hash": self.config_hash,
            "run_dir": str(self.run_dir),
            "config": to_dict(self.cfg),
            "stop_grace_s": stop_grace_s,
        }


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

    def task(self, stop_grace_s: float) -> dict[str, Any]:
        """The worker's task: a single run's as it always was, or the list of member tasks."""
        if len(self.runs) == 1:
            return self.runs[0].task(stop_grace_s)
        return {"group": [r.task(stop_grace_s) for r in self.runs], "stop_grace_s": stop_grace_s}


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
    """Every run, with its config resolved and checked (ConfigError names the pair at fault)."""
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
                raise ConfigError(f"{exp_name} x {variant.name}: {err}") from err
            digest = config_hash(base)
            resources = merge_resources(profile.resources, variant.spec.resources)
            for seed in seeds:
                run_dir = results_root / exp_name / variant.name / digest / f"seed_{seed}"
                cfg = dataclasses.replace(base, seed=seed, out_dir=str(run_dir))
                runs.append(RunSpec(exp_name, variant.name, seed, cfg, digest, run_dir, resources))
    return runs


# ---------------------------------------------------------------------------------------- state
def read_result(run_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None), (None, why it is unreadable), or (None, None) when there is none."""
    path = run_dir / RESULT
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as err:
        return None, f"{RESULT} is unreadable ({type(err).__name__}: {err})"
    if not isinstance(record, dict) or "status" not in record:
        return None, f"{RESULT} has no 'status' field"
    return record, None


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def lock_holder(run_dir: Path) -> str | None:
    """'pid N on HOST' if a live process on this host holds the run, else None.

    The worker holds an flock on the lock file while it trains; the kernel drops it when the
    holder dies (even by SIGKILL). So the flock, not the pid written inside, says whether the
    run is held: a killed worker can linger as a zombie whose pid still answers kill(pid, 0).
    A holder on another host is only known through SLURM.
    """
    holder = read_json(run_dir / LOCK)
    if not holder or holder.get("host") != socket.gethostname():
        return None
    try:
        fd = os.open(run_dir / LOCK, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return f"pid {holder.get('pid')} on {holder['host']}"
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def last_evaluated_iteration(run_dir: Path) -> int | None:
    try:
        history = read_json_lines(run_dir / "metrics.jsonl")
    except (OSError, ValueError):
        return None
    return history[-1].get("iteration") if history else None


# SLURM states in which a job may still train the run: never submit it again then.
LIVE_STATES = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
    "RESV_DEL_HOLD",
    "SPECIAL_EXIT",
    "PREEMPTED",
    "STOPPED",
}


class SlurmError(RuntimeError):
    """The SLURM commands are missing or the controller does not answer."""


def slurm_available() -> bool:
    return all(shutil.which(c) for c in ("sbatch", "squeue", "sacct", "scontrol"))


def slurm_queue() -> dict[tuple[str, int], tuple[str, str]]:
    """Live jobs of this user: (job name, array index) -> (job id, state), array tasks expanded.

    Runs are matched by the unique job name of their array and their index in it, not by job
    id alone: job ids restart at 1 on a purged cluster (SLURM_NOTES pitfall 9).
    """
    cmd = ["squeue", "--noheader", "--array", f"--user={getpass.getuser()}", "--format=%i|%j|%K|%T"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SlurmError(f"squeue failed: {err}") from err
    if out.returncode != 0:
        raise SlurmError(f"squeue failed: {out.stderr.strip() or out.returncode}")
    live = {}
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 4 or parts[3] not in LIVE_STATES:
            continue
        job_id, name, index, state = parts
        # A job that is not an array (submitit submits a one-run batch as a plain job) is index 0.
        live[(name, int(index) if index.isdigit() else 0)] = (job_id, state)
    return live


def slurm_final_states(job_ids: list[str]) -> dict[str, str]:
    """Accounting state (TIMEOUT, FAILED, CANCELLED, ...) of finished jobs; {} if unknown."""
    if not job_ids:
        return {}
    cmd = [
        "sacct",
        "--noheader",
        "--parsable2",
        "--allocations",
        "--format=JobID,State",
        f"--jobs={','.join(job_ids)}",
    ]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    states = {}
    for line in out.stdout.splitlines():
        job_id, _, state = line.partition("|")
        states[job_id] = state.split()[0] if state else ""
    return states


@dataclass
class RunState:
    """Where a run stands, and what the launcher does about it."""

    status: str  # complete | error | timeout | corrupt | partial | new | queued | running
    detail: str  # one line for people
    job_id: str | None = None  # SLURM job holding the run, if any

    @property
    def to_run(self) -> bool:
        return self.status in ("error", "timeout", "corrupt", "partial", "new")


def live_job(
    run_dir: Path, queue: dict[tuple[str, int], tuple[str, str]] | None
) -> tuple[str, str] | None:
    """(job id, state) of the SLURM job that holds the run, if it is still queued or running."""
    record = read_json(run_dir / SUBMISSION)
    if queue is None or not record or record.get("cluster") != "slurm":
        return None
    return queue.get((record.get("job_name", ""), int(record.get("array_index", 0))))


def inspect_run(
    run_dir: Path, expected_hash: str, queue: dict[tuple[str, int], tuple[str, str]] | None
) -> RunState:
    """The run's state from its folder and the SLURM queue (None: not consulted)."""
    job = live_job(run_dir, queue)
    if job is not None:
        status = "running" if job[1] in ("RUNNING", "COMPLETING") else "queued"
        return RunState(status, f"{status} on SLURM as job {job[0]} ({job[1]})", job[0])
    holder = lock_holder(run_dir)
    if holder is not None:
        return RunState("running", f"being trained by {holder}")
    record, problem = read_result(run_dir)
    if problem is not None:
        return RunState("corrupt", f"redo: {problem}")
    if record is not None:
        status = record["status"]
        if status == "complete" and record.get("config_hash") == expected_hash:
            return RunState("complete", f"complete ({record.get('outcome')})")
        if status in ("error", "timeout"):
            return RunState(status, f"retry after {status}: {_last_line(record.get('error'))}")
        return RunState("corrupt", f"redo: {RESULT} has status {status!r} / another config hash")
    if (run_dir / "checkpoint.pt").exists() or (run_dir / "checkpoint.prev.pt").exists():
        it = last_evaluated_iteration(run_dir)
        where = f" (last evaluation at iteration {it})" if it is not None else ""
        return RunState("partial", f"resume from its checkpoint{where}")
    return RunState("new", "new")


def _last_line(text: Any) -> str:
    lines = [ln for ln in str(text or "").strip().splitlines() if ln.strip()]
    return lines[-1][:160] if lines else "(no message)"  # a traceback's last line says most
