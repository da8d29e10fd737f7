"""Experiment `representation` (AIR paper 3.1.2): downstream probes on a frozen model's latents.

Targets, the wall between labelled training images and test labels, a probe on ground-truth
latents that must learn both tasks, the config hash left alone when probes are off, the worker
pipeline end to end on tiny data (training in `training/`, probes only on a retry, reusing a
finished count run), and the report's table and figure from a runs table alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.config import ConfigError, ProbeConfig, config_hash, load_config
from bench.data.registry import ImageSet
from bench.probes import suite
from bench.probes.features import truth_latents
from bench.probes.learners import FitSettings, latent_probe
from bench.probes.tasks import targets
from tests.conftest import needs_mnist

NAN4 = [np.nan] * 4


def _images(labels: list[list[int]], boxes: list[list[list[float]]]) -> ImageSet:
    lab = np.array(labels, dtype=np.int64)
    n = len(lab)
    box = np.array(boxes, dtype=np.float32)
    return ImageSet(np.zeros((n, 50, 50), np.uint8), (lab >= 0).sum(1), box, box, lab)


# ------------------------------------------------------------------------------ targets
def test_sum_and_order_targets_follow_labels_and_left_to_right_boxes() -> None:
    data = _images(
        [[-1, -1], [7, -1], [3, 9], [9, 3], [5, 5], [-1, 4]],
        [
            [NAN4, NAN4],
            [[0, 0, 10, 10], NAN4],
            [[30, 0, 40, 10], [0, 0, 10, 10]],  # 9 on the left, 3 on the right: descending
            [[30, 0, 40, 10], [0, 0, 10, 10]],  # 3 left, 9 right: ascending
            [[0, 0, 10, 10], [20, 0, 30, 10]],  # equal digits count as ascending
            [NAN4, [0, 0, 5, 5]],
        ],
    )
    s = targets(data, "sum", max_count=2)
    assert s.classes == 19 and s.index.tolist() == [0, 1, 2, 3, 4, 5]
    assert s.y.tolist() == [0, 7, 12, 12, 10, 4]
    o = targets(data, "order", max_count=2)
    assert o.index.tolist() == [2, 3, 4]  # only 2-digit images
    assert o.y.tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="probe task must be one of"):
        targets(data, "product", max_count=2)


def test_labelled_images_are_nested_across_budgets_and_differ_across_seeds() -> None:
    data = _images([[1, 2]] * 50, [[[0, 0, 5, 5], [20, 0, 25, 5]]] * 50)
    t = targets(data, "sum", 2)
    small, large = suite.labelled_rows(t, 10, 0), suite.labelled_rows(t, 30, 0)
    assert set(small) <= set(large) and len(set(large)) == 30
    assert set(suite.labelled_rows(t, 10, 1)) != set(small)


# ------------------------------------------------------------------------------ no test labels
def test_test_labels_reach_the_score_and_nothing_else(monkeypatch) -> None:
    rng = np.random.default_rng(0)
    n_train, n_test = 300, 120
    train = _images(
        rng.integers(0, 10, (n_train, 2)).tolist(), [[[0, 0, 5, 5], [20, 0, 25, 5]]] * n_train
    )
    test = _images(
        rng.integers(0, 10, (n_test, 2)).tolist(), [[[0, 0, 5, 5], [20, 0, 25, 5]]] * n_test
    )
    feats = {"train": truth_latents(train, 50), "test": truth_latents(test, 50)}
    probe = ProbeConfig(budgets=[50, 200], tasks=["sum"], seeds=2, steps=30)
    seen: dict[str, list] = {"fit_y": [], "pred": []}
    real_fit, real_score = suite.fit, suite.score

    def spy_fit(make, x, y, settings, seed, prepare=None):  # noqa: ANN001, ANN202
        seen["fit_y"].append((x.copy(), np.asarray(y).copy()))
        return real_fit(make, x, y, settings, seed, prepare)

    def spy_score(predict, x, y):  # noqa: ANN001, ANN202
        seen["pred"].append(predict(x))
        return real_score(predict, x, y)

    monkeypatch.setattr(suite, "fit", spy_fit)
    monkeypatch.setattr(suite, "score", spy_score)
    scores = []
    for shuffle in (False, True):
        labels = test.labels.copy()
        if shuffle:  # other test labels: the fitted probes must not change, only the score
            labels = labels[rng.permutation(n_test)]
        shuffled = ImageSet(test.images, test.counts, test.boxes, test.frame_boxes, labels)
        tasks = suite.plan(train, shuffled, probe, 2)
        scores.append(suite.run_suite(
            tasks, lambda s, rows: feats[s][rows],
            lambda n, k: latent_probe(n, k, 32), probe, FitSettings(steps=30),
        ))  # fmt: skip
    fits, preds = seen["fit_y"], seen["pred"]
    assert len(fits) == 8 and len(preds) == 8  # 2 budgets x 2 seeds, twice
    train_sums = np.where(train.labels >= 0, train.labels, 0).sum(1)
    for x, y in fits:  # every label a probe learnt from is a training image's own
        rows = [int(np.flatnonzero((feats["train"] == row).all(1))[0]) for row in x]
        assert np.array_equal(train_sums[rows], y)
    for a, b in zip(preds[:4], preds[4:], strict=True):
        assert np.array_equal(a, b)
    assert scores[0] != scores[1]  # while the scores do see the test labels


# ------------------------------------------------------------------------------ the probe works
@needs_mnist
def test_a_probe_on_ground_truth_latents_learns_both_tasks(tmp_path: Path) -> None:
    """A low score on a model's latents is then the representation's, not the probe's."""
    from bench.data.multi_mnist import MultiMnistSpec, load_or_generate

    def split(name: str, n: int):  # noqa: ANN202
        spec = MultiMnistSpec(n_images=n, split=name, counts=(0, 1, 2), seed=5, canvas=50)
        return load_or_generate(spec, cache_dir=tmp_path)

    train, test = split("train", 4500), split("test", 900)
    feats = {"train": truth_latents(train, 50), "test": truth_latents(test, 50)}
    probe = ProbeConfig(budgets=[1200], seeds=1)
    tasks = suite.plan(train, test, probe, 2)
    scores = suite.run_suite(tasks, lambda s, rows: feats[s][rows],
                             lambda n, k: latent_probe(n, k, 256), probe,
                             FitSettings(steps=600))  # fmt: skip
    flat = suite.flat_scores(scores, "probe_")
    assert flat["probe_sum_acc_1200"] >= 0.97, flat
    assert flat["probe_order_acc_1200"] >= 0.95, flat
    # Control: without the digit identities (positions and presence only) the sum is not
    # learnable, so the test above measures what the latents say about the digits.
    blind = {s: f.reshape(len(f), -1, 14)[..., :4].reshape(len(f), -1) for s, f in feats.items()}
    scores = suite.run_suite({"sum": tasks["sum"]}, lambda s, rows: blind[s][rows],
                             lambda n, k: latent_probe(n, k, 256), probe,
                             FitSettings(steps=600))  # fmt: skip
    assert suite.flat_scores(scores, "probe_")["probe_sum_acc_1200"] < 0.45


