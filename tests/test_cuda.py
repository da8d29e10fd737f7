"""The GPU code paths on CUDA (issue 12), each against its reference on the same device: seed
groups (eager and with counter noise, compiled loss and compiled update), counter noise against
the CPU's, the compiled clip + Adam against `SeedAdam`, the vectorised final evaluation.

They run only where CUDA is available (`tools/gpu_check.sh` runs them on a GPU machine) and are
skipped elsewhere. `AIR_CUDA_TESTS_DEVICE=cpu` runs the same code on the CPU instead: a dry run
of this file (`tools/gpu_check.sh --dry-run-cpu` does it), which proves nothing about a GPU
(the CUDA-against-CPU comparisons then compare the CPU with itself).

Tolerances. The references here are the CPU tests' (tests/test_seedgroup.py, test_counter_noise,
test_group_update, test_group_final_eval), which hold at rel 1e-5 on the CPU. On a GPU the sums
run in other orders (batched against single matrix products under vmap, other reduction trees,
inductor's fused kernels), so float32 results are compared at rel 1e-4 (metrics, weights after
12 Adam steps), abs 1e-5 near 0. That is a first guess, to be confirmed on the device: a
failure prints the largest difference found, which is what to look at before loosening it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from bench import group_loop
from bench.counter_noise import CounterNoise, fmix32, hash_bits, uniforms_from_bits
from bench.group_loop import GroupLoop
from bench.group_update import VectorUpdate
from bench.model_file import load_final_model
from bench.seedgroup import SeedGroup
from bench.trainer import Trainer
from tests.conftest import needs_mnist
from tests.group_checks import keep_group_loops, spy_vectorised_final
from tests.test_group_final_eval import FINAL_CASES
from tests.test_group_update import SEEDS, _grads, _optimiser, _reference_step, _stacked
from tests.test_seedgroup import _history

#: The device the tests run on: "cuda" (or "cuda:N"), or "cpu" for a dry run of this file.
DEVICE = os.environ.get("AIR_CUDA_TESTS_DEVICE", "cuda")
DRY_RUN = DEVICE == "cpu"

pytestmark = pytest.mark.skipif(
    not DRY_RUN and not torch.cuda.is_available(),
    reason="no CUDA device: torch.cuda.is_available() is False, and these tests check the GPU "
    "code paths on a GPU (tools/gpu_check.sh runs them there; AIR_CUDA_TESTS_DEVICE=cpu "
    "dry-runs them on the CPU)",
)

#: First guess for float32 on a GPU (see the module docstring); to be confirmed on the device.
RTOL, ATOL = 1e-4, 1e-5
SMALL = "estimator.params.baseline_hidden=16"
STEPS, WHAT = 3, 8
#: Keys of an evaluation that are not numbers to compare (wall clock, per-count tables).
NOT_COMPARED = {"wall_time", "confusion", "evaluation_s", "final_evaluation_s"}
#: Log lines that mean a GPU path fell back to its eager or per-seed reference.
FALLBACKS = (
    "train.compile failed",
    "train.compile_update failed",
    "train.compile_step failed",
    "vectorised evaluation failed",
    "vectorised final evaluation failed",
    "cannot be vectorised over seeds",
)

needs_compiler_on_cpu = pytest.mark.skipif(
    DRY_RUN and not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
    reason="dry run on the CPU: torch.compile there needs a C++ compiler; none on PATH",
)


def _close(want: dict, got: dict, where: str) -> None:
    """Every numeric field of two evaluations equal to RTOL (ATOL near 0); others exactly."""
    for key in want.keys() - NOT_COMPARED:
        a, b = want[key], got[key]
        if isinstance(a, float) or isinstance(b, float):
            assert b == pytest.approx(a, rel=RTOL, abs=ATOL), f"{where}: {key}"
        else:
            assert a == b, f"{where}: {key}"


def _no_fallback(caplog: pytest.LogCaptureFixture) -> None:
    said = [line for line in caplog.text.splitlines() if any(f in line for f in FALLBACKS)]
    assert not said, "a GPU path fell back to its reference:\n" + "\n".join(said)


# ---------------------------------------------------------------------------- counter noise
def test_counter_noise_uniforms_are_bit_identical_to_the_cpus() -> None:
    """bench/counter_noise.py: the integer hash and the uniforms are exact, so CUDA draws the
    CPU's numbers bit for bit; the normals go through float64 ndtri: equal within 1e-6."""
    seeds = [0, 3, 11, 2**33 + 5]  # the last needs all 64 bits of a seed
    cpu, dev = CounterNoise(seeds, "cpu"), CounterNoise(seeds, DEVICE)
    assert dev.keys.device.type == torch.device(DEVICE).type
    assert torch.equal(dev.keys.cpu(), cpu.keys)
    g = torch.Generator().manual_seed(0)
    xs = torch.cat([torch.tensor([0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]),
                    torch.randint(0, 2**32, (4096,), generator=g)])  # fmt: skip
    assert torch.equal(fmix32(xs.to(DEVICE)).cpu(), fmix32(xs))
    counters = torch.randint(0, 2**32, (8192,), generator=g)
    for iterations in (torch.tensor([0, 1, 2**31, 2**32 - 1]), torch.tensor([7, 7, 123456, 0])):
        bits = hash_bits(dev.keys, iterations.to(DEVICE), counters.to(DEVICE))
        want = hash_bits(cpu.keys, iterations, counters)
        assert torch.equal(bits.cpu(), want)
        assert torch.equal(uniforms_from_bits(bits).cpu(), uniforms_from_bits(want))
    for iterations in (0, 37, 2**32 - 1, torch.tensor([5, 0, 123456, 2**31])):
        for first_draw, batches in ((0, [16, 64]), (2, [500])):
            got = dev.draws(iterations, batches, STEPS, WHAT, first_draw=first_draw)
            want = cpu.draws(iterations, batches, STEPS, WHAT, first_draw=first_draw)
            for g_draw, w_draw in zip(got, want, strict=True):
                assert g_draw.pres.device.type == torch.device(DEVICE).type
                assert torch.equal(g_draw.pres.cpu(), w_draw.pres), (iterations, first_draw)
                for name in ("where", "what"):
                    where = f"{name} at {iterations}, draw {first_draw}"
                    got_t, want_t = getattr(g_draw, name).cpu(), getattr(w_draw, name)
                    torch.testing.assert_close(got_t, want_t, rtol=0, atol=1e-6, msg=where)


