"""The grid record's format: what `<results>/.grids/<grid_id>.json` holds, and its checked
parsing (`GridRecord.from_dict`: errors name the file and the field). Writing and reading the
files: bench/grid_record.py, which re-exports these names.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VERSION = 1


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
    # experiment -> {"description", "headline_count", "headline_label", "paper", "paper_source"}
    # as its YAML said when the grid was asked: the report's headline column and the paper's
    # figure come from here (records written before this field have none)
    experiments_info: dict[str, dict[str, Any]] = field(default_factory=dict)
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
            "experiments_info": self.experiments_info,
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
        experiments_info = data.get("experiments_info", {})  # optional: older records have none
        if not isinstance(experiments_info, dict) or not all(
            isinstance(v, dict)
            and isinstance(v.get("headline_count"), int | None)
            and not isinstance(v.get("headline_count"), bool)
            and isinstance(v.get("paper", {}), dict)
            for v in experiments_info.values()
        ):
            expected = "an object of {headline_count: int or null, paper: {...}} objects"
            raise get._fail("experiments_info", expected)
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
            experiments_info={str(k): v for k, v in experiments_info.items()},
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