# ------------------------------------------------------------------------------ config
def test_probes_off_leave_every_config_hash_as_it_was() -> None:
    # 6e7e0790ba: the schema defaults' hash before the probe section existed (bench/config.py
    # at dfc847f); real run folders written then hash as they did too (docs/representation.md).
    base = load_config(overrides=["seed=0"])
    assert config_hash(base) == "6e7e0790ba"
    same = load_config(overrides=["seed=0", "probe.steps=7", "probe.tasks=[sum]"])
    assert config_hash(base) == config_hash(same)
    on = load_config(overrides=["seed=0", "probe.budgets=[100]"])
    elsewhere = load_config(overrides=["seed=0", "probe.budgets=[100]",
                                       "probe.reuse_experiment=other"])  # fmt: skip
    assert config_hash(on) != config_hash(base) and config_hash(on) == config_hash(elsewhere)


def test_representation_trains_exactly_what_count_trains() -> None:
    """Same data settings, so a representation run's training config is the count run's and
    a finished count run is found by its hash."""
    from bench.grid import build_grid, load_experiment, load_profile
    from bench.probes.stage import training_config
    from bench.variants import discover

    count, rep = load_experiment("count"), load_experiment("representation")
    assert rep.config["data"] == count.config["data"]
    assert set(rep.config) == {"data", "probe"} and rep.config["probe"]["budgets"]
    variants = discover().variants
    for name in ("air_nvil_fixed", "dair_nvil"):
        grid = build_grid(["count", "representation"], [variants[name]], [0],
                          load_profile("cpu"), [], Path("/tmp/unused"))  # fmt: skip
        c, r = grid
        assert r.config_hash != c.config_hash
        assert config_hash(training_config(r.cfg, r.run_dir)) == c.config_hash


@pytest.mark.parametrize(
    ("override", "field"),
    [("probe.budgets=[0]", "probe.budgets"), ("probe.budgets=[5,5]", "probe.budgets"),
     ("probe.tasks=[sums]", "probe.tasks"), ("probe.seeds=0", "probe.seeds")],
)  # fmt: skip
def test_bad_probe_settings_name_their_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(overrides=[override])


# ------------------------------------------------------------------------------ report
def test_report_table_and_figure_from_the_runs_table_alone() -> None:
    from bench.report import representation

    runs = pd.DataFrame({
        "variant": ["a", "a", "b"], "seed": [0, 1, 0], "config_hash": ["h", "h", "k"],
        "final_probe_sum_acc_100": [0.5, 0.7, 0.4], "final_probe_cnn_sum_acc_100": [0.2] * 3,
        "final_probe_sum_n_test": [1000] * 3, "final_count_accuracy": [0.9, 0.9, 0.8],
    })  # fmt: skip
    rows = {(r["row"], r["budget"]): r for r in representation.table(runs)}
    a, b, cnn = rows[("a", 100)], rows[("b", 100)], rows[("pixel CNN", 100)]
    assert a["runs"] == 2 and a["mean"] == pytest.approx(0.6) and a["interval"] == "seeds"
    assert a["lo"] < 0.6 < a["hi"]
    assert b["interval"] == "test images" and b["lo"] < 0.4 < b["hi"] and b["hi"] - b["lo"] < 0.07
    assert cnn["runs"] == 1 and cnn["mean"] == pytest.approx(0.2)  # one data set: one CNN
    assert representation.draw(runs, {"a": "red", "b": "blue"}) is not None
    assert representation.table(runs.drop(columns=[c for c in runs if "probe" in c])) == []
    # Another experiment's page: gather gave it the columns, all empty.
    empty = runs.assign(**{c: np.nan for c in runs if "probe" in c})
    assert representation.table(empty) == [] and representation.draw(empty, {}) is None