# ---------------------------------------------------------------------------- clip + Adam
@needs_compiler_on_cpu
def test_compiled_vector_update_equals_seed_adam() -> None:
    """As tests/test_group_update.py's first test, on the device: `VectorUpdate` compiled (on
    CUDA in mode "reduce-overhead") against the eager `SeedAdam` (torch's fused Adam per seed)
    on the same device, and both against `SeedAdam` on the CPU."""
    runs = {name: _stacked(0, dev) for name, dev in
            (("ref", DEVICE), ("new", DEVICE), ("cpu", "cpu"))}  # fmt: skip
    opts = {name: _optimiser(params) for name, params in runs.items()}
    update = VectorUpdate(opts["new"], 1.5, compiled=True)
    frozen = {name: torch.zeros(SEEDS, dtype=torch.bool, device=runs[name][0].device)
              for name in runs}  # fmt: skip
    for step in range(6):
        bad = 1 if step == 3 else None  # seed 1's gradient is NaN at step 3: frozen from then on
        losses = torch.tensor([1.0, 2.0, 3.0])
        norms = {}
        for name in ("ref", "cpu"):
            _grads(step, runs[name], bad)
            on = losses.to(runs[name][0].device)
            norms[name], frozen[name] = _reference_step(runs[name], opts[name], on, frozen[name])
        _grads(step, runs["new"], bad)
        norms["new"], frozen["new"] = update(losses.to(DEVICE), frozen["new"])
        live = ~frozen["ref"]
        torch.testing.assert_close(norms["new"][live], norms["ref"][live])
        assert torch.equal(frozen["new"], frozen["ref"])
        assert torch.equal(frozen["ref"].cpu(), frozen["cpu"])
    assert frozen["new"].tolist() == [False, True, False]
    for p_ref, p_new, p_cpu in zip(runs["ref"], runs["new"], runs["cpu"], strict=True):
        assert p_new.device.type == torch.device(DEVICE).type
        torch.testing.assert_close(p_new, p_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p_ref.detach().cpu(), p_cpu.detach(), rtol=1e-5, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opts["new"].state[p_new][key],
                                       opts["ref"].state[p_ref][key])  # fmt: skip
    # the frozen seed kept its step count (3 steps before its bad one) and moved no further
    assert opts["new"].state[runs["new"][0]]["step"].tolist() == [6.0, 3.0, 6.0]


