"""Data sets as plugins, selected by the run config's `data.name`.

A data set is a subclass of :class:`Dataset` decorated with :func:`register_dataset`. Its module
goes in `bench/data/datasets/` (a module or a package folder): every module there is imported the
first time a name is looked up, so a new data set needs no edit anywhere else; an experiment YAML
(`configs/experiments/`) then selects it with `data.name`. Tests (or your own scripts) may also
register one from any module that is imported before the config is loaded.

What a data set declares:

- `name`: the value of `data.name` that selects it;
- `counts`: the object counts it can produce; `data.train_counts` and `data.test_counts` are
  checked against them when a config is loaded (the error names the field);
- `options`: its own settings with their defaults, set in a config as `data.params.<key>`
  (unknown keys and wrong types are config errors);
- `protocols`: the reference test protocols (`data.reference_protocols`) it can build;
- `noun`: what it counts, in words ("digit"), for report labels;
- `kind`: "images" (the only kind the trainer takes today: `images` (N, H, W)); "sequences"
  is reserved for moving-object data (`images` (N, T, H, W), `counts` (N, T)) and is refused by
  the image trainer with a clear error rather than trained on wrongly.

What it provides: `load(cfg, canvas, split)` -> an :class:`ObjectImages` (uint8 images and the
ground truth: counts, boxes, frame boxes, labels), a pure function of the config (the data seed
fixes it), and two checks for the launcher's up-front data check (bench/preflight.py):
`is_prepared` (already generated: nothing to read) and `check_available` (None when the sources
can be had, else the message that says what to do).
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from bench.config import DataConfig

__all__ = [
    "DEFAULT_DATASET",
    "SPLITS",
    "Dataset",
    "DatasetError",
    "ImageSet",
    "ObjectImages",
    "check_loaded",
    "dataset_names",
    "get_dataset",
    "register_dataset",
    "unregister_dataset",
]

#: `data.name` when a config does not set it; a config with this value hashes as before the field.
DEFAULT_DATASET = "multi_mnist"
#: The splits every data set serves: "train" for training, "test" for the held-out evaluation.
SPLITS = ("train", "test")
#: The package whose modules are imported to register the built-in data sets.
PLUGIN_PACKAGE = "bench.data.datasets"


class DatasetError(ValueError):
    """A bad data-set choice or setting, or a data set that broke its contract; says which."""


@runtime_checkable
class ObjectImages(Protocol):
    """What `Dataset.load` returns: images and their ground truth, one row per image.

    K is the widest count of the set (at least its largest count); slots past an image's count
    are padding: NaN boxes, label -1.
    """

    images: np.ndarray  # uint8 (N, H, W), 0 = background
    counts: np.ndarray  # int (N,): objects in each image
    boxes: np.ndarray  # float32 (N, K, 4): (x0, y0, x1, y1) tight box of each object's ink
    frame_boxes: np.ndarray  # float32 (N, K, 4): the square an attention window can match
    labels: np.ndarray  # int (N, K): the object's class, -1 where unknown or absent

    def __len__(self) -> int: ...


@dataclass(eq=False)
class ImageSet:
    """A ready-made :class:`ObjectImages` for data sets that have nothing else to keep."""

    images: np.ndarray
    counts: np.ndarray
    boxes: np.ndarray
    frame_boxes: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.images)


class Dataset:
    """Base class of a data-set plugin; override `load` and declare the class attributes."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "images"
    counts: ClassVar[tuple[int, ...]] = ()
    options: ClassVar[dict[str, Any]] = {}
    protocols: ClassVar[tuple[str, ...]] = ()
    noun: ClassVar[str] = "object"  # what it counts, in words ("digit"): report labels

    @property
    def max_count(self) -> int:
        """The most objects one image of this data set can hold."""
        return max(self.counts)

    def load(self, cfg: DataConfig, canvas: int, split: str) -> ObjectImages:
        """The `split` ("train" or "test") of this data set on `canvas` x `canvas` images."""
        raise NotImplementedError(f"data set {self.name!r} does not implement load()")

    def validate(self, cfg: DataConfig, canvas: int) -> None:
        """Config checks: counts it can produce, known options. Raises DatasetError."""
        for field in ("train_counts", "test_counts"):
            values = list(getattr(cfg, field))
            if not values:
                raise DatasetError(f"config field data.{field}: expected at least one count")
            bad = [c for c in values if c not in self.counts]
            if bad:
                raise DatasetError(
                    f"config field data.{field}: data set {self.name!r} produces counts "
                    f"{list(self.counts)}, got {values} ({bad} not among them)"
                )
            if len(set(values)) != len(values):
                raise DatasetError(f"config field data.{field}: counts repeat in {values}")
        self.params(cfg)

    def params(self, cfg: DataConfig) -> dict[str, Any]:
        """`options` with `data.params` on top, each checked against its default's type."""
        given = dict(cfg.params or {})
        for key, value in given.items():
            if key not in self.options:
                known = sorted(self.options)
                guess = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {guess[0]!r}?" if guess else ""
                raise DatasetError(
                    f"config field data.params.{key}: data set {self.name!r} has no option "
                    f"{key!r}{hint} (its options: {known})"
                )
            default = self.options[key]
            expected = (int, float) if isinstance(default, float) else type(default)
            if default is not None and (
                not isinstance(value, expected)
                or isinstance(value, bool) != isinstance(default, bool)
            ):
                raise DatasetError(
                    f"config field data.params.{key}: expected a {type(default).__name__} "
                    f"(default {default!r}), got {value!r}"
                )
        return {**self.options, **given}

    def is_prepared(self, cfg: DataConfig, canvas: int) -> bool:
        """Whether both splits are ready to load without reading any source (a cache)."""
        return False

    def check_available(self, cfg: DataConfig, canvas: int) -> str | None:
        """None when `load` can get its sources (it may fetch them here, once); else a message
        saying what is missing and what to do."""
        return None


