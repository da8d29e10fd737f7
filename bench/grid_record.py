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

The folder starts with a dot, so `bench.gather` never mistakes it for an experiment. The
record's fields and their checked parsing: bench/grid_record_format.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import shlex
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.grid_record_format import (
    VERSION,
    AskedRun,
    GridRecord,
    GridRecordError,
    config_key,
    utc,
)
from bench.storage import atomic_write_json

# The record's format lives in bench/grid_record_format.py; its names are re-exported here.
__all__ = [
    "FOLDER", "VERSION", "AskedRun", "GridRecord", "GridRecordError", "config_key",
    "equivalent_command", "grid_id", "latest_record", "make_record", "read_records",
    "record_grid", "seed_ranges", "utc", "variant_records", "write_record",
]  # fmt: skip

log = logging.getLogger(__name__)

FOLDER = ".grids"
# Resolved-config keys left out of the record: they differ per run (seed, out_dir) or change no
# number (progress bars, where MNIST and the data cache live); see bench.config.config_hash.
_DROPPED = ("seed", "out_dir")
_DROPPED_NESTED = {"train": ("progress",), "data": ("data_dir", "cache_dir")}


# ---------------------------------------------------------------------------------- helpers
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
    experiments_info: Mapping[str, dict[str, Any]] | None = None,
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
        experiments_info=dict(experiments_info or {}),
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
            experiments_info=experiment_records(experiments),
        )
        return write_record(results, record)
    except (OSError, ValueError) as err:
        log.warning("could not record the asked grid under %s: %s", Path(results) / FOLDER, err)
        return None


def experiment_records(names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """What the report needs of each named experiment, from its YAML now: its headline count
    (None: overall accuracy), the headline in words, the paper's figure per model family and
    where that figure comes from."""
    from bench.grid import load_experiment

    out: dict[str, dict[str, Any]] = {}
    for name in names:
        exp = load_experiment(name)
        out[name] = {
            "description": exp.description,
            "headline_count": exp.headline_count,
            "headline_label": exp.headline_label(),
            "paper": {str(k): float(v) for k, v in exp.paper.items()},
            "paper_source": exp.paper_source,
        }
    return out


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
