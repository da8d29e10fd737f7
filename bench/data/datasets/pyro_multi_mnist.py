"""`data.name: pyro_multi_mnist`: Pyro's AIR example data set, rebuilt (bench/data/protocols.py).

Pyro's example trains on the 60,000 canvases its own script generates (MNIST training digits,
0-2 per canvas, rescaled, overlap allowed) and reports count accuracy on those same canvases.
This data set trains on that set (the `pyro` protocol, checked against Pyro's published pixel-sum
checksum) and, like Pyro, tests on its first `data.n_test` canvases, so that a run of ours can be
set against Pyro's published learning curve on Pyro's own terms (docs/pyro_parity.md).
Counts are 0-2 on 50x50 canvases only; `data.seed` and `data.rescale` do not apply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bench.data.mnist import MnistCorruptError, MnistNotFoundError, find_mnist_files
from bench.data.protocols import REFERENCE_PROTOCOLS, reference_test_set
from bench.data.registry import SPLITS, Dataset, DatasetError, register_dataset

if TYPE_CHECKING:
    from bench.config import DataConfig
    from bench.data.registry import ObjectImages


@register_dataset
class PyroMultiMnistDataset(Dataset):
    name = "pyro_multi_mnist"
    kind = "images"
    counts = (0, 1, 2)
    protocols = tuple(REFERENCE_PROTOCOLS)
    noun = "digit"

    def load(self, cfg: DataConfig, canvas: int, split: str) -> ObjectImages:
        if split not in SPLITS:
            raise DatasetError(f"pyro_multi_mnist: split must be one of {list(SPLITS)}")
        if sorted(cfg.train_counts) != [0, 1, 2] or sorted(cfg.test_counts) != [0, 1, 2]:
            raise DatasetError(
                "config fields data.train_counts / data.test_counts: pyro_multi_mnist holds "
                f"0-2 digits per canvas, got {list(cfg.train_counts)} / {list(cfg.test_counts)}"
            )
        n = cfg.n_train if split == "train" else cfg.n_test
        try:  # Pyro's set is its training set; Pyro measures accuracy on it too.
            return reference_test_set(cfg, "pyro", n=n, canvas=canvas)
        except ValueError as err:
            raise DatasetError(f"data set 'pyro_multi_mnist' ({split} split): {err}") from err

    def check_available(self, cfg: DataConfig, canvas: int) -> str | None:
        try:
            find_mnist_files(cfg.data_dir)
        except (MnistNotFoundError, MnistCorruptError) as err:
            return str(err)
        return None
