"""Checks the launcher makes once, before any job starts.

`check_data`: every run to train needs its training and test sets. Each run's data set (the
plugin of its `data.name`, bench/data/registry.py) is asked whether its sets are prepared
already (multi-MNIST: both generated sets cached) and, if not, whether it can get its sources
(multi-MNIST: the four MNIST files, downloaded here once if missing). Without this check each job
would try on its own and fail with a bare error, the useful message (where to put the files, or
AIR_DATA_DIR) buried in its result.json.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict

from bench.config import RunConfig
from bench.data.datasets.multi_mnist import cache_file, spec_of
from bench.data.multi_mnist import MultiMnistSpec
from bench.data.registry import DatasetError, get_dataset

__all__ = ["DataMissing", "cache_file", "check_data", "data_specs"]


class DataMissing(RuntimeError):
    """A data set's sources are neither here nor obtainable; nothing was started."""


def data_specs(cfg: RunConfig) -> list[MultiMnistSpec]:
    """A multi-MNIST run's training and test set specs, as its data set loads them."""
    return [spec_of(cfg.data, cfg.model.canvas, split) for split in ("train", "test")]


def check_data(cfgs: Iterable[RunConfig]) -> list[str]:
    """Make sure every run can get its data. Returns the names of the data sets whose sources
    were checked (those not prepared already); DataMissing says what to do."""
    checked: set[str] = set()
    seen: set[str] = set()
    for cfg in cfgs:
        key = json.dumps([cfg.model.canvas, asdict(cfg.data)], sort_keys=True, default=str)
        if key in seen:
            continue  # the variants and seeds of one experiment share their data
        seen.add(key)
        try:
            dataset = get_dataset(cfg.data.name)
        except DatasetError as err:
            raise DataMissing(f"{err}\nNothing was started.") from err
        if dataset.is_prepared(cfg.data, cfg.model.canvas):
            continue  # generated already: no source is read
        problem = dataset.check_available(cfg.data, cfg.model.canvas)
        if problem is not None:
            raise DataMissing(f"{problem}\nNothing was started.")
        checked.add(dataset.name)
    return sorted(checked)
