"""The grids that were asked for, kept beside the results so that the report can judge them.

Every `run_all.py` grid launch (not `--dry-run`, not `--report-only`) writes one small JSON file,

    <results>/.grids/<grid_id>.json

before it trains or submits anything: which experiments, variants, seeds, profile and overrides
were asked for, and every run of that grid as (experiment, variant, config hash, seed) with its
training budget. The grid id is a hash of that run list (and of the broken variants), so asking
for the same grid again rewrites the same file (its `last_asked_at` moves; `first_asked_at`
stays) while a different grid gets a file of its own. The report reads the latest one
(`latest_record`) and counts that grid's runs as complete, failed, running or missing; run
folders outside it are shown as such. Files are written atomically (bench.storage).

The folder starts with a dot, so `bench.gather` never mistakes it for an experiment.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import shlex
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.storage import atomic_write_json

log = logging.getLogger(__name__)

FOLDER = ".grids"
VERSION = 1
# Resolved-config keys left out of the record: they differ per run (seed, out_dir) or change no
# number (progress bars, where MNIST and the data cache live); see bench.config.config_hash.
_DROPPED = ("seed", "out_dir")
_DROPPED_NESTED = {"train": ("progress",), "data": ("data_dir", "cache_dir")}


class GridRecordError(ValueError):
    """A grid record file that cannot be read: names the file and the field at fault."""


@dataclass(frozen=True)
class AskedRun:
    """One run of an asked grid."""

    experiment: str
    variant: str
    config_hash: str
    seed: int
    iterations: int | None = None  # train.iterations of its config (the budget)

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.experiment, self.variant, self.config_hash, self.seed)


@dataclass
class GridRecord:
    """A grid as it was asked for (see the module docstring)."""

    grid_id: str
    command: str  # an equivalent run_all.py command line (resolved names, no paths)
    profile: str
    cluster: str
    experiments: list[str]
    variants: list[str]  # every variant asked for, broken ones included
    seeds: list[int]
    overrides: list[str]  # key=value words as given (run-config and profile.* overrides)
    runs: list[AskedRun]
    broken: dict[str, str] = field(default_factory=dict)  # variant -> why it could not run
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # config_key() -> config
    # variant -> {"description", "reference": its `reference:` as a dict or None}, as its folder
    # said when the grid was asked: the report reads published figures from here, not from
    # implementations/ (records written before this field have none)
    variants_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    # the run-config schema defaults at launch (the report's config differences are against
    # these, never against today's code; records written before this field have none)
    defaults: dict[str, Any] | None = None
    first_asked_at: float = 0.0
    last_asked_at: float = 0.0
    path: Path | None = None  # the file it was read from (not stored)

    def config(self, experiment: str, variant: str, config_hash: str) -> dict[str, Any] | None:
        """The resolved config of that (experiment, variant, hash), without seed and out_dir."""
        return self.configs.get(config_key(experiment, variant, config_hash))

    @property
    def asked_at(self) -> str:
        """When it was last asked for, as UTC text."""
        return utc(self.last_asked_at)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "grid_id": self.grid_id,
            "command": self.command,
            "profile": self.profile,
            "cluster": self.cluster,
            "experiments": list(self.experiments),
            "variants": list(self.variants),
            "seeds": list(self.seeds),
            "overrides": list(self.overrides),
            "broken": dict(self.broken),
            "runs": [
                {
                    "experiment": r.experiment,
                    "variant": r.variant,
                    "config_hash": r.config_hash,
                    "seed": r.seed,
                    "iterations": r.iterations,
                }
                for r in self.runs
            ],  # fmt: skip
            "configs": self.configs,
            "variants_info": self.variants_info,
            "defaults": self.defaults,
            "first_asked_at": self.first_asked_at,
            "last_asked_at": self.last_asked_at,
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "grid record") -> GridRecord:
        """Parse and check a stored record; GridRecordError names `source` and the field."""
        if not isinstance(data, dict):
            raise GridRecordError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if data.get("version") != VERSION:
            raise GridRecordError(
                f"{source}: field 'version': expected {VERSION}, got {data.get('version')!r}"
            )
        get = _Getter(data, source)
        runs = []
        for i, item in enumerate(get.typed("runs", list)):
            run = _Getter(item, source, f"runs[{i}]")
            iterations = run.data.get("iterations")
            if iterations is not None and (
                not isinstance(iterations, int) or isinstance(iterations, bool)
            ):
                raise GridRecordError(
                    f"{source}: field 'runs[{i}].iterations': expected an integer or null, "
                    f"got {iterations!r}"
                )
            runs.append(
                AskedRun(run.text("experiment"), run.text("variant"), run.text("config_hash"),
                         run.integer("seed"), iterations)
            )  # fmt: skip
        broken = get.typed("broken", dict)
        configs = get.typed("configs", dict)
        info = data.get("variants_info", {})  # optional: older records have none
        if not isinstance(info, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("reference"), dict | None)
            for v in info.values()
        ):
            raise get._fail("variants_info", "an object of {description, reference} objects")
        if not isinstance(defaults := data.get("defaults"), dict | None):  # optional too
            raise get._fail("defaults", "an object (the schema defaults) or null")
        return cls(
            grid_id=get.text("grid_id"),
            command=get.text("command"),
            profile=get.text("profile"),
            cluster=get.text("cluster"),
            experiments=get.texts("experiments"),
            variants=get.texts("variants"),
            seeds=get.integers("seeds"),
            overrides=get.texts("overrides"),
            runs=runs,
            broken={str(k): str(v) for k, v in broken.items()},
            configs={str(k): v for k, v in configs.items() if isinstance(v, dict)},
            variants_info={str(k): v for k, v in info.items()},
            defaults=defaults,
            first_asked_at=get.number("first_asked_at"),
            last_asked_at=get.number("last_asked_at"),
        )


class _Getter:
    """Typed access to one JSON object, with errors that name the file and the field."""

    def __init__(self, data: Any, source: str, prefix: str = "") -> None:
        if not isinstance(data, dict):
            where = f"field {prefix!r}" if prefix else "the top level"
            raise GridRecordError(f"{source}: {where}: expected an object, got {data!r}")
        self.data, self.source, self.prefix = data, source, prefix

    def _fail(self, key: str, expected: str) -> GridRecordError:
        name = f"{self.prefix}.{key}" if self.prefix else key
        got = repr(self.data[key]) if key in self.data else "nothing (missing)"
        return GridRecordError(f"{self.source}: field {name!r}: expected {expected}, got {got}")

    def typed(self, key: str, kind: type) -> Any:
        if not isinstance(self.data.get(key), kind):
            raise self._fail(key, f"a JSON {'array' if kind is list else 'object'}")
        return self.data[key]

    def text(self, key: str) -> str:
        if not isinstance(self.data.get(key), str):
            raise self._fail(key, "a string")
        return self.data[key]

    def integer(self, key: str) -> int:
        value = self.data.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._fail(key, "an integer")
        return value

    def number(self, key: str) -> float:
        value = self.data.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self._fail(key, "a number")
        return float(value)

    def texts(self, key: str) -> list[str]:
        value = self.data.get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._fail(key, "an array of strings")
        return list(value)

    def integers(self, key: str) -> list[int]:
        value = self.data.get(key)
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise self._fail(key, "an array of integers")
        return list(value)


# ---------------------------------------------------------------------------------- helpers
def config_key(experiment: str, variant: str, config_hash: str) -> str:
    return f"{experiment}/{variant}/{config_hash}"


def utc(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def grid_id(runs: Iterable[AskedRun], broken: Iterable[str] = ()) -> str:
    """The same runs (and broken variants) give the same id, whatever order they come in."""
    blob = json.dumps({"runs": sorted(r.key for r in runs), "broken": sorted(broken)})
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def seed_ranges(seeds: Iterable[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8" (the --seeds syntax)."""
    values = sorted(set(int(s) for s in seeds))
    parts: list[str] = []
    start = prev = None
    for s in [*values, None]:
        if start is not None and (s is None or s != prev + 1):
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if s is not None and start is None:
            start = s
        prev = s
    return ",".join(parts)


