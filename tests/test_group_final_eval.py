"""A seed group's final evaluation, vectorised over its seeds (bench/group_final.py,
bench/group_eval.py), equals each seed's separate run's; evaluation's seconds in result.json."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from bench import group_eval
from bench.config import config_hash
from bench.group_eval import StackedSeeds, evaluate_seeds
from bench.run_folder import write_result
from bench.seedgroup import SeedGroup
from bench.trainer import Trainer, load_checkpoint
from tests.conftest import needs_mnist
from tests.group_checks import spy_vectorised_final
from tests.test_seedgroup import _close

SMALL = "estimator.params.baseline_hidden=16"


@needs_mnist
def test_stacked_evaluation_equals_each_trainers_own(tiny_config) -> None:
    """`evaluate_seeds` with the final evaluation's arguments (and another test set) gives what
    each seed's `Trainer.evaluate` gives, untrained models being as good as any here."""
    cfgs = [tiny_config(f"seed={s}", SMALL, out=f"s{s}") for s in (0, 1)]
    group = SeedGroup(cfgs)
    stacked = StackedSeeds.of(group, [0, 1])
    test = group.trainers[0].data.train  # another test set than the run's own
    got = evaluate_seeds(stacked, [0, 1], 40, 3, 12, test=test)
    for trainer, g in zip(group.trainers, got, strict=True):
        want = trainer.evaluate(40, 3, 12, test=test)
        assert g["iw_samples"] == want["iw_samples"] == 3 and g["iw_images"] == 12
        _close(want, g)
        assert want["confusion"] == g["confusion"]
    assert got[0]["iw_bound"] != got[1]["iw_bound"]  # two seeds, two models


@needs_mnist
@pytest.mark.parametrize(
    "break_plan",
    [lambda plan: plan[:-1], lambda plan: [plan[1], plan[0], *plan[2:]]],
    ids=["a pass short", "passes swapped"],
)
def test_a_changed_pass_sequence_is_an_error(tiny_config, monkeypatch, break_plan) -> None:
    """If `evaluate`'s passes stop matching the plan the replay fails loudly (no hang) and every
    trainer gets its own model back."""
    cfgs = [tiny_config(f"seed={s}", SMALL, out=f"s{s}") for s in (0, 1)]
    group = SeedGroup(cfgs)
    models = [t.model for t in group.trainers]
    real_plan = group_eval._plan
    monkeypatch.setattr(group_eval, "_plan", lambda *a: break_plan(real_plan(*a)))
    threads = threading.active_count()
    with pytest.raises(RuntimeError, match="passes"):
        evaluate_seeds(StackedSeeds.of(group, [0, 1]), [0, 1], 40, 3, 12)
    assert [t.model for t in group.trainers] == models
    assert threading.active_count() == threads  # every seed's evaluate thread has ended


@needs_mnist
def test_a_failing_pass_stops_every_seeds_evaluation(tiny_config, monkeypatch) -> None:
    """An error in the vectorised pass (vmap refusing an estimator, say) reaches the caller,
    with every seed's evaluate, waiting for that pass, ended and its model back."""
    cfgs = [tiny_config(f"seed={s}", SMALL, out=f"s{s}") for s in (0, 1)]
    group = SeedGroup(cfgs)
    models = [t.model for t in group.trainers]

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("vmap refused this pass")

    monkeypatch.setattr(group_eval, "functional_call", refuse)
    threads = threading.active_count()
    with pytest.raises(RuntimeError, match="vmap refused this pass"):
        evaluate_seeds(StackedSeeds.of(group, [0, 1]), [0, 1], 40, 3, 12)
    assert [t.model for t in group.trainers] == models
    assert threading.active_count() == threads


#: (seeds, overrides) of the final-evaluation test; its CUDA twin (tests/test_cuda.py) takes them.
FINAL_CASES = [
    ((0, 1, 2), [SMALL, "data.reference_protocols=[addtt]"]),
    ((3, 4), ["model.presence=concrete", "estimator.name=reparam", "train.grad_clip=1.0"]),
]


