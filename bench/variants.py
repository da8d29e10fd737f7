"""Variants are folders: discover, validate and load them.

`implementations/<name>/` is a variant whose id is the folder name. It holds a `variant.yaml`
(schema: `VariantFile` below) and, only when it needs new code, Python files that register an
estimator (`@register_estimator`) when imported. Folders whose names start with `_` or `.`
(templates, shared code) and `core/` (the shared model) are not variants.

A folder that fails any check (YAML, unknown key, bad value, import error, unknown estimator)
is reported as broken with the reason; the other variants are unaffected.

Estimator names are scoped. The core's estimators (`nvil`, `reparam`: registered by
`implementations/core/`) are global: any variant names them bare. An estimator registered by a
folder's code belongs to that folder: its own `variant.yaml` names it bare (`reinforce_ema`),
and the resolved run config records it qualified (`my_idea:reinforce_ema`), so that workers,
config hashes and result folders say whose code trains the run. Another folder can use it only
by naming it qualified itself (`my_idea:reinforce_ema` in its `variant.yaml`): a variant never
borrows a bare name from a neighbour, and two copies of the template each train with their own.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
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
from bench.reference import Reference  # noqa: F401  (defined there: the report reads it)
from implementations.core.estimators import ESTIMATORS, Estimator

log = logging.getLogger(__name__)

IMPLEMENTATIONS = Path(__file__).resolve().parent.parent / "implementations"
NOT_VARIANTS = {"core"}


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
        """The variant's config overrides, as a layer for `load_config`; an estimator this
        folder registers is named qualified (`<folder>:<name>`), as `resolve_estimator` says."""
        config = copy.deepcopy(self.spec.config)
        estimator = config.get("estimator")
        if isinstance(estimator, dict) and isinstance(estimator.get("name"), str):
            estimator["name"] = resolve_estimator(estimator["name"], self.name, self.path.parent)
        return (f"{self.path / 'variant.yaml'}: config", config)

    def run_config(
        self, layers: list[Any] | None = None, overrides: list[str] | None = None
    ) -> RunConfig:
        """Defaults, then `layers` (experiment, profile), then this variant, then overrides.

        The estimator name is resolved for this folder whichever layer set it (an override
        `estimator.name=reinforce_ema` means this folder's own, too); ConfigError if it cannot
        be resolved.
        """
        cfg = load_config([*(layers or []), self.config_layer()], overrides)
        try:
            cfg.estimator.name = resolve_estimator(cfg.estimator.name, self.name, self.path.parent)
        except VariantError as err:
            raise ConfigError(f"{self.path / 'variant.yaml'}: {err}") from err
        return cfg


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
    import_folder(folder)
    variant = Variant(name=folder.name, path=folder, spec=spec)
    try:
        cfg = variant.run_config()
    except VariantError as err:
        raise VariantError(f"{yaml_path}: config.{err}") from err
    except ConfigError as err:
        raise VariantError(str(err)) from err
    try:
        ESTIMATORS[cfg.estimator.name].parse_params(dict(cfg.estimator.params))
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
    if spec.reference is not None:
        _check_reference(path, spec.reference)
    return spec


def _check_reference(path: Path, ref: Reference) -> None:
    from bench.data.protocols import PROTOCOLS  # the test protocols a published row can use

    def fail(field_: str, expected: str, got: Any) -> VariantError:
        return VariantError(f"{path}: reference.{field_} must be {expected}, got {got!r}")

    if ref.protocol not in PROTOCOLS:
        raise fail("protocol", f"one of {', '.join(PROTOCOLS)}", ref.protocol)
    if ref.count_definition not in ("sampled", "mode"):
        raise fail("count_definition", "'sampled' or 'mode'", ref.count_definition)
    if ref.budget_iterations is not None and ref.budget_iterations < 1:
        raise fail("budget_iterations", "a positive number of iterations", ref.budget_iterations)
    if ref.likelihood not in ("", "gaussian", "bernoulli"):
        raise fail("likelihood", "'gaussian', 'bernoulli' or empty", ref.likelihood)
    bounds = [k for k in ("elbo", "iw_bound", "lme_elbo_bound") if getattr(ref, k) is not None]
    if bounds and not ref.likelihood:  # nats on different scales never compare
        raise fail("likelihood", f"set with reference.{bounds[0]} (the scale of its nats)", "")
    if ref.likelihood == "gaussian" and not (ref.likelihood_sd or 0) > 0:
        raise fail("likelihood_sd", "a positive number with a gaussian likelihood",
                   ref.likelihood_sd)  # fmt: skip
    for name in ("count_accuracy", "success_rate", "interpolation_accuracy",
                 "extrapolation_accuracy"):  # fmt: skip
        if (value := getattr(ref, name)) is not None and not 0 <= value <= 1:
            raise fail(name, "in [0, 1]", value)
    if any(not text.strip() for text in ref.differences):
        raise fail("differences", "a list of non-empty lines", ref.differences)


# What each folder's code registered: by module, and by folder (bare name -> class). A
# folder's estimators are kept out of the global registry under their bare names and entered
# there as `<folder>:<name>` instead.
_MODULE_ESTIMATORS: dict[str, dict[str, type[Estimator]]] = {}
_FOLDER_ESTIMATORS: dict[str, dict[str, type[Estimator]]] = {}


def import_folder(folder: Path) -> dict[str, type[Estimator]]:
    """Import the folder's Python files; the estimators they register become its own.

    Returns them by bare name; each is also registered (in `ESTIMATORS`) as `<folder>:<name>`.
    Importing again is cheap (modules are cached) and reflects the files present now.
    """
    name = folder.name
    own: dict[str, type[Estimator]] = {}
    for py in sorted(folder.glob("*.py")):
        for bare, cls in _import_module(py, _module_name(folder, py)).items():
            if bare in own and own[bare] is not cls:
                raise VariantError(
                    f"{py}: estimator {bare!r} is registered twice in folder {name} "
                    f"({own[bare].__module__} and {cls.__module__})"
                )
            own[bare] = cls
    for key in [k for k in ESTIMATORS if k.startswith(f"{name}:")]:
        del ESTIMATORS[key]  # a file removed since the last import takes its estimators along
    for bare, cls in own.items():
        cls.name = qualified(name, bare)
        ESTIMATORS[cls.name] = cls
    _FOLDER_ESTIMATORS[name] = own
    return own


def _module_name(folder: Path, py: Path) -> str:
    """`air_variant_<folder>_<file>`; a folder outside `implementations/` (tests) gets a
    suffix from its path, so that two roots' folders of one name are separate modules."""
    base = f"air_variant_{folder.name}_{py.stem}"
    if folder.resolve().parent == IMPLEMENTATIONS:
        return base
    return f"{base}_{hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:8]}"


def _import_module(py: Path, module_name: str) -> dict[str, type[Estimator]]:
    """Import one file (once per process); the estimators it registered, by bare name."""
    if module_name in sys.modules:
        return _MODULE_ESTIMATORS.get(module_name, {})
    spec = importlib.util.spec_from_file_location(module_name, py)
    if spec is None or spec.loader is None:
        raise VariantError(f"{py}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    before = set(ESTIMATORS)
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[module_name]
        _take_registrations(before, module_name)
        raise VariantError(f"{py}: import failed: {_describe(err)}") from err
    registered = _take_registrations(before, module_name)
    bad = [bare for bare in registered if ":" in bare]
    if bad:
        del sys.modules[module_name]
        raise VariantError(f"{py}: estimator names must not contain ':' (got {bad})")
    _MODULE_ESTIMATORS[module_name] = registered
    return registered


def _take_registrations(before: set[str], module_name: str) -> dict[str, type[Estimator]]:
    """Remove from the global registry what `module_name` registered since `before`."""
    return {
        key: ESTIMATORS.pop(key)
        for key in sorted(set(ESTIMATORS) - before)
        if ESTIMATORS[key].__module__ == module_name
    }


def qualified(folder: str, estimator: str) -> str:
    """The registry name of an estimator that a variant folder registers."""
    return f"{folder}:{estimator}"


def resolve_estimator(name: str, folder: str, root: Path | str = IMPLEMENTATIONS) -> str:
    """The registry name that `name`, written in folder `folder`'s config, refers to.

    A core estimator's bare name stays as it is; a bare name the folder's own code registers
    becomes `<folder>:<name>`; `<other>:<name>` is another folder's estimator, named explicitly
    (its code is imported from `root`). Anything else raises VariantError saying which folders
    register that name, so a variant never borrows a neighbour's estimator by accident.
    """
    if ":" in name:
        other, _, bare = name.partition(":")
        if other == folder:
            own = _FOLDER_ESTIMATORS.get(folder, {})
        else:
            own = _import_other(Path(root) / other, name)
        if bare not in own:
            raise VariantError(
                f"estimator.name {name!r}: folder {other!r} registers no estimator {bare!r} "
                f"(it registers: {sorted(own) or 'none'})"
            )
        return qualified(other, bare)
    if name in ESTIMATORS:  # bare names in the registry are the core's (global)
        return name
    if name in _FOLDER_ESTIMATORS.get(folder, {}):
        return qualified(folder, name)
    owners = sorted(f for f, own in _FOLDER_ESTIMATORS.items() if name in own and f != folder)
    core = sorted(k for k in ESTIMATORS if ":" not in k)
    if owners:
        uses = " or ".join(repr(qualified(f, name)) for f in owners)
        hint = (
            f"; folder {', '.join(owners)} registers one: write {uses} to use it, or register "
            f"your own in a .py file of {folder}/"
        )
    else:
        guess = difflib.get_close_matches(name, core, n=1)
        hint = f"; did you mean {guess[0]!r}?" if guess else ""
    raise VariantError(
        f"estimator.name {name!r} is not a registered estimator{hint} (the core's: {core}; "
        f"{folder}/ registers: {sorted(_FOLDER_ESTIMATORS.get(folder, {})) or 'none'}; "
        f"another folder's: '<folder>:<name>')"
    )


def _import_other(folder: Path, name: str) -> dict[str, type[Estimator]]:
    if folder.name in NOT_VARIANTS:
        raise VariantError(f"estimator.name {name!r}: the core's estimators are named bare")
    if not folder.is_dir():
        raise VariantError(f"estimator.name {name!r}: there is no folder {folder}")
    try:
        return import_folder(folder)
    except VariantError as err:
        raise VariantError(f"estimator.name {name!r}: {err}") from err


def _describe(err: BaseException) -> str:
    """Exception type, message and the innermost frame, short enough for a table."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(err).__name__}: {err}{where}"


def ensure_registered(estimator_name: str, root: Path | str = IMPLEMENTATIONS) -> None:
    """Import the code of the folder that registers `estimator_name`, if not done yet.

    A worker process (local pool or SLURM job) starts with only the core's estimators; a
    variant's own is named `<folder>:<name>` in its run config and registered once that
    folder's code is imported. For a bare name that is not the core's, every folder's code is
    imported, so that `build_estimator`'s error can suggest `<folder>:<name>`.
    """
    if estimator_name in ESTIMATORS:
        return
    root = Path(root)
    if ":" in estimator_name:
        folder = root / estimator_name.partition(":")[0]
        if folder.is_dir() and folder.name not in NOT_VARIANTS:
            import_folder(folder)
        return
    if not root.is_dir():
        return
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in NOT_VARIANTS):
        with contextlib.suppress(VariantError):  # only for the hint; the error comes later
            import_folder(folder)