def _stored_config(config: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in config.items() if k not in _DROPPED}
    for section, keys in _DROPPED_NESTED.items():
        if isinstance(out.get(section), Mapping):
            out[section] = {k: v for k, v in out[section].items() if k not in keys}
    return out


def equivalent_command(
    profile: str, cluster: str, experiments: Sequence[str], variants: Sequence[str],
    seeds: Sequence[int], overrides: Sequence[str],
) -> str:  # fmt: skip
    """A run_all.py command line that asks for this grid (names resolved, paths left out)."""
    words = ["python", "run_all.py", "--profile", profile]
    if cluster != "local":
        words += ["--cluster", cluster]
    words += ["--experiments", ",".join(experiments), "--variants", ",".join(variants)]
    words += ["--seeds", seed_ranges(seeds), *overrides]
    return shlex.join(words)


# ---------------------------------------------------------------------------------- writing
def make_record(
    runs: Sequence[Any],
    *,
    profile: str,
    cluster: str,
    experiments: Sequence[str],
    seeds: Sequence[int],
    overrides: Sequence[str],
    broken: Mapping[str, str] | None = None,
    variants_info: Mapping[str, dict[str, Any]] | None = None,
) -> GridRecord:
    """A record from the launcher's resolved runs (bench.grid.RunSpec: experiment, variant,
    seed, config_hash, cfg) and what the variant folders say (`variant_records`)."""
    from bench.config import load_config, to_dict

    broken = dict(broken or {})
    asked, configs = [], {}
    for r in runs:
        asked.append(AskedRun(r.experiment, r.variant, r.config_hash, int(r.seed),
                              int(r.cfg.train.iterations)))  # fmt: skip
        key = config_key(r.experiment, r.variant, r.config_hash)
        if key not in configs:
            configs[key] = _stored_config(to_dict(r.cfg))
    variants = list(dict.fromkeys([*(r.variant for r in asked), *broken]))
    now = time.time()
    return GridRecord(
        grid_id=grid_id(asked, broken),
        command=equivalent_command(profile, cluster, experiments, variants, seeds, overrides),
        profile=profile,
        cluster=cluster,
        experiments=list(experiments),
        variants=variants,
        seeds=sorted(set(int(s) for s in seeds)),
        overrides=list(overrides),
        runs=asked,
        broken=broken,
        configs=configs,
        variants_info=dict(variants_info or {}),
        defaults=_stored_config(to_dict(load_config())),
        first_asked_at=now,
        last_asked_at=now,
    )