@needs_mnist
@pytest.mark.parametrize(
    ("seeds", "overrides"),
    FINAL_CASES,
    ids=["nvil-3-seeds", "concrete-2-seeds"],
)
def test_group_final_evaluation_is_vectorised_and_equals_separate_runs(
    tiny_config, monkeypatch, caplog, seeds, overrides
) -> None:
    calls = spy_vectorised_final(monkeypatch)  # chunks of 2 seeds: 3 seeds take two
    alone = [Trainer(tiny_config(f"seed={s}", *overrides, out=f"a{s}")).run() for s in seeds]
    cfgs = [tiny_config(f"seed={s}", *overrides, out=f"g{s}") for s in seeds]
    start = time.perf_counter()
    together = SeedGroup(cfgs).run()
    wall = time.perf_counter() - start
    ev = cfgs[0].eval
    protocols = cfgs[0].data.reference_protocols
    # The main final evaluation, then each protocol's, vectorised.
    assert len(calls) == 1 + len(protocols), "the final evaluation was not the vectorised one"
    assert "vectorised final evaluation failed" not in caplog.text
    for n, args, _ in calls:
        assert n == len(seeds) and args == (ev.final_images, ev.iw_samples, ev.iw_images)
    for s, (a, g) in enumerate(zip(alone, together, strict=True)):
        assert g["final"] is calls[0][2][s]  # the result holds the vectorised metrics
        assert g["final"]["iw_samples"] == a["final"]["iw_samples"] == ev.iw_samples
        pairs = [(a["final"], g["final"])]
        for name, call in zip(protocols, calls[1:], strict=True):
            assert g["final_protocols"][name] is call[2][s]
            pairs.append((a["final_protocols"][name], g["final_protocols"][name]))
        assert g["final_protocols"].keys() == a["final_protocols"].keys() == set(protocols)
        for want, got in pairs:
            _close(want, got)
            assert want["confusion"] == got["confusion"]
    assert together[0]["final"]["iw_bound"] != together[1]["final"]["iw_bound"]
    # Each seed's evaluation seconds: its shares of the group's vectorised evaluations.
    for g in together:
        assert g["evaluation_s"] > 0 and g["final_evaluation_s"] > 0
        assert g["wall_time_s"] + g["evaluation_s"] + g["final_evaluation_s"] <= wall
    assert sum(g["evaluation_s"] + g["final_evaluation_s"] for g in together) <= wall


@needs_mnist
def test_single_run_records_its_evaluation_seconds(tiny_config) -> None:
    """result.json holds the seconds of the periodic and the final evaluations: positive, and
    with the training seconds no more than the run's wall time."""
    start = time.perf_counter()
    result = Trainer(tiny_config(SMALL)).run()
    wall = time.perf_counter() - start
    assert result["evaluation_s"] > 0 and result["final_evaluation_s"] > 0
    assert result["wall_time_s"] + result["evaluation_s"] + result["final_evaluation_s"] <= wall


@needs_mnist
def test_evaluation_seconds_survive_a_resume(tiny_config) -> None:
    cfg = tiny_config(SMALL)
    Trainer(cfg).run(stop_after=8)  # evaluated at 4 and 8, checkpointed at 8
    before = load_checkpoint(Path(cfg.out_dir), config_hash(cfg))["evaluation_s"]
    assert before > 0
    assert Trainer(cfg).run()["evaluation_s"] > before  # plus the evaluation at 12


@needs_mnist
def test_finish_refuses_metrics_that_are_not_a_final_evaluation(tiny_config) -> None:
    trainer = Trainer(tiny_config(SMALL))
    trainer.prepare()
    trainer.loop(None)
    periodic = trainer.evaluate(48, 0)  # K = 0: a periodic evaluation's, not the final one
    with pytest.raises(ValueError, match="takes a final evaluation"):
        trainer.finish(final=periodic)
    assert not (Path(trainer.run_dir) / "result.json").exists()
    final = trainer.evaluate(48, 3, 16)
    result = trainer.finish(final=final, final_s=2.5)
    assert result["final"] is final and result["final_evaluation_s"] >= 2.5


def test_result_writer_refuses_negative_seconds(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="evaluation_s must be a number of seconds >= 0"):
        write_result(tmp_path, {"status": "complete", "evaluation_s": -1.0})
    assert not (tmp_path / "result.json").exists()
    write_result(tmp_path, {"status": "complete", "evaluation_s": 0.5, "final_evaluation_s": 0})
