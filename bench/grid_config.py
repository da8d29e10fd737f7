"""The grid's inputs: experiment and profile files (schemas, loading) and the names and seeds
asked for on the command line.

An experiment (`configs/experiments/<name>.yaml`) fixes the data: which digit counts are trained
and tested, and the data seed. A profile (`configs/profiles/<name>.yaml`) fixes the budget:
run-config overrides (iterations, evaluation sizes), default seeds, local parallelism and SLURM
resources. Unknown keys and values of the wrong type are GridErrors naming the file and key.
The runs they make up: bench/grid.py.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from bench.config import RunConfig
from bench.data.registry import DEFAULT_DATASET, DatasetError, get_dataset
from bench.overrides import OverrideError, check_overrides
from bench.variants import Resources

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS_DIR = PROJECT_ROOT / "configs" / "experiments"
PROFILES_DIR = PROJECT_ROOT / "configs" / "profiles"


class GridError(ValueError):
    """A bad grid request: unknown name, bad seed range, bad experiment or profile file."""


# ---------------------------------------------------------------------------------------- schemas
@dataclass
class Experiment:
    """Schema of `configs/experiments/<name>.yaml`."""

    description: str = ""  # one line: what the experiment measures
    config: dict[str, Any] = field(default_factory=dict)  # run-config overrides (data.*)
    # The count a variant is judged on (tested, never trained on; one of data.test_counts);
    # None: the overall count accuracy.
    headline_count: int | None = None
    # The paper's headline figure per model family ("AIR", "DAIR"), fractions; empty: none.
    paper: dict[str, float] = field(default_factory=dict)
    paper_source: str = ""  # where `paper` comes from (paper section, figure or table)

    def headline_column(self) -> str:
        """The runs-table column of the headline (bench.gather's final_count_accuracy[_k])."""
        k = self.headline_count
        return "final_count_accuracy" if k is None else f"final_count_accuracy_{k}"

    def dataset_name(self) -> str:
        """The experiment's `data.name` (the default data set when it sets none)."""
        return str((self.config.get("data") or {}).get("name", DEFAULT_DATASET))

    def headline_label(self) -> str:
        """The headline in words, for axes and tables ("count accuracy on 3-digit images")."""
        if (k := self.headline_count) is None:
            return "final count accuracy"
        return f"count accuracy on {k}-{get_dataset(self.dataset_name()).noun} images"


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
    # vectorised over the seeds); 1: one run per job; 0: as many seeds as the free GPU memory
    # holds (bench/gpu_plan.py). Results stay one folder per seed.
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
    if overrides:  # each word alone against the schema: errors name the word, in one line
        try:
            check_overrides(schema_cls, overrides, "command-line override", "profile.")
        except OverrideError as err:
            raise GridError(str(err)) from err
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
        msg = (err.msg or str(err)).splitlines()[0]  # the rest is OmegaConf's internals
        raise GridError(f"{source}: bad value for {err.full_key!r}: {msg}") from err


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
    experiment: Experiment = _load_typed(Experiment, path)
    _check_experiment(experiment, path)
    return experiment


def _check_experiment(experiment: Experiment, path: Path) -> None:
    """A registered data set, a tested headline count, and paper figures that are fractions."""
    try:
        get_dataset(experiment.dataset_name())
    except DatasetError as err:
        raise GridError(f"{path}: {err}") from err
    data = experiment.config.get("data") or {}
    tested = list(data.get("test_counts", RunConfig().data.test_counts))
    if (k := experiment.headline_count) is not None and k not in tested:
        raise GridError(f"{path}: headline_count {k} is not among the counts the experiment "
                        f"tests (config.data.test_counts: {tested})")  # fmt: skip
    bad = {name: v for name, v in experiment.paper.items() if not 0.0 <= v <= 1.0}
    if bad:
        raise GridError(f"{path}: paper figures must be fractions in [0, 1], got {bad}")


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
    if profile.group_size < 0:
        raise GridError(
            f"{path}: group_size must be >= 1 (seeds trained by one job) or 0 (auto: as many as "
            f"the free GPU memory holds), got {profile.group_size}"
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
