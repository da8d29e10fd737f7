"""Shared fixtures: tiny configs that train in a second on a CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.config import RunConfig, load_config
from bench.data.mnist import MnistNotFoundError, load_mnist, resolve_mnist_dir

ROOT = Path(__file__).resolve().parent.parent


def mnist_available() -> bool:
    folder = resolve_mnist_dir(None)
    return (folder / "train-images-idx3-ubyte.gz").exists()


needs_mnist = pytest.mark.skipif(
    not mnist_available(),
    reason="MNIST IDX files not found (set AIR_DATA_DIR or place them in ../shared/data/mnist)",
)

TINY = [
    "data.n_train=192",
    "data.n_test=48",
    "train.iterations=12",
    "train.batch_size=16",
    "train.eval_every=4",
    "train.eval_images=48",
    "train.log_every=4",
    "train.checkpoint_every=4",
    "train.progress=false",
    "eval.final_images=48",
    "eval.iw_samples=3",
    "eval.iw_images=16",
    "eval.batch_size=48",
    "eval.converged_evals=1",
    "model.lstm_hidden=32",
    "model.predict_hidden=16",
    "model.encoder_hidden=32",
    "model.decoder_hidden=32",
    "model.z_what_dim=8",
]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("multi_mnist_cache")


@pytest.fixture
def tiny_config(tmp_path: Path, data_cache: Path):
    """A function making a tiny RunConfig in a fresh run folder, with extra overrides."""

    def make(*overrides: str, out: str = "run") -> RunConfig:
        return load_config(
            overrides=[
                *TINY,
                f"data.cache_dir={data_cache}",
                f"out_dir={tmp_path / out}",
                *overrides,
            ]
        )

    return make


def _real_mnist(split: str) -> tuple:
    try:
        return load_mnist(split, download=False)
    except MnistNotFoundError:
        pytest.skip(f"real MNIST not available in {resolve_mnist_dir(None)}; set AIR_DATA_DIR")


@pytest.fixture(scope="session")
def mnist_train() -> tuple:
    """The real MNIST training split (images, labels); skips where it is absent."""
    return _real_mnist("train")


@pytest.fixture(scope="session")
def mnist_test() -> tuple:
    """The real MNIST test split (images, labels); skips where it is absent."""
    return _real_mnist("test")
