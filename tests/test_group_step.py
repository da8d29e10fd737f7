"""`train.compile_step`: a seed group's whole step (loss, torch.func backward, clipping, Adam) in
one function equals the reference step (autograd backward, per-seed clipping, SeedAdam)."""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

import pytest
import torch

from bench import group_loop
from bench.config import config_hash, to_dict
from bench.group_loop import GroupLoop
from bench.group_step import WholeStep
from bench.group_update import VectorUpdate
from bench.run_folder import ATTEMPTS
from bench.seedgroup import SeedGroup
from bench.storage import read_json_lines
from bench.trainer import Trainer
from bench.worker import run_task
from tests.conftest import needs_mnist
from tests.group_checks import assert_same_ends, keep_group_loops

pytestmark = needs_mnist

SMALL = ["estimator.params.baseline_hidden=16", "train.grad_clip=1.0"]
CONCRETE = ["model.presence=concrete", "estimator.name=reparam", "train.grad_clip=1.0"]


def _loop(tiny_config, name: str, *overrides: str) -> GroupLoop:
    cfgs = [tiny_config(f"seed={s}", *overrides, out=f"{name}{s}") for s in (0, 1)]
    return GroupLoop(SeedGroup(cfgs), [0, 1])


def _run(loop: GroupLoop, n: int) -> list[torch.Tensor]:
    sums = []
    for _ in range(n):
        loop.iteration()
        sums.append(loop.sums.clone())
    return sums