_REGISTRY: dict[str, Dataset] = {}
_LOCK = threading.Lock()
_discovered = False
D = TypeVar("D", bound=type[Dataset])


def register_dataset(cls: D | None = None, *, replace: bool = False) -> Any:
    """Class decorator: register an instance of `cls` under `cls.name`.

    A second data set under a name already taken is an error, unless `replace`; registering the
    same class again (a module imported twice) is a no-op.
    """

    def register(klass: D) -> D:
        name = klass.name
        if not isinstance(name, str) or not name.isidentifier():
            raise DatasetError(f"data set class {klass.__qualname__}: name must be an identifier, "
                               f"got {name!r}")  # fmt: skip
        if not klass.counts or any(not isinstance(c, int) or c < 0 for c in klass.counts):
            raise DatasetError(f"data set {name!r}: counts must be non-negative ints, got "
                               f"{klass.counts!r}")  # fmt: skip
        with _LOCK:
            old = _REGISTRY.get(name)
            same = old is not None and _qualname(type(old)) == _qualname(klass)
            if old is not None and not same and not replace:
                raise DatasetError(f"data set {name!r} is registered twice: "
                                   f"{_qualname(type(old))} and {_qualname(klass)}")  # fmt: skip
            _REGISTRY[name] = klass()
        return klass

    return register if cls is None else register(cls)


def unregister_dataset(name: str) -> None:
    """Forget a registered data set (tests that register their own clean up with this)."""
    with _LOCK:
        _REGISTRY.pop(name, None)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _discover() -> None:
    """Import every module of `bench/data/datasets/` once: each registers its data set."""
    global _discovered
    if _discovered:
        return
    package = importlib.import_module(PLUGIN_PACKAGE)
    for info in pkgutil.iter_modules(package.__path__, f"{PLUGIN_PACKAGE}."):
        importlib.import_module(info.name)
    _discovered = True


def dataset_names() -> list[str]:
    """Every registered `data.name`, sorted."""
    _discover()
    return sorted(_REGISTRY)


def get_dataset(name: str) -> Dataset:
    """The data set registered as `name`; an unknown name lists the known ones."""
    _discover()
    found = _REGISTRY.get(name)
    if found is None:
        known = sorted(_REGISTRY)
        guess = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {guess[0]!r}?" if guess else ""
        raise DatasetError(
            f"config field data.name: unknown data set {name!r}{hint} (registered: {known})"
        )
    return found


def check_loaded(
    dataset: Dataset, data: ObjectImages, canvas: int, split: str, counts: list[int]
) -> ObjectImages:
    """`data` as `dataset.load` returned it, checked against the contract; DatasetError names
    the data set, the split and the array that is wrong."""
    where = f"data set {dataset.name!r} ({split} split)"
    missing = [a for a in ("images", "counts", "boxes", "frame_boxes", "labels")
               if not hasattr(data, a)]  # fmt: skip
    if missing:
        raise DatasetError(f"{where}: load() returned an object without {missing}")
    images, n = np.asarray(data.images), len(data.images)
    if images.dtype != np.uint8 or images.shape != (n, canvas, canvas) or n == 0:
        raise DatasetError(f"{where}: images must be uint8 (N > 0, {canvas}, {canvas}), got "
                           f"{images.dtype} {images.shape}")  # fmt: skip
    truth: list[tuple[str, Callable[[tuple[int, ...]], bool], str]] = [
        ("counts", lambda s: s == (n,), f"({n},)"),
        ("boxes", lambda s: len(s) == 3 and s[0] == n and s[2] == 4, f"({n}, K, 4)"),
        ("frame_boxes", lambda s: len(s) == 3 and s[0] == n and s[2] == 4, f"({n}, K, 4)"),
        ("labels", lambda s: len(s) == 2 and s[0] == n, f"({n}, K)"),
    ]
    for attr, ok, expected in truth:
        shape = tuple(np.shape(getattr(data, attr)))
        if not ok(shape):
            raise DatasetError(f"{where}: {attr} must have shape {expected}, got {shape}")
    found = set(np.unique(np.asarray(data.counts)).tolist())
    if not found <= set(counts) or np.shape(data.boxes)[1] < max(found):
        raise DatasetError(f"{where}: holds counts {sorted(found)} (boxes {np.shape(data.boxes)}),"
                           f" but the config asks for {sorted(counts)}")  # fmt: skip
    return data
