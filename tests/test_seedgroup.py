"""Seeds trained together in one vectorised process equal separate single-seed runs."""

from __future__ import annotations

import shutil
from functools import partialmethod
from pathlib import Path

import pytest
import torch

from bench import group_loop
from bench.config import config_hash
from bench.group_loop import GroupLoop
from bench.model_file import load_final_model
from bench.progress import ProgressFile
from bench.seedgroup import SeedGroup, train_group
from bench.storage import read_json_lines
from bench.trainer import Trainer, load_checkpoint
from tests.conftest import needs_mnist

pytestmark = needs_mnist

NUMERIC_SKIP = {"wall_time", "confusion"}


def _close(a: dict, b: dict, rtol: float = 1e-5) -> None:
    for key in a.keys() - NUMERIC_SKIP:
        va, vb = a[key], b[key]
        if isinstance(va, float) or isinstance(vb, float):
            assert va == pytest.approx(vb, rel=rtol, abs=1e-5), key
        else:
            assert va == vb, key


def _history(cfg) -> list[dict]:
    return read_json_lines(Path(cfg.out_dir) / "metrics.jsonl")


@pytest.mark.parametrize("variant_overrides", [["estimator.params.baseline_hidden=16"],
                                               ["model.presence=concrete",
                                                   "estimator.name=reparam",
                                                   "train.grad_clip=1.0",
                                                   "eval.periodic_iw_samples=3"]])  # fmt: skip
