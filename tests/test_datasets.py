"""Data sets as plugins (bench/data/registry.py): selection by `data.name`, the contract, config
checks, the preflight question, experiments' headline fields, and a data set defined here, in
the test alone, trained end to end through the Trainer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.config import ConfigError, DataConfig, config_hash, load_config
from bench.data.registry import (
    Dataset,
    DatasetError,
    ImageSet,
    check_loaded,
    dataset_names,
    get_dataset,
    register_dataset,
    unregister_dataset,
)
from bench.datasets import load_datasets
from bench.grid import GridError, build_grid, load_experiment, load_profile
from bench.preflight import DataMissing, check_data
from bench.trainer import Trainer
from bench.variants import discover
from tests.conftest import needs_mnist


class ToySquares(Dataset):
    """Filled squares of side `params.side`, one per cell of a 2x2 grid of the canvas."""

    name = "toy_squares"
    counts = (0, 1, 2, 3, 4)
    options = {"side": 10, "message": ""}
    noun = "square"

    def load(self, cfg: DataConfig, canvas: int, split: str) -> ImageSet:
        side = self.params(cfg)["side"]
        n, allowed = (cfg.n_train, cfg.train_counts) if split == "train" else (
            cfg.n_test, cfg.test_counts)  # fmt: skip
        rng = np.random.default_rng([cfg.seed, split == "test"])
        counts = rng.choice(np.asarray(allowed), size=n)
        width = max(allowed)
        images = np.zeros((n, canvas, canvas), np.uint8)
        boxes = np.full((n, width, 4), np.nan, np.float32)
        cell = canvas // 2
        for i, c in enumerate(counts):
            for k, slot in enumerate(rng.permutation(4)[:c]):
                x = (slot % 2) * cell + rng.integers(0, cell - side + 1)
                y = (slot // 2) * cell + rng.integers(0, cell - side + 1)
                images[i, y : y + side, x : x + side] = 255
                boxes[i, k] = (x, y, x + side, y + side)
        labels = np.where(np.isnan(boxes[..., 0]), -1, 0)
        return ImageSet(images, counts, boxes, boxes.copy(), labels)

    def check_available(self, cfg: DataConfig, canvas: int) -> str | None:
        return self.params(cfg)["message"] or None


@pytest.fixture
def toy():
    register_dataset(ToySquares)
    yield get_dataset("toy_squares")
    unregister_dataset("toy_squares")


# ------------------------------------------------------------------------------ the registry
def test_multi_mnist_is_the_registered_default() -> None:
    assert "multi_mnist" in dataset_names()
    assert load_config().data.name == "multi_mnist"
    mm = get_dataset("multi_mnist")
    assert mm.max_count == 5 and mm.noun == "digit"


def test_unknown_name_is_a_config_error_with_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"data\.name: unknown data set 'multi_mnst'; did you "
                       r"mean 'multi_mnist'\? \(registered: \[.*'multi_mnist'"):  # fmt: skip
        load_config(overrides=["data.name=multi_mnst"])


def test_a_second_data_set_under_a_taken_name_is_refused(toy) -> None:
    class Other(ToySquares):
        pass

    with pytest.raises(DatasetError, match="registered twice"):
        register_dataset(Other)
    register_dataset(ToySquares)  # the same class again: a no-op
    assert type(get_dataset("toy_squares")) is ToySquares


def test_default_name_keeps_every_config_hash(toy) -> None:
    # Recorded before `data.name` and `data.params` existed: results on disk keep their folders.
    assert config_hash(load_config()) == "6e7e0790ba"
    interpolation = ["data.train_counts=[0,1,3]", "data.test_counts=[0,1,2,3]", "data.seed=2"]
    assert config_hash(load_config(overrides=interpolation)) == "027004303e"
    assert config_hash(load_config(overrides=["data.name=multi_mnist"])) == "6e7e0790ba"
    assert config_hash(load_config(overrides=["data.name=toy_squares"])) != "6e7e0790ba"
    a = config_hash(load_config(overrides=["data.name=toy_squares", "data.params.side=8"]))
    assert a != config_hash(load_config(overrides=["data.name=toy_squares"]))


def test_counts_and_options_are_checked_against_the_data_set(toy) -> None:
    five = ["model.max_steps=5"]
    with pytest.raises(ConfigError, match=r"data\.test_counts: data set 'multi_mnist' produces "
                       r"counts \[0, 1, 2, 3, 4, 5\], got \[0, 6\]"):  # fmt: skip
        load_config(overrides=["model.max_steps=6", "data.test_counts=[0,6]"])
    load_config(overrides=[*five, "data.name=toy_squares", "data.test_counts=[0,4]"])
    with pytest.raises(ConfigError, match=r"data\.train_counts: data set 'toy_squares'"):
        load_config(overrides=[*five, "data.name=toy_squares", "data.train_counts=[1,5]"])
    with pytest.raises(ConfigError, match=r"data\.params\.sid: .*did you mean 'side'"):
        load_config(overrides=["data.name=toy_squares", "data.params.sid=3"])
    with pytest.raises(ConfigError, match=r"data\.params\.side: expected a int"):
        load_config(overrides=["data.name=toy_squares", "data.params.side=big"])
    with pytest.raises(ConfigError, match=r"data\.reference_protocols: expected distinct names"):
        load_config(overrides=["data.name=toy_squares", "data.reference_protocols=[pyr]"])


# ------------------------------------------------------------------------------ the contract
def test_a_plugin_that_breaks_the_contract_fails_naming_itself(toy) -> None:
    cfg = load_config(overrides=["data.name=toy_squares", "data.n_train=8", "data.n_test=8"])
    good = toy.load(cfg.data, 50, "train")
    check_loaded(toy, good, 50, "train", cfg.data.train_counts)
    bad_dtype = ImageSet(good.images.astype(np.float32), good.counts, good.boxes,
                         good.frame_boxes, good.labels)  # fmt: skip
    with pytest.raises(DatasetError, match=r"'toy_squares' \(train split\): images must be uint8"):
        check_loaded(toy, bad_dtype, 50, "train", cfg.data.train_counts)
    with pytest.raises(DatasetError, match="images must be uint8 .*40, 40"):
        check_loaded(toy, good, 40, "train", cfg.data.train_counts)
    short = ImageSet(good.images, good.counts[:-1], good.boxes, good.frame_boxes, good.labels)
    with pytest.raises(DatasetError, match=r"counts must have shape \(8,\)"):
        check_loaded(toy, short, 50, "train", cfg.data.train_counts)
    with pytest.raises(DatasetError, match=r"holds counts .* but the config asks for \[0\]"):
        check_loaded(toy, good, 50, "train", [0])


def test_sequence_data_sets_are_refused_by_the_image_trainer(toy, monkeypatch) -> None:
    monkeypatch.setattr(ToySquares, "kind", "sequences")
    with pytest.raises(ValueError, match="kind 'sequences'"):
        load_datasets(load_config(overrides=["data.name=toy_squares"]))


# ------------------------------------------------------------------------------ end to end
def test_a_data_set_defined_in_a_test_trains_end_to_end(toy, tiny_config) -> None:
    """The point of the registry: no edit anywhere else for a new data set."""
    cfg = tiny_config("data.name=toy_squares", "data.train_counts=[0,1,2]",
                      "data.test_counts=[0,1,2,3]", "data.reference_protocols=[pyro]",
                      out="toy")  # fmt: skip
    data = load_datasets(cfg)
    assert set(np.unique(data.test.counts)) == {0, 1, 2, 3}
    assert np.array_equal(data.train.images, toy.load(cfg.data, 50, "train").images)
    result = Trainer(cfg).run()
    assert result["status"] == "complete" and result["iterations"] == 12
    final = result["final"]
    assert 0.0 <= final["count_accuracy"] <= 1.0 and np.isfinite(final["elbo"])
    assert {f"count_accuracy_{k}" for k in range(4)} <= set(final)
    # Multi-MNIST's reference protocols (a variant asks for them) are not run on squares.
    assert result["final_protocols"] == {"pyro": {"skipped": "data set 'toy_squares' has no "
                                                  "protocol 'pyro'"}}  # fmt: skip
    lines = (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [4, 8, 12]
    written = (Path(cfg.out_dir) / "config.yaml").read_text()
    assert "name: toy_squares" in written


def test_preflight_asks_the_data_set(toy, monkeypatch) -> None:
    cfg = load_config(overrides=["data.name=toy_squares"])
    assert check_data([cfg, cfg]) == ["toy_squares"]
    failing = load_config(overrides=["data.name=toy_squares", "data.params.message=get squares"])
    with pytest.raises(DataMissing, match="get squares\nNothing was started."):
        check_data([cfg, failing])
    monkeypatch.setattr(ToySquares, "is_prepared", lambda self, cfg, canvas: True)
    assert check_data([failing]) == []  # prepared: its sources are not asked for


# ------------------------------------------------------------------------------ experiments
def test_experiments_carry_their_headline_and_the_papers_figure() -> None:
    count, inter, extra = (load_experiment(n) for n in ("count", "interpolation", "extrapolation"))
    assert count.headline_count is None and count.headline_column() == "final_count_accuracy"
    assert inter.headline_count == 2 and inter.paper == {"AIR": 0.60, "DAIR": 0.95}
    assert extra.headline_column() == "final_count_accuracy_3"
    assert extra.headline_label() == "count accuracy on 3-digit images"
    assert extra.paper == {"AIR": 0.0, "DAIR": 0.80} and "3.1.1" in extra.paper_source


def test_a_new_data_set_is_one_experiment_file(toy, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("bench.grid_config.EXPERIMENTS_DIR", tmp_path)
    (tmp_path / "squares.yaml").write_text(
        "description: count squares\nheadline_count: 3\npaper: {AIR: 0.5}\n"
        "config:\n  data:\n    name: toy_squares\n    train_counts: [0, 1, 2]\n"
        "    test_counts: [0, 1, 2, 3]\n"
    )
    exp = load_experiment("squares")
    assert exp.headline_label() == "count accuracy on 3-square images"
    variant = discover().variants["air_nvil_fixed"]
    runs = build_grid(["squares"], [variant], [0], load_profile("smoke"), [], tmp_path / "r")
    assert runs[0].cfg.data.name == "toy_squares"
    (tmp_path / "bad.yaml").write_text("headline_count: 4\nconfig: {data: {name: toy_squares}}\n")
    with pytest.raises(GridError, match=r"bad\.yaml: headline_count 4 is not among .*\[0, 1, 2\]"):
        load_experiment("bad")
    (tmp_path / "gone.yaml").write_text("config: {data: {name: toy_square}}\n")
    with pytest.raises(GridError, match="gone.yaml: .*did you mean 'toy_squares'"):
        load_experiment("gone")
    (tmp_path / "odd.yaml").write_text("paper: {AIR: 60}\n")
    with pytest.raises(GridError, match=r"paper figures must be fractions"):
        load_experiment("odd")


# ------------------------------------------------------------------------------ multi-MNIST
@needs_mnist
def test_multi_mnist_plugin_loads_what_the_generator_builds(data_cache) -> None:
    from bench.data.multi_mnist import MultiMnistSpec, load_or_generate
    from bench.perf import timing_data

    sizes = ["data.n_train=64", "data.n_test=32", "data.test_counts=[0,1,2,3]"]
    cfg = load_config(overrides=[*sizes, f"data.cache_dir={data_cache}"])
    plugin = get_dataset("multi_mnist")
    assert not plugin.is_prepared(cfg.data, 50)
    data = load_datasets(cfg)
    assert plugin.is_prepared(cfg.data, 50)
    want = load_or_generate(MultiMnistSpec(32, "test", counts=(0, 1, 2, 3), seed=0),
                            cache_dir=data_cache)  # fmt: skip
    assert np.array_equal(data.test.images, want.images)
    assert np.array_equal(data.test.boxes, want.boxes, equal_nan=True)
    timed = timing_data(cfg, n_images=40)
    assert timed.train.images.shape == (40, 50, 50) and timed.test is timed.train


# ------------------------------------------------------------------------- Pyro's own data
def test_pyro_data_set_refuses_counts_it_cannot_hold() -> None:
    with pytest.raises(ConfigError, match=r"pyro_multi_mnist' produces counts \[0, 1, 2\]"):
        load_config(overrides=["data.name=pyro_multi_mnist", "data.test_counts=[0,1,2,3]"])


@needs_mnist
@pytest.mark.slow
def test_pyro_data_set_trains_and_tests_on_pyros_generated_set(data_cache) -> None:
    from bench.data.protocols import reference_test_set

    over = ["data.name=pyro_multi_mnist", "data.n_train=300", "data.n_test=100"]
    cfg = load_config(overrides=[*over, f"data.cache_dir={data_cache}"])
    data = load_datasets(cfg)
    pyro = reference_test_set(cfg.data, "pyro", n=300)  # Pyro's checksummed 60k-canvas set
    # Like Pyro's example: trained on its set and measured on (the start of) the same set.
    assert np.array_equal(data.train.images, pyro.images)
    assert np.array_equal(data.test.images, pyro.images[:100])
    assert set(np.unique(data.train.counts)) <= {0, 1, 2}