# ---------------------------------------------------------------------------- seed groups
EAGER = [SMALL]
#: The gpu profile's settings (configs/profiles/gpu.yaml), with clipping on so that the compiled
#: update clips. The separate runs stay eager (`train.compile=false`): a compiled single run
#: equals an eager one (tests/test_counter_noise.py, on the CPU), and each compilation costs
#: ~20 s, so the compiled thing checked here is the group's loss and update.
COMPILED = [SMALL, "train.noise=counter", "train.grad_clip=1.0", "train.compile_update=true"]


@pytest.mark.skipif(DRY_RUN, reason="dry run on the CPU: CUDA graphs exist only on CUDA")
@needs_mnist
@pytest.mark.parametrize("whole_step", [False, True], ids=["compiled-update", "whole-step"])
def test_the_compiled_step_is_captured_as_a_cuda_graph(tiny_config, whole_step: bool) -> None:  # noqa: ANN001
    """Mode "reduce-overhead" captures the compiled update (or the whole step) as a CUDA graph:
    inductor skipped none (its parameters and Adam state are static addresses). A failure's
    log has inductor's "skipping cudagraphs due to ..." line: the reason."""
    from torch._dynamo.utils import counters

    extra = ["train.compile_step=true"] if whole_step else []
    cfgs = [tiny_config(f"seed={s}", f"train.device={DEVICE}", *COMPILED, "train.compile=true",
                        *extra, "train.eval_every=100", out=f"cg{s}") for s in (0, 1)]  # fmt: skip
    before = counters["inductor"]["cudagraph_skips"]
    loop = GroupLoop(SeedGroup(cfgs), [0, 1])
    for _ in range(5):
        loop.iteration()
    if whole_step:
        assert loop.whole is not None and loop.whole.compiled and loop.whole_ran
    else:
        assert loop.update is not None and loop.update.compiled and loop.update_ran
    assert counters["inductor"]["cudagraph_skips"] == before