def test_group_equals_separate_runs(
    tiny_config,
    variant_overrides: list[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    evaluated = []
    real_evaluate = group_loop.evaluate_seeds

    def vectorised_evaluation(loop, js):  # noqa: ANN001, ANN202
        evaluated.append(loop.it)
        return real_evaluate(loop, js)

    # The vectorised periodic evaluation (bench/group_eval.py), which CPUs skip by default.
    monkeypatch.setattr(GroupLoop, "vector_eval_on_cpu", True)
    monkeypatch.setattr(group_loop, "evaluate_seeds", vectorised_evaluation)
    seeds = [0, 1]
    alone = [tiny_config(f"seed={s}", *variant_overrides, out=f"alone{s}") for s in seeds]
    together = [tiny_config(f"seed={s}", *variant_overrides, out=f"group{s}") for s in seeds]
    results_alone = [Trainer(c).run() for c in alone]
    group = SeedGroup(together)
    assert group._vectorisable()
    results_group = group.run()
    for a, g, ca, cg in zip(results_alone, results_group, alone, together, strict=True):
        ha, hg = _history(ca), _history(cg)
        assert [r["iteration"] for r in ha] == [r["iteration"] for r in hg]
        for ra, rg in zip(ha, hg, strict=True):
            _close(ra, rg)
            assert ra["confusion"] == rg["confusion"]
        _close(a["final"], g["final"])
    # The periodic evaluations above were the vectorised ones.
    assert evaluated == [4, 8, 12] and "vectorised evaluation failed" not in caplog.text
    # Different seeds really differ: the group did not train one seed three times.
    assert results_group[0]["final"]["elbo"] != results_group[1]["final"]["elbo"]


def test_group_resumes_and_single_runs_resume_group_checkpoints(tiny_config) -> None:
    seeds = [3, 4]
    small = "estimator.params.baseline_hidden=16"
    reference = [Trainer(tiny_config(f"seed={s}", small, out=f"ref{s}")).run() for s in seeds]
    cfgs = [tiny_config(f"seed={s}", small, "train.checkpoint_every=4", out=f"g{s}")
            for s in seeds]  # fmt: skip
    # Seed 3 gets ahead on its own; the group then resumes both from different iterations,
    # and seed 4 is finished alone from the group's checkpoint format.
    Trainer(cfgs[0]).run(stop_after=8)
    train_group(cfgs)
    for ref, cfg in zip(reference, cfgs, strict=True):
        got = Trainer(cfg).run()
        _close(ref["final"], got["final"])


SMALL = "estimator.params.baseline_hidden=16"


@pytest.mark.parametrize("vectorised", [True, False])
def test_stop_request_checkpoints_then_resumes_to_the_same_numbers(
    tiny_config, monkeypatch: pytest.MonkeyPatch, vectorised: bool
) -> None:
    """A stop request (the worker's SIGUSR2) ends the group after the current iteration with a
    checkpoint of every seed it trained, in the vectorised loop and in the seed-after-seed
    fallback alike; a new group resumes them to the numbers of uninterrupted runs."""
    seeds = [5, 6]
    reference = [Trainer(tiny_config(f"seed={s}", SMALL, out=f"ref{s}")).run() for s in seeds]
    cfgs = [tiny_config(f"seed={s}", SMALL, out=f"g{s}") for s in seeds]
    if not vectorised:
        monkeypatch.setattr(SeedGroup, "_vectorisable", lambda self: False)
    group = SeedGroup(cfgs)
    real_accumulate, real_iteration = Trainer.accumulate, GroupLoop.iteration

    def signal_during_first_iteration(trainer, *args):  # noqa: ANN001, ANN002, ANN202
        group.stop_requested = True  # as StopOnSignal does, from the signal handler
        return real_accumulate(trainer, *args)

    def signal_during_first_group_iteration(loop):  # noqa: ANN001, ANN202
        group.stop_requested = True
        return real_iteration(loop)

    monkeypatch.setattr(Trainer, "accumulate", signal_during_first_iteration)  # seed after seed
    monkeypatch.setattr(GroupLoop, "iteration", signal_during_first_group_iteration)
    results = group.run()
    assert [r["status"] for r in results] == ["partial", "partial"]
    stopped = [1, 1] if vectorised else [1, 0]  # the fallback stops before the next seed
    assert [t.iteration for t in group.trainers] == stopped
    for cfg, it in zip(cfgs, stopped, strict=True):
        ckpt = load_checkpoint(Path(cfg.out_dir), config_hash(cfg))
        assert (ckpt["iteration"] if ckpt else 0) == it
        assert not (Path(cfg.out_dir) / "result.json").exists()
    for ref, got in zip(reference, train_group(cfgs), strict=True):
        _close(ref["final"], got["final"])


def test_one_diverging_seed_does_not_stop_the_others(
    tiny_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The divergence rule (bench/group_loop.py): a seed whose gradient norm is not finite at
    iteration 5, between two sync points, is recorded diverged at 5 with the state after 5
    iterations, as its separate run records it; the other seed is untouched."""
    seeds = [7, 8]
    reference = Trainer(tiny_config("seed=8", SMALL, out="ref8")).run()
    alone_cfg = tiny_config("seed=7", SMALL, out="ref7")
    alone = Trainer(alone_cfg)
    real_trainer_clip = Trainer._clip

    def nan_at_iteration_5(trainer):  # noqa: ANN001, ANN202
        norm = real_trainer_clip(trainer)
        return float("nan") if trainer.iteration == 5 else norm

    monkeypatch.setattr(Trainer, "_clip", nan_at_iteration_5)
    diverged_alone = alone.run()
    monkeypatch.undo()
    cfgs = [tiny_config(f"seed={s}", SMALL, out=f"g{s}") for s in seeds]
    real_clip, calls = group_loop.clip_per_seed, []

    def nan_for_the_first_seed_at_iteration_5(params, max_norm):  # noqa: ANN001, ANN202
        norms = real_clip(params, max_norm)
        calls.append(1)
        if len(calls) == 6:
            norms[0] = float("nan")
        return norms

    monkeypatch.setattr(group_loop, "clip_per_seed", nan_for_the_first_seed_at_iteration_5)
    diverged, other = SeedGroup(cfgs).run()
    assert diverged["status"] == "complete" and diverged["outcome"] == "diverged"
    assert diverged["diverged_at"] == 5 and diverged["final"] is None
    assert diverged["iterations"] == diverged_alone["iterations"] == 5
    assert diverged_alone["diverged_at"] == 5
    weights_group = load_final_model(Path(cfgs[0].out_dir))["model"]
    weights_alone = load_final_model(Path(alone_cfg.out_dir))["model"]
    for name, w in weights_alone.items():
        torch.testing.assert_close(weights_group[name], w, rtol=1e-5, atol=1e-6, msg=name)
    history_group, history_alone = _history(cfgs[0]), _history(alone_cfg)
    assert [r["iteration"] for r in history_group] == [4] == [r["iteration"] for r in history_alone]
    _close(history_alone[0], history_group[0])
    assert other["outcome"] != "diverged" and other["iterations"] == 12
    _close(reference["final"], other["final"])


def test_group_iterations_between_sync_points_never_read_the_device(
    tiny_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Losses, logs, gradient norms and divergence flags stay on the device: an iteration
    that is not an evaluation or checkpoint reads no tensor back to the host."""
    cfgs = [tiny_config(f"seed={s}", SMALL, "train.eval_every=6", "train.checkpoint_every=6",
                        out=f"g{s}") for s in (0, 1)]  # fmt: skip
    reads: list[str] = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "numpy"):
        real = getattr(torch.Tensor, name)

        def spy(self, *args, _real=real, _name=name):  # noqa: ANN001, ANN002, ANN202
            reads.append(_name)
            return _real(self, *args)

        monkeypatch.setattr(torch.Tensor, name, spy)
    real_iteration, real_sync = GroupLoop.iteration, GroupLoop.sync
    per_iteration: list[tuple[int, bool, list[str]]] = []
    synced: list[bool] = []

    def sync(loop, *args):  # noqa: ANN001, ANN002, ANN202
        synced.append(True)
        return real_sync(loop, *args)

    def iteration(loop):  # noqa: ANN001, ANN202
        reads.clear()
        synced.clear()
        real_iteration(loop)
        per_iteration.append((loop.it, bool(synced), list(reads)))

    monkeypatch.setattr(GroupLoop, "iteration", iteration)
    monkeypatch.setattr(GroupLoop, "sync", sync)
    SeedGroup(cfgs).run()
    assert [it for it, was_synced, _ in per_iteration if was_synced] == [6, 12]
    quiet = [(it, r) for it, was_synced, r in per_iteration[1:] if not was_synced]
    assert len(quiet) == 9 and all(r == [] for _, r in quiet), quiet
    assert all(r for _, was_synced, r in per_iteration if was_synced)  # the spy does see reads


def test_group_progress_files_cost_no_per_seed_work_between_their_writes(
    tiny_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The progress files are written at most once per their interval (at the first
    iteration here, the interval being long), not touched seed by seed every iteration; sync
    points still force a write for each seed."""
    cfgs = [tiny_config(f"seed={s}", SMALL, "train.eval_every=6", "train.checkpoint_every=6",
                        out=f"p{s}") for s in (0, 1, 2)]  # fmt: skip
    calls: list[tuple[int, bool]] = []
    real_update = ProgressFile.update

    def update(self, iteration, elapsed_s, force=False):  # noqa: ANN001, ANN202
        calls.append((iteration, force))
        return real_update(self, iteration, elapsed_s, force)

    monkeypatch.setattr(ProgressFile, "update", update)
    monkeypatch.setattr(ProgressFile, "__init__", partialmethod(ProgressFile.__init__,
                                                                interval_s=1e9))  # fmt: skip
    SeedGroup(cfgs).run()
    unforced = [it for it, force in calls if not force]
    assert unforced == [1, 1, 1], unforced  # one per seed, at the first iteration
    assert sorted(it for it, force in calls if force) == [6] * 3 + [12] * 3


@pytest.mark.slow
@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
    reason="torch.compile on CPU needs a C++ compiler (c++, g++ or clang++); none on PATH",
)
def test_compiled_group_equals_eager_group(tiny_config) -> None:
    """train.compile=true compiles the group's vectorised loss: the same numbers as eager to
    float tolerance, and no recompilation as an annealed prior moves."""
    from torch._dynamo.utils import counters

    histories, graphs = {}, {}
    for flag in ("false", "true"):
        cfgs = [tiny_config(f"seed={s}", SMALL, f"train.compile={flag}", "train.iterations=8",
                            "prior.kind=annealed", "prior.anneal_iters=8", out=f"{flag}{s}")
                for s in (0, 1)]  # fmt: skip
        counters.clear()
        results = SeedGroup(cfgs).run()
        graphs[flag] = dict(counters["stats"])
        assert all(r["status"] == "complete" for r in results)
        histories[flag] = [_history(c) for c in cfgs]
    assert graphs["true"]["unique_graphs"] == 1, graphs  # compiled once, for every prior
    for eager, compiled in zip(histories["false"], histories["true"], strict=True):
        assert [r["iteration"] for r in eager] == [r["iteration"] for r in compiled] == [4, 8]
        for re, rc in zip(eager, compiled, strict=True):
            assert rc["train_loss"] == pytest.approx(re["train_loss"], rel=1e-4)
            assert rc["train_elbo"] == pytest.approx(re["train_elbo"], rel=1e-4)


def test_stop_requested_during_an_evaluation_still_checkpoints_every_seed(
    tiny_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop that arrives while the group evaluates (a sync point without a checkpoint) is
    still lossless: every seed is saved at that iteration."""
    cfgs = [tiny_config(f"seed={s}", SMALL, "train.checkpoint_every=1000", out=f"g{s}")
            for s in (0, 1)]  # fmt: skip
    group = SeedGroup(cfgs)
    real = Trainer.record_evaluation

    def stop_while_evaluating(trainer, *args):  # noqa: ANN001, ANN002, ANN202
        group.stop_requested = True
        return real(trainer, *args)

    monkeypatch.setattr(Trainer, "record_evaluation", stop_while_evaluating)
    assert [r["status"] for r in group.run()] == ["partial", "partial"]
    for cfg in cfgs:
        assert load_checkpoint(Path(cfg.out_dir), config_hash(cfg))["iteration"] == 4
