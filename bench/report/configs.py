"""Configs behind the results: resolved run configs, differences from the recorded defaults.

`variant_infos` says what the report knows about each variant (description, published
reference, AIR or DAIR, its config difference); `row_configs` lays out the configs of one
experiment's verdict rows (one per variant and config hash) as differences from the recorded
schema defaults (bench.grid_record `defaults`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from bench.run_folder import CONFIG

log = logging.getLogger(__name__)

IGNORED_CONFIG_KEYS = ("seed", "out_dir", "train.progress")  # differ per run by design
# Also left out of the config hash (bench.config.config_hash): they change no number.
HASH_IGNORED_KEYS = (*IGNORED_CONFIG_KEYS, "data.data_dir", "data.cache_dir")


# ---------------------------------------------------------------------------------- variants
@dataclass
class VariantInfo:
    """What the report knows about a variant beyond its results."""

    name: str
    description: str = ""
    reference: Any = None  # bench.reference.Reference, or None when unknown
    reference_origin: str = ""  # "grid record <id>" (recorded with the results) or the folder
    folder: bool = False  # a grid record describes it (its folder loaded at launch)
    broken: str | None = None  # why it could not run, as a grid record says
    dair: bool | None = None  # model.dair of its config (None: unknown)
    config_known: bool = False  # a config was found (folder or run); else config_diff is empty
    config_diff: list[tuple[str, Any, Any]] = field(default_factory=list)  # (key, base, ours)


class _Absent:
    """A key one side of a config difference does not have (unlike an explicit null)."""

    def __repr__(self) -> str:
        return "(not set)"

    __str__ = __repr__


ABSENT = _Absent()


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> {"a.b.c": value}; lists stay values, empty mappings vanish."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` deep-merged onto `base`: a key a config file leaves out has its default value."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def config_diff(config: Mapping[str, Any], base: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, base value, this value) for every key that differs, seed and out_dir excluded."""
    ours, theirs = flatten(merged(base, config)), flatten(base)
    keys = sorted(set(ours) | set(theirs))
    return [
        (k, theirs.get(k, ABSENT), ours.get(k, ABSENT))
        for k in keys
        if k not in IGNORED_CONFIG_KEYS and ours.get(k, ABSENT) != theirs.get(k, ABSENT)
    ]


def base_config(defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The defaults config differences are measured against: the schema defaults a grid record
    kept at launch (bench.grid_record `defaults`), never today's code; {} when none is known."""
    return dict(defaults or {})


def recorded_defaults(records: Sequence[Any]) -> dict[str, Any] | None:
    """The schema defaults of the newest grid record that kept them (records oldest first)."""
    for record in reversed(list(records)):
        if getattr(record, "defaults", None):
            return dict(record.defaults)
    return None


def read_run_config(run_dir: Any) -> dict[str, Any] | None:
    """The resolved config.yaml of a run folder as a dict, or None when unreadable."""
    if not isinstance(run_dir, str | Path) or not str(run_dir):
        return None
    path = Path(run_dir) / CONFIG
    try:
        from omegaconf import OmegaConf

        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception:  # a missing or damaged file only loses the config column
        return None
    return loaded if isinstance(loaded, dict) else None


def variant_infos(
    names: Iterable[str],
    runs: pd.DataFrame,
    defaults: Mapping[str, Any] | None = None,
    recorded: Iterable[str] = (),
) -> dict[str, VariantInfo]:
    """DAIR flags and config differences of the named variants, from files on disk only.

    A variant's config is read from one of its runs (config.yaml); its difference is against
    the recorded schema `defaults` (none known: no difference shown). Descriptions and published
    references come from the grid records (bench.report.fidelity.apply_recorded); `recorded`
    names the variants a grid record describes (`folder` True: known to the harness). No
    variant code is imported or run.
    """
    base = base_config(defaults)
    recorded = set(recorded)
    infos: dict[str, VariantInfo] = {}
    for name in sorted(set(names) | recorded):
        info = VariantInfo(name=name, folder=name in recorded)
        cfg: dict[str, Any] | None = None
        for run_dir in runs.loc[runs["variant"] == name, "run_dir"]:
            if (cfg := read_run_config(run_dir)) is not None:
                break
        if cfg is not None:
            info.config_known = True
            info.config_diff = config_diff(cfg, base) if defaults else []
            info.dair = bool(flatten(merged(base, cfg)).get("model.dair", False))
        elif name.lower().startswith("dair"):
            info.dair = True  # no config anywhere: the naming convention is all there is
        infos[name] = info
    return infos


def row_configs(rows: Sequence[Any], defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The configs of one experiment's rows (bench.report.rows.Row), as differences from the
    recorded schema defaults: what every row shares once, then what each row changes on top.
    Without recorded defaults (grids asked before they were kept) no difference is shown."""
    base = base_config(defaults)
    diffs: dict[str, dict[str, tuple[Any, Any]]] = {}
    for row in rows:
        if row.raw_config is not None and defaults:
            diffs[row.key] = {k: (b, o) for k, b, o in config_diff(row.raw_config, base)}
    common: dict[str, tuple[Any, Any]] = {}
    if len(diffs) > 1:
        first, *rest = diffs.values()
        common = {k: v for k, v in first.items() if all(d.get(k) == v for d in rest)}
    out = []
    for row in rows:
        d = diffs.get(row.key)
        out.append({
            "key": row.key,
            "variant": row.variant,
            "config_hash": row.config_hash,
            "known": d is not None or (row.raw_config is not None and not defaults),
            "source": row.config_source,
            "diff": [(k, b, o) for k, (b, o) in sorted(d.items()) if k not in common]
            if d is not None else [],
        })  # fmt: skip
    return {"common": [(k, b, o) for k, (b, o) in sorted(common.items())], "rows": out,
            "no_defaults": not defaults}  # fmt: skip