@needs_mnist
@pytest.mark.parametrize(
    ("seeds", "group_overrides", "alone_overrides"),
    [
        pytest.param((0, 1, 2), EAGER, EAGER, id="eager-torch-noise-3-seeds"),
        pytest.param((3, 4), [*COMPILED, "train.compile=true"], [*COMPILED, "train.compile=false"],
                     id="counter-compiled-2-seeds", marks=needs_compiler_on_cpu),
        pytest.param((5, 6), [*COMPILED, "train.compile=true", "train.compile_step=true"],
                     [*COMPILED, "train.compile=false"], id="whole-step-compiled-2-seeds",
                     marks=needs_compiler_on_cpu),
    ],
)  # fmt: skip
def test_group_on_the_device_equals_each_seeds_own_run(
    tiny_config,  # noqa: ANN001
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    seeds: tuple[int, ...],
    group_overrides: list[str],
    alone_overrides: list[str],
) -> None:
    """A seed group trained on the device (vectorised loss, on-device loop, vectorised periodic
    and final evaluations) ends where each seed's separate run on the device ends: the same
    metrics at every evaluation, the same final metrics and weights, to RTOL."""
    device = f"train.device={DEVICE}"
    monkeypatch.setattr(GroupLoop, "vector_eval_on_cpu", True)  # the GPU's rule, for a dry run
    evaluated: list[int] = []
    real_evaluate = group_loop.evaluate_seeds

    def vectorised_evaluation(loop, js):  # noqa: ANN001, ANN202
        evaluated.append(loop.it)
        return real_evaluate(loop, js)

    monkeypatch.setattr(group_loop, "evaluate_seeds", vectorised_evaluation)
    loops = keep_group_loops(monkeypatch)
    alone = [tiny_config(f"seed={s}", device, *alone_overrides, out=f"alone{s}") for s in seeds]
    together = [tiny_config(f"seed={s}", device, *group_overrides, out=f"group{s}")
                for s in seeds]  # fmt: skip
    results_alone = [Trainer(c).run() for c in alone]
    group = SeedGroup(together)
    assert group._vectorisable()
    results_group = group.run()
    _no_fallback(caplog)
    assert len(loops) == 1 and loops[0].device.type == torch.device(DEVICE).type
    loop = loops[0]
    if "train.compile_step=true" in group_overrides:  # one graph: loss, backward, update
        assert loop.whole is not None and loop.whole.compiled and loop.whole_ran
    elif "train.compile=true" in group_overrides:
        assert loop.compiled is not None and not loop.compile_failed
        assert loop.update is not None and loop.update.compiled and loop.update_ran
    assert evaluated == [4, 8, 12]  # the periodic evaluations were the vectorised ones
    for s, a, g, ca, cg in zip(seeds, results_alone, results_group, alone, together, strict=True):
        assert a["status"] == g["status"] == "complete", (a["status"], g["status"])
        assert a["iterations"] == g["iterations"] == 12
        ha, hg = _history(ca), _history(cg)
        assert [r["iteration"] for r in ha] == [r["iteration"] for r in hg] == [4, 8, 12]
        for ra, rg in zip(ha, hg, strict=True):
            _close(ra, rg, f"seed {s}, iteration {ra['iteration']}")
        _close(a["final"], g["final"], f"seed {s}, final")
        mine = load_final_model(Path(cg.out_dir))["model"]
        theirs = load_final_model(Path(ca.out_dir))["model"]
        assert mine.keys() == theirs.keys()
        for name, w in theirs.items():
            torch.testing.assert_close(mine[name], w, rtol=RTOL, atol=ATOL,
                                       msg=f"seed {s}: {name}")  # fmt: skip
    # Different seeds really differ: the group did not train one seed several times.
    assert len({r["final"]["elbo"] for r in results_group}) == len(seeds)


# ---------------------------------------------------------------------------- final evaluation
@needs_mnist
@pytest.mark.parametrize(
    ("seeds", "overrides"),
    FINAL_CASES,
    ids=["nvil-3-seeds", "concrete-2-seeds"],
)
def test_group_final_evaluation_on_the_device_equals_each_seeds_own(
    tiny_config,  # noqa: ANN001
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    seeds: tuple[int, ...],
    overrides: list[str],
) -> None:
    """As tests/test_group_final_eval.py's main test, on the device: the group's final
    evaluation (main and reference protocols) is the vectorised one, in chunks, and equals each
    seed's separate run's."""
    overrides = [f"train.device={DEVICE}", *overrides]
    calls = spy_vectorised_final(monkeypatch)  # the GPU's rule; chunks of 2 seeds
    alone = [Trainer(tiny_config(f"seed={s}", *overrides, out=f"a{s}")).run() for s in seeds]
    cfgs = [tiny_config(f"seed={s}", *overrides, out=f"g{s}") for s in seeds]
    together = SeedGroup(cfgs).run()
    _no_fallback(caplog)
    ev, protocols = cfgs[0].eval, cfgs[0].data.reference_protocols
    assert len(calls) == 1 + len(protocols), "the final evaluation was not the vectorised one"
    for n, args, _ in calls:
        assert n == len(seeds) and args == (ev.final_images, ev.iw_samples, ev.iw_images)
    for s, (a, g) in enumerate(zip(alone, together, strict=True)):
        assert g["final"] is calls[0][2][s]  # the result holds the vectorised metrics
        pairs = [("final", a["final"], g["final"])]
        for name, call in zip(protocols, calls[1:], strict=True):
            assert g["final_protocols"][name] is call[2][s]
            pairs.append((name, a["final_protocols"][name], g["final_protocols"][name]))
        assert g["final_protocols"].keys() == a["final_protocols"].keys() == set(protocols)
        for name, want, got in pairs:
            _close(want, got, f"seed {seeds[s]}, {name}")
    assert together[0]["final"]["iw_bound"] != together[1]["final"]["iw_bound"]
