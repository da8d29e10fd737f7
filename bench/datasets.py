"""A run's training and test sets, loaded through the data set registry and checked."""

from __future__ import annotations

from dataclasses import dataclass

from bench.config import RunConfig
from bench.data.registry import ObjectImages, check_loaded, get_dataset


@dataclass
class Datasets:
    """A run's training and test sets, as its data set (`data.name`) loaded them."""

    train: ObjectImages
    test: ObjectImages


def load_datasets(cfg: RunConfig) -> Datasets:
    """The run's training and test sets; the data seed, not the run seed, fixes them.

    The data set is the plugin registered as `data.name` (bench/data/registry.py); what it
    returns is checked against the contract (shapes, dtype, counts), so a broken plugin fails
    here, naming itself, rather than somewhere in the model.
    """
    dataset = get_dataset(cfg.data.name)
    if dataset.kind != "images":
        raise ValueError(
            f"data set {dataset.name!r} is of kind {dataset.kind!r}; this trainer trains on "
            "single images (kind 'images')"
        )
    canvas, d = cfg.model.canvas, cfg.data
    train = check_loaded(dataset, dataset.load(d, canvas, "train"), canvas, "train", d.train_counts)
    test = check_loaded(dataset, dataset.load(d, canvas, "test"), canvas, "test", d.test_counts)
    return Datasets(train=train, test=test)
