"""The vectorised clip + Adam of a seed group (bench/group_update.py) against the reference
(`clip_per_seed` then `SeedAdam`, torch's fused Adam once per seed)."""

from __future__ import annotations

import shutil

import pytest
import torch

from bench.config import config_hash
from bench.group_update import SeedAdam, VectorUpdate, clip_per_seed
from bench.seedgroup import SeedGroup
from bench.trainer import Trainer
from tests.conftest import needs_mnist
from tests.group_checks import assert_same_ends

SEEDS = 3


def _stacked(seed: int, device: str = "cpu") -> list[torch.Tensor]:
    """Stacked parameters of SEEDS seeds, the same values on every device (drawn on the CPU);
    tests/test_cuda.py uses these helpers too."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(SEEDS, 7, 5), (SEEDS, 5), (SEEDS, 11)]
    return [torch.randn(s, generator=g).to(device).requires_grad_() for s in shapes]


def _optimiser(params: list[torch.Tensor]) -> SeedAdam:
    groups = [
        {"params": params[:2], "lr": 1e-2, "name": "model"},
        {"params": params[2:], "lr": 0.1, "name": "baseline"},
    ]
    return SeedAdam(groups, SEEDS)


def _grads(step: int, params: list[torch.Tensor], bad_seed: int | None) -> None:
    """The same gradients on every device (drawn on the CPU), a NaN for `bad_seed`."""
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        grad = torch.randn(p.shape, generator=g) * (1 + step)
        if bad_seed is not None:
            grad[bad_seed] = float("nan")
        p.grad = grad.to(p.device)


def _reference_step(
    params: list[torch.Tensor], opt: SeedAdam, losses: torch.Tensor, frozen: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    norms = clip_per_seed(params, 1.5)
    frozen = frozen | ~(torch.isfinite(losses) & torch.isfinite(norms))
    opt.step(frozen.to(torch.float32))
    return norms, frozen


@pytest.mark.parametrize("compiled", [False, True])
def test_vector_update_equals_seed_adam(compiled: bool) -> None:
    ref, new = _stacked(0), _stacked(0)
    ref_opt, new_opt = _optimiser(ref), _optimiser(new)
    update = VectorUpdate(new_opt, 1.5, compiled=compiled)
    frozen_ref = torch.zeros(SEEDS, dtype=torch.bool)
    frozen_new = frozen_ref.clone()
    for step in range(6):
        bad = 1 if step == 3 else None  # seed 1's gradient is NaN at step 3: frozen from then on
        losses = torch.tensor([1.0, 2.0, 3.0])
        _grads(step, ref, bad)
        _grads(step, new, bad)
        norms_ref, frozen_ref = _reference_step(ref, ref_opt, losses, frozen_ref)
        norms_new, frozen_new = update(losses, frozen_new)
        torch.testing.assert_close(norms_new[~frozen_ref], norms_ref[~frozen_ref])
        assert torch.equal(frozen_new, frozen_ref)
    assert frozen_new.tolist() == [False, True, False]
    for p_ref, p_new in zip(ref, new, strict=True):
        torch.testing.assert_close(p_new, p_ref, rtol=1e-5, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(new_opt.state[p_new][key], ref_opt.state[p_ref][key])
    # the frozen seed kept its step count (3 steps before its bad one) and moved no further
    assert new_opt.state[new[0]]["step"].tolist() == [6.0, 3.0, 6.0]


def test_vector_update_freezes_on_a_non_finite_loss() -> None:
    params = _stacked(1)
    opt = _optimiser(params)
    before = [p.detach().clone() for p in params]
    _grads(0, params, None)
    norms, frozen = VectorUpdate(opt, None, compiled=False)(
        torch.tensor([1.0, float("inf"), 0.5]), torch.zeros(SEEDS, dtype=torch.bool)
    )
    assert frozen.tolist() == [False, True, False]
    assert torch.isfinite(norms).all()
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.detach()[1], b[1])  # the frozen seed: untouched
        assert not torch.equal(p.detach()[0], b[0])  # the others stepped


def test_vector_update_rejects_adam_options_it_does_not_implement() -> None:
    params = _stacked(2)
    opt = SeedAdam([{"params": params, "lr": 1e-3, "weight_decay": 0.1}], SEEDS)
    with pytest.raises(ValueError, match="weight_decay"):
        VectorUpdate(opt, 1.0, compiled=False)


@needs_mnist
@pytest.mark.slow
@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
    reason="torch.compile on CPU needs a C++ compiler (c++, g++ or clang++); none on PATH",
)
def test_group_with_compiled_update_equals_separate_runs(tiny_config) -> None:
    """train.compile_update=true: the group's seeds end where their separate runs (torch's
    Adam, clip_grad_norm_) end, to float tolerance, and the compiled update really ran."""
    small = ["estimator.params.baseline_hidden=16", "train.grad_clip=1.0"]
    seeds = [0, 1]
    alone = [Trainer(tiny_config(f"seed={s}", *small, out=f"alone{s}")).run() for s in seeds]
    cfgs = [tiny_config(f"seed={s}", *small, "train.compile_update=true", out=f"g{s}")
            for s in seeds]  # fmt: skip
    group = SeedGroup(cfgs)
    built: list[VectorUpdate] = []
    real_init = VectorUpdate.__init__

    def spy(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        real_init(self, *args, **kwargs)
        built.append(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(VectorUpdate, "__init__", spy)
        together = group.run()
    assert len(built) == 1 and built[0].compiled
    alone_dirs = [tiny_config(out=f"alone{s}").out_dir for s in seeds]
    assert_same_ends(alone, together, alone_dirs, [c.out_dir for c in cfgs])


def test_compile_update_is_hashed_only_when_set(tiny_config) -> None:
    base = tiny_config()
    assert config_hash(tiny_config("train.compile_update=false")) == config_hash(base)
    assert config_hash(tiny_config("train.compile_update=true")) != config_hash(base)


@needs_mnist
def test_a_compile_failure_falls_back_to_the_eager_update(
    tiny_config, caplog: pytest.LogCaptureFixture
) -> None:
    small = ["estimator.params.baseline_hidden=16", "train.iterations=4", "train.eval_every=4"]
    ref = SeedGroup([tiny_config(f"seed={s}", *small, out=f"r{s}") for s in (0, 1)]).run()
    cfgs = [tiny_config(f"seed={s}", *small, "train.compile_update=true", out=f"g{s}")
            for s in (0, 1)]  # fmt: skip

    def broken(self, *args):  # noqa: ANN001, ANN002, ANN202
        raise RuntimeError("no C++ compiler, say")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(VectorUpdate, "__call__", broken)
        got = SeedGroup(cfgs).run()
    assert "train.compile_update failed (RuntimeError: no C++ compiler, say)" in caplog.text
    for a, b in zip(ref, got, strict=True):
        assert b["status"] == "complete"
        assert b["final"]["elbo"] == pytest.approx(a["final"]["elbo"], rel=1e-6)