# ------------------------------------------------------------------------------ pipeline
def _grid(experiment: str, tmp_path: Path, data_cache: Path, probe: bool = True):  # noqa: ANN202
    from bench.grid import build_grid, load_profile
    from bench.variants import discover

    overrides = [
        f"data.cache_dir={data_cache}",
        "train.progress=false",
        "data.reference_protocols=[]",
    ]
    if probe:
        overrides += ["probe.budgets=[20,40,100000]", "probe.steps=15", "probe.seeds=2"]
    variant = discover().variants["air_nvil_fixed"]
    (run,) = build_grid([experiment], [variant], [0], load_profile("smoke"), overrides,
                        tmp_path / "results")  # fmt: skip
    return run


@needs_mnist
def test_pipeline_trains_probes_and_retries_only_the_probes(
    tmp_path, data_cache, monkeypatch
) -> None:
    from bench.gather import gather
    from bench.worker import run_task

    run = _grid("representation", tmp_path, data_cache)
    record = run_task(run.task(30))
    assert record["status"] == "complete" and record["training_reused"] is False
    final = record["final"]
    for key in (
        "probe_sum_acc_20",
        "probe_sum_acc_40",
        "probe_order_acc_20",
        "probe_cnn_sum_acc_40",
        "probe_cnn_order_acc_20",
        "probe_sum_chance",
        "count_accuracy",
    ):
        assert 0.0 <= final[key] <= 1.0, key  # fmt: skip
    assert "probe_sum_acc_100000" not in final
    assert "skipped" in record["probes"]["latents"]["sum"]["100000"]
    folder = run.run_dir
    for name in ("model.pt", "config.yaml", "probes.json", "training/model.pt"):
        assert (folder / name).is_file(), name
    assert load_config([folder / "config.yaml"]).probe.budgets == [20, 40, 100000]
    runs = gather(tmp_path / "results").runs
    assert runs.loc[0, "final_probe_sum_acc_20"] == pytest.approx(final["probe_sum_acc_20"])
    assert len(list((tmp_path / "results" / ".probes").glob("pixel_cnn-*.json"))) == 1

    # Killed while probing: no result.json. The retry trains nothing and gets the same scores.
    (folder / "result.json").unlink()
    monkeypatch.setattr("bench.worker._fit", _no_training)
    again = run_task(run.task(30))
    assert again["status"] == "complete"
    assert not list(folder.glob(".*.tmp"))  # the links of the first attempt are kept as they are
    assert {k: v for k, v in again["final"].items() if k.startswith("probe_")} == {
        k: v for k, v in final.items() if k.startswith("probe_")
    }


def _no_training(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
    raise AssertionError("the model was trained again")


@needs_mnist
def test_a_finished_count_run_is_reused_not_trained_again(
    tmp_path, data_cache, monkeypatch
) -> None:
    from bench.worker import run_task

    count = _grid("count", tmp_path, data_cache, probe=False)
    assert run_task(count.task(30))["status"] == "complete"
    monkeypatch.setattr("bench.worker._fit", _no_training)
    run = _grid("representation", tmp_path, data_cache)
    record = run_task(run.task(30))
    assert record["status"] == "complete" and record["training_reused"] is True
    assert record["experiment"] == "representation" and record["config_hash"] == run.config_hash
    assert Path(record["training_run"]).resolve() == count.run_dir.resolve()
    assert not (run.run_dir / "training").exists()
    assert (run.run_dir / "model.pt").read_bytes() == (count.run_dir / "model.pt").read_bytes()
    count_final = json.loads((count.run_dir / "result.json").read_text())["final"]
    assert record["final"]["count_accuracy"] == count_final["count_accuracy"]
    assert "probe_sum_acc_20" not in count_final  # the count run itself is left as it was

    # The same through `python -m bench.probes.existing <run>` (its own config.yaml + probes).
    from bench.probes.existing import probe_task

    task = probe_task(count.run_dir, ["probe.budgets=[20]", "probe.steps=5", "probe.seeds=1",
                                      "probe.pixel_cnn=false"])  # fmt: skip
    assert Path(task["run_dir"]).parent.parent.parent.name == "representation"
    again = run_task(task)
    assert again["training_reused"] is True and "probe_sum_acc_20" in again["final"]
    with pytest.raises(ValueError, match="not reusable"):
        probe_task(count.run_dir, ["probe.budgets=[20]", "train.lr=0.5"])
