"""Variants are folders: discover, validate and load them.

`implementations/<name>/` is a variant whose id is the folder name. It holds a `variant.yaml`
(schema: `VariantFile` below) and, only when it needs new code, Python files that register an
estimator (`@register_estimator`) when imported. Folders whose names start with `_` or `.`
(templates, shared code) and `core/` (the shared model) are not variants.

A folder that fails any check (YAML, unknown key, bad value, import error, unknown estimator)
is reported as broken with the reason; the other variants are unaffected.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from bench.config import ConfigError, RunConfig, load_config
from implementations.core.estimators import ESTIMATORS

log = logging.getLogger(__name__)

IMPLEMENTATIONS = Path(__file__).resolve().parent.parent / "implementations"
NOT_VARIANTS = {"core"}


@dataclass
class Reference:
    """Published figures a variant reproduces (../shared/docs/REFERENCE.md), for the report."""

    source: str = ""  # where the figures come from
    rows: list[int] = field(default_factory=list)  # row numbers in REFERENCE.md
    count_accuracy: float | None = None  # final count accuracy of good runs, in [0, 1]
    count_accuracy_by_count: dict[int, float] = field(default_factory=dict)  # per true count
    elbo: float | None = None  # test ELBO, nats per image
    iw_bound: float | None = None  # importance-weighted bound, nats per image
    success_rate: float | None = None  # fraction of seeds that converge
    iterations_to_target: float | None = None  # iterations to ~98 % count accuracy
    interpolation_accuracy: float | None = None  # train 0,1,3 digits; accuracy on 2
    extrapolation_accuracy: float | None = None  # train 0-2 digits; accuracy on 3
    notes: str = ""


@dataclass
class Resources:
    """Scheduler resources for this variant's jobs; None: the profile's default."""

    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    timeout_min: int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    additional: dict[str, Any] = field(default_factory=dict)  # extra sbatch options


@dataclass
class VariantFile:
    """Schema of `variant.yaml`."""

    description: str = ""  # one line: what this variant changes (required)
    reference: Reference | None = None  # published figures it reproduces, if any
    config: dict[str, Any] = field(default_factory=dict)  # overrides of the run config schema
    resources: Resources = field(default_factory=Resources)
    test_config: dict[str, Any] = field(default_factory=dict)  # extra overrides for its tests


@dataclass
class Variant:
    name: str
    path: Path
    spec: VariantFile

    def config_layer(self) -> tuple[str, dict[str, Any]]:
        """The variant's config overrides, as a layer for `load_config`."""
        return (f"{self.path / 'variant.yaml'}: config", self.spec.config)

    def run_config(
        self, layers: list[Any] | None = None, overrides: list[str] | None = None
    ) -> RunConfig:
        """Defaults, then `layers` (experiment, profile), then this variant, then overrides."""
        return load_config([*(layers or []), self.config_layer()], overrides)


@dataclass
class Discovery:
    variants: dict[str, Variant]  # name -> variant, sorted by name
    broken: dict[str, str]  # name -> why it cannot be used


def discover(root: Path | str = IMPLEMENTATIONS) -> Discovery:
    """Every variant folder under `root`, validated; broken ones are listed with the reason."""
    root = Path(root)
    variants: dict[str, Variant] = {}
    broken: dict[str, str] = {}
    if not root.is_dir():
        raise FileNotFoundError(f"implementations folder {root} does not exist")
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        name = folder.name
        if name.startswith(("_", ".")) or name in NOT_VARIANTS:
            continue
        try:
            variants[name] = load_variant(folder)
        except Exception as err:  # any failure of one folder must not stop the others
            broken[name] = str(err) if isinstance(err, VariantError) else _describe(err)
            log.warning("variant %s is broken: %s", name, broken[name])
    return Discovery(variants=variants, broken=broken)


class VariantError(ValueError):
    """A variant folder that cannot be used, with the reason."""


def load_variant(folder: Path) -> Variant:
    """Read, import and validate one variant folder (raises VariantError)."""
    yaml_path = folder / "variant.yaml"
    if not yaml_path.is_file():
        raise VariantError(f"{yaml_path} is missing (every variant folder needs one)")
    spec = _read_variant_file(yaml_path)
    _import_code(folder)
    variant = Variant(name=folder.name, path=folder, spec=spec)
    try:
        cfg = variant.run_config()
    except ConfigError as err:
        raise VariantError(str(err)) from err
    est = cfg.estimator.name
    if est not in ESTIMATORS:
        guess = difflib.get_close_matches(est, list(ESTIMATORS), n=1)
        hint = f"; did you mean {guess[0]!r}?" if guess else ""
        raise VariantError(
            f"{yaml_path}: config.estimator.name {est!r} is not a registered estimator{hint} "
            f"(registered: {sorted(ESTIMATORS)}; a folder registers its own in a .py file)"
        )
    try:
        ESTIMATORS[est].parse_params(dict(cfg.estimator.params))
    except (TypeError, ValueError) as err:
        raise VariantError(f"{yaml_path}: config.{err}") from err
    return variant


def _read_variant_file(path: Path) -> VariantFile:
    schema = OmegaConf.structured(VariantFile)
    try:
        raw = OmegaConf.load(path)
    except Exception as err:
        raise VariantError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, DictConfig):
        raise VariantError(f"{path}: expected a mapping at the top level")
    try:
        spec: VariantFile = OmegaConf.to_object(OmegaConf.merge(schema, raw))  # type: ignore
    except ConfigKeyError as err:
        key = err.full_key or ""
        fields_ = ["description", "reference", "config", "resources", "test_config"]
        fields_ += [f"reference.{k}" for k in Reference.__dataclass_fields__]
        fields_ += [f"resources.{k}" for k in Resources.__dataclass_fields__]
        guess = difflib.get_close_matches(key, fields_, n=1)
        hint = f"; did you mean {guess[0]!r}?" if guess else ""
        raise VariantError(f"{path}: unknown key {key!r}{hint}") from err
    except OmegaConfBaseException as err:
        raise VariantError(f"{path}: bad value for {err.full_key!r}: {err.msg}") from err
    if not spec.description.strip():
        raise VariantError(f"{path}: 'description' is required (one line: what this variant is)")
    return spec


def _import_code(folder: Path) -> None:
    """Import the folder's Python files, so that they register their estimators."""
    for py in sorted(folder.glob("*.py")):
        module_name = f"air_variant_{folder.name}_{py.stem}"
        if module_name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(module_name, py)
        if spec is None or spec.loader is None:
            raise VariantError(f"{py}: cannot be imported")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            del sys.modules[module_name]
            raise VariantError(f"{py}: import failed: {_describe(err)}") from err


def _describe(err: BaseException) -> str:
    """Exception type, message and the innermost frame, short enough for a table."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(err).__name__}: {err}{where}"


def ensure_registered(estimator_name: str, root: Path | str = IMPLEMENTATIONS) -> None:
    """Import variant folders' code if `estimator_name` is not registered yet.

    A worker process (local pool or SLURM job) starts with only the built-in estimators; the
    one a variant brings is registered when its folder's code is imported.
    """
    if estimator_name not in ESTIMATORS:
        discover(root)
