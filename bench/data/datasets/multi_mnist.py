"""`data.name: multi_mnist`: the AIR paper's multi-MNIST (bench/data/multi_mnist.py builds it).

Canvases of `model.canvas` pixels holding `data.train_counts` / `data.test_counts` non-overlapping
MNIST digits, rescaled as Pyro's example does (`data.rescale`); the training split draws MNIST
training digits, the test split MNIST test digits. Generated sets are cached on disk
(`data.cache_dir`); MNIST comes from `data.data_dir` (see bench/data/mnist.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bench.data.mnist import MnistCorruptError, MnistNotFoundError, find_mnist_files
from bench.data.multi_mnist import (
    MAX_COUNT,
    MultiMnist,
    MultiMnistSpec,
    cache_file,
    load_or_generate,
)
from bench.data.protocols import REFERENCE_PROTOCOLS
from bench.data.registry import SPLITS, Dataset, DatasetError, register_dataset

if TYPE_CHECKING:
    from bench.config import DataConfig


#: `data.params` of this data set: the layout of its canvases (both splits). `placement: ink`
#: puts a digit anywhere its ink box fits on the canvas; `frame` keeps its whole rescaled 28x28
#: frame on the canvas, as Pyro's generator does (digits further from the edges: the layout
#: our NVIL needs to learn at Pyro's speed, docs/pyro_parity.md). `overlap: true` lets digits
#: overlap (ink merged by maximum), as Pyro's may.
OPTIONS: dict = {"placement": "ink", "overlap": False}


def spec_of(cfg: DataConfig, canvas: int, split: str) -> MultiMnistSpec:
    """The generator spec of one split of the config's multi-MNIST."""
    if split not in SPLITS:
        raise DatasetError(f"multi_mnist: split must be one of {list(SPLITS)}, got {split!r}")
    n, counts = (
        (cfg.n_train, cfg.train_counts) if split == "train" else (cfg.n_test, cfg.test_counts)
    )
    opts = {**OPTIONS, **(cfg.params or {})}
    layout = {"placement": opts["placement"], "overlap": opts["overlap"]}
    return MultiMnistSpec(n_images=n, split=split, counts=tuple(counts), seed=cfg.seed,
                          canvas=canvas, rescale=cfg.rescale, **layout)  # fmt: skip


@register_dataset
class MultiMnistDataset(Dataset):
    name = "multi_mnist"
    kind = "images"
    counts = tuple(range(MAX_COUNT + 1))
    options = OPTIONS
    protocols = tuple(REFERENCE_PROTOCOLS)
    noun = "digit"

    def load(self, cfg: DataConfig, canvas: int, split: str) -> MultiMnist:
        self.params(cfg)
        try:
            spec = spec_of(cfg, canvas, split)
        except ValueError as err:  # MultiMnistSpec's checks: canvas too small, bad sizes
            raise DatasetError(f"data set 'multi_mnist' ({split} split): {err}") from err
        return load_or_generate(spec, data_dir=cfg.data_dir, cache_dir=cfg.cache_dir)

    def is_prepared(self, cfg: DataConfig, canvas: int) -> bool:
        return all(cache_file(spec_of(cfg, canvas, s), cfg.cache_dir).is_file() for s in SPLITS)

    def check_available(self, cfg: DataConfig, canvas: int) -> str | None:
        try:
            find_mnist_files(cfg.data_dir)  # downloads missing files (checksummed) if it can
        except (MnistNotFoundError, MnistCorruptError) as err:
            return str(err)
        return None