@pytest.mark.parametrize("overrides", [SMALL, CONCRETE], ids=["nvil", "concrete"])
def test_whole_step_equals_the_reference_step(tiny_config, overrides, monkeypatch) -> None:
    """Eager whole step (the compiled one is the same function): over 5 iterations every
    logged sum (loss, ELBO, NVIL's baseline error...) equals the reference loop's, and so do
    the model's parameters and Adam moments.

    NVIL's baseline parameters are compared through their outputs (the logged baseline error)
    only: at its learning rate of 0.1, Adam turns gradients at rounding level (~1e-9 against a
    largest of ~10, pixels almost never on) into steps of up to ~lr * m / eps, so any change of
    summation order (dense or sparse product, autograd or torch.func) moves those weights by up
    to ~1e-3 within a few steps, the reference's own sparse and dense paths included."""
    monkeypatch.setattr(group_loop, "WholeStep", partial(_eager_whole_step))
    reference = _loop(tiny_config, "ref", *overrides, "train.eval_every=100")
    whole = _loop(tiny_config, "whole", *overrides, "train.eval_every=100",
                  "train.compile_step=true")  # fmt: skip
    sums_ref, sums_whole = _run(reference, 5), _run(whole, 5)
    assert isinstance(whole.whole, WholeStep) and whole.whole_ran and not whole.whole_failed
    assert whole.stepped and set(whole.stepped) <= set(whole.params)
    for a, b in zip(sums_ref, sums_whole, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    if "estimator.params.baseline_hidden=16" in overrides:
        assert "baseline_mse" in whole.log_keys
    compared = [n for n in reference.params if not n.startswith("estimator.baseline")]
    assert any(n.startswith("model.") for n in compared)
    for name in compared:
        p, q = reference.params[name], whole.params[name]
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
        ref_state, got_state = reference.optimiser.state[p], whole.optimiser.state[q]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(got_state[key], ref_state[key], rtol=1e-4, atol=1e-7)


def _eager_whole_step(*args, compiled: bool, **kwargs) -> WholeStep:  # noqa: ANN002, ANN003
    return WholeStep(*args, compiled=False, **kwargs)


def test_whole_step_freezes_a_seed_whose_loss_is_not_finite(tiny_config, monkeypatch) -> None:
    """The divergence rule holds inside the one function: seed 0's NaN loss at the third step
    freezes it (parameters and moments as they were), seed 1 trains on."""
    monkeypatch.setattr(group_loop, "WholeStep", partial(_eager_whole_step))
    loop = _loop(tiny_config, "nan", *SMALL, "train.eval_every=100", "train.compile_step=true")
    _run(loop, 2)
    before = {n: p.detach().clone() for n, p in loop.params.items()}
    real = loop.group.functional_loss

    def poisoned(template):  # noqa: ANN001, ANN202
        loss = real(template)

        def seed_loss(params, buffers, x, noises, prior):  # noqa: ANN001, ANN202
            value, logs = loss(params, buffers, x, noises, prior)
            return value + torch.where(x.sum() == first_sum, float("nan"), 0.0), logs

        return seed_loss

    first_sum = loop.batch(loop.it)[0].sum()
    loop.whole = None  # rebuilt with the poisoned loss
    monkeypatch.setattr(loop.group, "functional_loss", poisoned)
    _run(loop, 1)
    assert loop.bad_at.tolist() == [2, -1]
    for name, p in loop.params.items():
        torch.testing.assert_close(p[0], before[name][0], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(p[1], before[n][1]) for n, p in loop.params.items())


def test_compile_step_is_hashed_only_when_set(tiny_config) -> None:
    base = tiny_config()
    assert config_hash(tiny_config("train.compile_step=false")) == config_hash(base)
    assert config_hash(tiny_config("train.compile_step=true")) != config_hash(base)


def test_a_compile_failure_falls_back_to_the_step_in_parts(
    tiny_config, monkeypatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("no C++ compiler, say")

    monkeypatch.setattr(group_loop, "WholeStep", broken)
    loop = _loop(tiny_config, "fail", *SMALL, "train.eval_every=100", "train.compile_step=true")
    reference = _loop(tiny_config, "ref", *SMALL, "train.eval_every=100")
    got, want = _run(loop, 3), _run(reference, 3)
    assert loop.whole_failed and "train.compile_step failed" in caplog.text
    torch.testing.assert_close(got[-1], want[-1], rtol=1e-6, atol=1e-6)


def test_after_a_compile_failure_the_loss_is_compiled_as_without_the_switch(
    tiny_config, monkeypatch
) -> None:
    """train.compile=true with compile_step: the one reference step before the whole step
    stays eager; once the whole step has failed, the step in parts compiles its loss as it
    does without compile_step. (torch.compile stubbed: which calls compile is the question.)"""
    compiled: list[object] = []

    def fake_compile(fn, **kwargs):  # noqa: ANN001, ANN003, ANN202
        compiled.append(fn)
        return fn

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("no C++ compiler, say")

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(group_loop, "WholeStep", broken)
    loop = _loop(tiny_config, "c", *SMALL, "train.eval_every=100", "train.compile=true",
                 "train.compile_step=true")  # fmt: skip
    _run(loop, 1)
    assert compiled == [] and loop.compiled is None  # the reference step: eager
    _run(loop, 2)  # the whole step fails to build at the second; its parts run compiled
    assert loop.whole_failed and compiled == [loop.loss_fn] and loop.compiled is loop.loss_fn


@pytest.mark.slow
@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
    reason="torch.compile on CPU needs a C++ compiler (c++, g++ or clang++); none on PATH",
)
def test_group_with_compiled_whole_step_equals_separate_runs(tiny_config) -> None:
    """train.compile_step=true, compiled for real: the seeds end where their separate runs end,
    to float tolerance."""
    seeds = [0, 1]
    alone = [Trainer(tiny_config(f"seed={s}", *SMALL, out=f"alone{s}")).run() for s in seeds]
    cfgs = [tiny_config(f"seed={s}", *SMALL, "train.compile_step=true", out=f"g{s}")
            for s in seeds]  # fmt: skip
    built: list[WholeStep] = []
    real = group_loop.WholeStep

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        built.append(real(*args, **kwargs))
        return built[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(group_loop, "WholeStep", spy)
        together = SeedGroup(cfgs).run()
    assert len(built) == 1 and built[0].compiled
    alone_dirs = [tiny_config(out=f"alone{s}").out_dir for s in seeds]
    assert_same_ends(alone, together, alone_dirs, [c.out_dir for c in cfgs])


def _task(cfg) -> dict:  # noqa: ANN001
    return {"experiment": "count", "variant": "air_nvil_fixed", "seed": cfg.seed,
            "config_hash": config_hash(cfg), "run_dir": cfg.out_dir, "config": to_dict(cfg),
            "stop_grace_s": 30}  # fmt: skip


def test_a_single_run_with_compile_step_trains_as_a_group_of_one(
    tiny_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run of its own (a worker task, not a group task) with train.compile_step trains in
    the group loop as a group of one, its step the whole-step function, and ends where the
    same run without it ends; its attempt record still has its iterations."""
    monkeypatch.setattr(group_loop, "WholeStep", partial(_eager_whole_step))
    loops = keep_group_loops(monkeypatch)
    plain = tiny_config("seed=3", *SMALL, out="plain")
    whole = tiny_config("seed=3", *SMALL, "train.compile_step=true", out="whole")
    want = run_task(_task(plain))
    assert loops == []  # without the switch: the single-run loop
    got = run_task(_task(whole))
    assert got["status"] == want["status"] == "complete"
    assert len(loops) == 1 and loops[0].members == [0] and loops[0].whole_ran
    assert_same_ends([want], [got], [plain.out_dir], [whole.out_dir])
    (attempt,) = read_json_lines(Path(whole.out_dir) / ATTEMPTS)
    assert attempt["start_iteration"] == 0 and attempt["end_iteration"] == 12


def test_the_step_functions_see_the_same_parameter_tensors_every_call(
    tiny_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WholeStep and VectorUpdate hand their function the very same views of the parameters
    (and Adam's state) at every call, which update the parameters in place: what lets a CUDA
    graph treat them as static addresses."""
    monkeypatch.setattr(group_loop, "WholeStep", partial(_eager_whole_step))
    monkeypatch.setattr(group_loop, "VectorUpdate", partial(_eager_update))
    for switch in ("train.compile_step=true", "train.compile_update=true"):
        loop = _loop(tiny_config, switch[6:18], *SMALL, "train.eval_every=100", switch)
        _run(loop, 2)  # the whole step is built at the second iteration
        step = loop.whole if loop.whole is not None else loop.update
        seen: list[list[torch.Tensor]] = []  # the objects themselves: ids could be reused
        real = step._fn

        def spy(*args, _real=real, _seen=seen):  # noqa: ANN002, ANN202
            first = args[0]
            tensors = list(first.values()) if isinstance(first, dict) else first
            _seen.append([*tensors, *args[2]])
            return _real(*args)

        step._fn = spy
        before = {n: p.detach().clone() for n, p in loop.params.items()}
        _run(loop, 2)
        assert len(seen) == 2 and len(seen[0]) == len(seen[1]) > 0, switch
        assert all(a is b for a, b in zip(seen[0], seen[1], strict=True)), switch
        moved = [n for n, p in loop.params.items() if not torch.equal(p, before[n])]
        assert moved, switch  # the in-place updates reached the parameters


def _eager_update(*args, compiled: bool) -> VectorUpdate:  # noqa: ANN002
    return VectorUpdate(*args, compiled=False)