def write_record(results: str | Path, record: GridRecord) -> Path:
    """Write `record` atomically as <results>/.grids/<grid_id>.json, keeping the first time a
    grid with the same id was asked for."""
    path = Path(results) / FOLDER / f"{record.grid_id}.json"
    try:
        previous = GridRecord.from_dict(json.loads(path.read_text()), str(path))
        record.first_asked_at = min(previous.first_asked_at, record.first_asked_at)
    except (OSError, ValueError):  # none yet, or unreadable: this one replaces it
        pass
    atomic_write_json(path, record.to_dict())
    record.path = path
    return path


def record_grid(
    results: str | Path,
    args: argparse.Namespace,
    profile: Any,
    runs: Sequence[Any],
    broken: Mapping[str, str],
) -> Path | None:
    """The launcher's hook: record the grid of this `run_all.py` command before it runs.

    Nothing is written for `--dry-run`. A record that cannot be written is a warning, not a
    failed launch (the report then says it has no record of this grid).
    """
    if getattr(args, "dry_run", False):
        return None
    from bench.grid import EXPERIMENTS_DIR, available, parse_names, parse_seeds

    try:
        experiments = parse_names(
            args.experiments or profile.experiments, available(EXPERIMENTS_DIR), "experiment"
        )
        record = make_record(
            runs,
            profile=str(args.profile),
            cluster=str(args.cluster),
            experiments=experiments,
            seeds=parse_seeds(args.seeds or profile.seeds),
            overrides=[str(w) for w in args.overrides],
            broken=broken,
            variants_info=variant_records({r.variant for r in runs}),
        )
        return write_record(results, record)
    except (OSError, ValueError) as err:
        log.warning("could not record the asked grid under %s: %s", Path(results) / FOLDER, err)
        return None


def variant_records(names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Description and published reference (as a plain dict) of each named variant, from its
    folder now (bench.variants.discover); a variant that cannot be loaded is left out."""
    from bench.variants import discover

    found = discover().variants
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(set(names)):
        if name in found:
            spec = found[name].spec
            ref = dataclasses.asdict(spec.reference) if spec.reference is not None else None
            out[name] = {"description": spec.description, "reference": ref}
    return out


# ---------------------------------------------------------------------------------- reading
def read_records(results: str | Path) -> tuple[list[GridRecord], list[str]]:
    """Every readable record under `results`, oldest first, and one problem per unreadable
    file (never raised: the report must work on any results folder)."""
    folder = Path(results) / FOLDER
    records, problems = [], []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = GridRecord.from_dict(json.loads(path.read_text()), str(path))
        except OSError as err:
            problems.append(f"{path}: cannot be read ({err})")
            continue
        except json.JSONDecodeError as err:
            problems.append(f"{path}: not valid JSON ({err})")
            continue
        except GridRecordError as err:
            problems.append(str(err))
            continue
        record.path = path
        records.append(record)
    records.sort(key=lambda r: (r.last_asked_at, r.grid_id))
    return records, problems


def latest_record(results: str | Path) -> tuple[GridRecord | None, int, list[str]]:
    """(the grid asked for last or None, how many grids are recorded, problems)."""
    records, problems = read_records(results)
    return (records[-1] if records else None), len(records), problems
