"""Checks the launcher makes once, before any job starts.

`check_data`: every run to train needs its multi-MNIST training and test sets, generated from
the MNIST files unless the generated sets are already cached. Without this check each job would
try the download on its own and fail with a bare network error, the useful message (where to
put the four files, or AIR_DATA_DIR) buried in its result.json.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from bench.config import RunConfig
from bench.data.mnist import MnistCorruptError, MnistNotFoundError, find_mnist_files
from bench.data.multi_mnist import MultiMnistSpec, default_cache_dir


class DataMissing(RuntimeError):
    """The MNIST files are neither here nor downloadable; nothing was started."""


def data_specs(cfg: RunConfig) -> list[MultiMnistSpec]:
    """The run's training and test set specs, as `bench.trainer.load_datasets` builds them."""
    d = cfg.data
    common = dict(seed=d.seed, canvas=cfg.model.canvas, rescale=d.rescale)
    return [
        MultiMnistSpec(n_images=d.n_train, split="train", counts=tuple(d.train_counts), **common),
        MultiMnistSpec(n_images=d.n_test, split="test", counts=tuple(d.test_counts), **common),
    ]


def cache_file(spec: MultiMnistSpec, cache_dir: str | None) -> Path:
    """Where `bench.data.multi_mnist.load_or_generate` caches the set of `spec`."""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return folder / f"multi_mnist-{spec.split}-{spec.n_images}-{spec.key()}.npz"


def check_data(cfgs: Iterable[RunConfig]) -> list[str]:
    """Make sure every run can get its data: the cached sets, or the MNIST files (downloaded
    here, once, if missing). Returns the MNIST folders used; DataMissing says what to do."""
    folders: dict[str | None, list[Path]] = {}
    for cfg in cfgs:
        d = cfg.data
        if all(cache_file(spec, d.cache_dir).is_file() for spec in data_specs(cfg)):
            continue  # generated already: MNIST is not read
        if d.data_dir in folders:
            continue
        try:
            folders[d.data_dir] = find_mnist_files(d.data_dir)
        except MnistNotFoundError as err:
            raise DataMissing(f"{err}\nNothing was started.") from err
        except MnistCorruptError as err:  # a bad download is checked, and never renamed
            raise DataMissing(f"{err}\nNothing was started.") from err
    return sorted({str(paths[0].parent) for paths in folders.values() if paths})
