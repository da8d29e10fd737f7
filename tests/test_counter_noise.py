"""Counter-based training noise (`train.noise: counter`, bench/counter_noise.py): its
statistics, its purity (same counter, same number, alone or in a group), and that a seed
trained in a group, alone, compiled or resumed sees the same noise."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from bench.config import ConfigError, config_hash, load_config
from bench.counter_noise import CounterNoise, TrainingNoise, fmix32, hash_bits, round_keys
from bench.seedgroup import SeedGroup
from bench.storage import read_json_lines
from bench.trainer import Trainer
from implementations.core.model import AIR, ModelConfig
from tests.conftest import needs_mnist

SMALL = "estimator.params.baseline_hidden=16"
STEPS, WHAT = 3, 8


def _fmix32_reference(h: int) -> int:
    """MurmurHash3's fmix32 on Python integers (arbitrary precision, masked by hand)."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def _normal_cdf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def _ks(sample: torch.Tensor, cdf) -> float:  # noqa: ANN001
    """Kolmogorov-Smirnov distance of a 1-d sample from a continuous CDF."""
    x = sample.flatten().double().sort().values
    n = len(x)
    f = cdf(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - f, f - (i - 1) / n).max())


# ---------------------------------------------------------------------------- the hash
def test_fmix32_is_murmur3s_finaliser_without_overflow() -> None:
    xs = torch.tensor([0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 123456789, 0xDEADBEEF])
    xs = torch.cat(
        [xs, torch.randint(0, 2**32, (500,), generator=torch.Generator().manual_seed(0))]
    )
    got = fmix32(xs)
    assert got.dtype == torch.int64 and int(got.min()) >= 0 and int(got.max()) < 2**32
    assert got.tolist() == [_fmix32_reference(int(x)) for x in xs]


def test_distinct_counters_give_distinct_64_bit_outputs_per_seed() -> None:
    """Sanity: 200k counters of one seed (4 iterations x 50k elements) give no repeated
    32-bit hash beyond what chance gives (birthday: ~4.7 expected pairs)."""
    keys = round_keys(torch.tensor([7]))
    bits = hash_bits(keys.expand(4, -1), torch.arange(4), torch.arange(50_000)).flatten()
    repeats = len(bits) - len(torch.unique(bits))
    assert repeats <= 20, repeats


# ---------------------------------------------------------------------------- statistics
@pytest.fixture(scope="module")
def sample() -> list:
    """8 seeds x 2 iterations x 2 draws (batch 512) of uniforms and normals."""
    noise = CounterNoise(list(range(8)), "cpu")
    return [noise.draws(it, [512, 512], STEPS, WHAT) for it in (0, 1)]


def test_uniforms_are_uniform_on_the_open_interval(sample: list) -> None:
    u = torch.cat([d.pres.flatten() for draws in sample for d in draws]).double()  # 49k
    n = len(u)
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 4 * math.sqrt(1 / 12 / n)
    assert abs(float(u.std()) - math.sqrt(1 / 12)) < 0.005
    assert _ks(u, lambda x: x) < 1.63 / math.sqrt(n)  # KS at the 1 % level
    # Every one of 64 bins gets its share (chi-square, 63 dof: 99.9 % quantile ~ 103).
    counts = torch.histc(u, bins=64, min=0.0, max=1.0)
    expected = n / 64
    assert float(((counts - expected) ** 2 / expected).sum()) < 103
    # Low bits are as random as high ones (a weak hash often fails here).
    m = (u * 2**24 - 1) / 2  # back to the 23-bit integers
    low = torch.remainder(m, 2).mean()
    assert abs(float(low) - 0.5) < 4 * math.sqrt(0.25 / n)


def test_normals_are_standard_normal(sample: list) -> None:
    z = torch.cat([t.flatten() for draws in sample for d in draws for t in (d.where, d.what)])
    z = z.double()  # 8 seeds x 2 its x 2 draws x 3 steps x 512 x 11: 540k
    n = len(z)
    assert abs(float(z.mean())) < 4 / math.sqrt(n)
    assert abs(float(z.std()) - 1.0) < 4 * math.sqrt(0.5 / n)
    assert abs(float((z**3).mean())) < 4 * math.sqrt(15 / n)  # skewness
    assert abs(float((z**4).mean()) - 3.0) < 4 * math.sqrt(96 / n)  # kurtosis
    assert _ks(z, _normal_cdf) < 1.63 / math.sqrt(n)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_seeds_iterations_draws_tensors_and_neighbours_are_independent(sample: list) -> None:
    """Correlations between noise that differs in one coordinate of the counter only: the
    seed (including neighbouring seeds), the iteration, the draw, the tensor, the element.
    A hash that ignored a coordinate (or mixed it weakly) gives ~1 (or >> 1/sqrt(n))."""
    (d0, d1), (e0, _) = sample
    n = d0.what[0].numel()  # 12k per seed
    bound = 5 / math.sqrt(n)
    pairs = {
        "seed 0 vs seed 1": (d0.what[0], d0.what[1]),
        "seed 1 vs seed 2": (d0.pres[1], d0.pres[2]),
        "iteration 0 vs 1": (d0.what[3], e0.what[3]),
        "draw 0 vs draw 1": (d0.what[4], d1.what[4]),
        "where vs what": (d0.where[5].flatten(), d0.what[5].flatten()[: d0.where[5].numel()]),
        "pres vs where": (d0.pres[6].flatten(), d0.where[6].flatten()[: d0.pres[6].numel()]),
        "neighbouring elements": (d0.what[7].flatten()[:-1], d0.what[7].flatten()[1:]),
    }
    for name, (a, b) in pairs.items():
        assert not torch.equal(a, b), name
        assert abs(_corr(a, b)) < max(bound, 5 / math.sqrt(a.numel())), name
    # Seeds 2^32 apart are different seeds (all 64 bits of a seed count).
    far = CounterNoise([5, 5 + 2**32], "cpu").draws(0, [256], STEPS, WHAT)[0]
    assert abs(_corr(far.what[0], far.what[1])) < 5 / math.sqrt(far.what[0].numel())


# ---------------------------------------------------------------------------- purity
def test_same_seed_same_noise_alone_and_inside_a_group_of_three() -> None:
    batches = [16, 48]
    group = CounterNoise([11, 4, 9], "cpu").draws(37, batches, STEPS, WHAT)
    alone = CounterNoise([4], "cpu").draws(37, batches, STEPS, WHAT)
    again = CounterNoise([4], "cpu").draws(torch.tensor([37]), batches, STEPS, WHAT)
    for g, a, b in zip(group, alone, again, strict=True):
        for name in ("pres", "where", "what"):
            assert torch.equal(getattr(g, name)[1], getattr(a, name)[0]), name
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    # One draw at a time (a single run's model asks for them so) = all draws in one call.
    second = CounterNoise([4], "cpu").draws(37, [48], STEPS, WHAT, first_draw=1)[0]
    assert torch.equal(second.what, alone[1].what) and torch.equal(second.pres, alone[1].pres)
    # Per-seed iterations: seed 9 at iteration 36 is its own iteration 36.
    mixed = CounterNoise([11, 9], "cpu").draws(torch.tensor([37, 36]), [16], STEPS, WHAT)[0]
    own = CounterNoise([9], "cpu").draws(36, [16], STEPS, WHAT)[0]
    assert torch.equal(mixed.what[1], own.what[0])
    assert not torch.equal(mixed.what[1], group[0].what[2])  # iteration 37 differs


def test_training_noise_hook_draws_counter_noise_only_while_training() -> None:
    model = AIR(ModelConfig(lstm_hidden=8, predict_hidden=8, encoder_hidden=8, decoder_hidden=8,
                            z_what_dim=WHAT, canvas=20))  # fmt: skip
    hook = TrainingNoise(model, seed=3)
    with hook.at(5):
        first = model.draw_noise(4, torch.device("cpu"), torch.float32)
        second = model.draw_noise(4, torch.device("cpu"), torch.float32)
    expected = CounterNoise([3], "cpu").draws(5, [4, 4], model.cfg.max_steps, WHAT)
    assert torch.equal(first.what, expected[0].what[0])
    assert torch.equal(second.where, expected[1].where[0])
    # Outside training (evaluation): torch's seeded stream, as before.
    torch.manual_seed(0)
    evaluation = model.draw_noise(4, torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    assert torch.equal(evaluation.what, AIR.draw_noise(model, 4, torch.device("cpu"),
                                                       torch.float32).what)  # fmt: skip


# ---------------------------------------------------------------------------- config
def test_default_is_torch_and_changes_no_hash() -> None:
    assert load_config().train.noise == "torch"
    # Hashes of these configs before the field existed (commit 47f18f8).
    assert config_hash(load_config()) == "6e7e0790ba"
    assert config_hash(load_config(["configs/smoke.yaml"])) == "443c35530f"
    assert config_hash(load_config(["configs/nvil_fixed_cpu.yaml"])) == "f6231004dd"
    assert config_hash(load_config(overrides=["train.noise=torch"])) == "6e7e0790ba"
    assert config_hash(load_config(overrides=["train.noise=counter"])) != "6e7e0790ba"


def test_bad_noise_value_is_rejected_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"train\.noise.*'torch' or 'counter'.*'philox'"):
        load_config(overrides=["train.noise=philox"])


# ---------------------------------------------------------------------------- training
def _history(cfg) -> list[dict]:  # noqa: ANN001
    return read_json_lines(Path(cfg.out_dir) / "metrics.jsonl")


def _close(a: dict, b: dict, rtol: float = 1e-5) -> None:
    """As tests/test_seedgroup.py compares a group's seed with its separate run."""
    for key in a.keys() - {"wall_time", "confusion", "evaluation_s", "final_evaluation_s"}:
        va, vb = a[key], b[key]
        if isinstance(va, float) or isinstance(vb, float):
            assert va == pytest.approx(vb, rel=rtol, abs=1e-5), key
        else:
            assert va == vb, key


@needs_mnist
@pytest.mark.parametrize("variant_overrides", [[SMALL], ["model.presence=concrete",
                                                         "estimator.name=reparam",
                                                         "train.grad_clip=1.0"]])  # fmt: skip
def test_group_of_three_equals_each_seeds_single_run(tiny_config, variant_overrides) -> None:  # noqa: ANN001
    seeds = [3, 5, 6]  # not the members' indices 0, 1, 2
    common = ["train.noise=counter", *variant_overrides]
    alone = [tiny_config(f"seed={s}", *common, out=f"alone{s}") for s in seeds]
    together = [tiny_config(f"seed={s}", *common, out=f"group{s}") for s in seeds]
    results_alone = [Trainer(c).run() for c in alone]
    group = SeedGroup(together)
    assert group._vectorisable()
    drawn_for = []
    group.draw_for = lambda *a: drawn_for.append(a)  # counter mode never swaps RNG states
    results_group = group.run()
    assert drawn_for == []
    for a, g, ca, cg in zip(results_alone, results_group, alone, together, strict=True):
        ha, hg = _history(ca), _history(cg)
        assert [r["iteration"] for r in ha] == [r["iteration"] for r in hg] == [4, 8, 12]
        for ra, rg in zip(ha, hg, strict=True):
            _close(ra, rg)
        _close(a["final"], g["final"])
    assert len({r["final"]["elbo"] for r in results_group}) == 3  # three different seeds


@needs_mnist
def test_counter_noise_changes_training_but_not_evaluation_noise(tiny_config) -> None:
    """The two modes train differently from the same initialisation (the noise is not torch's
    stream in disguise); evaluation draws the same way in both (torch's seeded streams)."""
    losses, evaluations = {}, {}
    for mode in ("torch", "counter"):
        trainer = Trainer(tiny_config(f"train.noise={mode}", SMALL, out=mode))
        trainer.prepare()
        evaluations[mode] = trainer.evaluate(48, 2)
        trainer.loop(stop_after=3)
        losses[mode] = trainer.running["loss"]
    assert evaluations["torch"]["elbo"] == evaluations["counter"]["elbo"]
    assert evaluations["torch"]["iw_bound"] == evaluations["counter"]["iw_bound"]
    assert losses["torch"] != losses["counter"]


@needs_mnist
def test_resume_equals_uninterrupted_in_counter_mode(tiny_config) -> None:
    full_cfg = tiny_config("train.noise=counter", SMALL, "seed=4", out="full")
    part_cfg = tiny_config("train.noise=counter", SMALL, "seed=4", out="part")
    full = Trainer(full_cfg).run()
    assert Trainer(part_cfg).run(stop_after=6)["status"] == "partial"  # checkpoint at 6
    torch.manual_seed(999)  # a resumed process starts with another global RNG state
    resumed = Trainer(part_cfg).run()
    for a, b in zip(_history(full_cfg), _history(part_cfg), strict=True):
        _close(a, b, rtol=1e-6)
    _close(full["final"], resumed["final"], rtol=1e-6)


@pytest.mark.slow
@needs_mnist
@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
    reason="torch.compile on CPU needs a C++ compiler (c++, g++ or clang++); none on PATH",
)
def test_compiled_single_run_equals_eager_and_compiles_once(tiny_config) -> None:
    """train.compile with counter noise: the noise goes in as tensors, so 8 iterations of an
    annealed prior compile one graph; the losses are the eager run's to float tolerance."""
    from torch._dynamo.utils import counters

    histories = {}
    for flag in ("false", "true"):
        cfg = tiny_config("train.noise=counter", SMALL, f"train.compile={flag}", "seed=2",
                          "train.iterations=8", "prior.kind=annealed", "prior.anneal_iters=8",
                          out=flag)  # fmt: skip
        counters.clear()
        trainer = Trainer(cfg)
        result = trainer.run()
        assert result["status"] == "complete" and "compile_failed" not in trainer.status
        if flag == "true":
            assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
        histories[flag] = _history(cfg)
    # The same seed in a compiled group (its vectorised loss takes the noise as input too).
    cfgs = [tiny_config("train.noise=counter", SMALL, "train.compile=true", f"seed={s}",
                        "train.iterations=8", "prior.kind=annealed", "prior.anneal_iters=8",
                        out=f"group{s}") for s in (2, 3)]  # fmt: skip
    counters.clear()
    assert all(r["status"] == "complete" for r in SeedGroup(cfgs).run())
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    histories["group"] = _history(cfgs[0])
    for eager, compiled, group in zip(*histories.values(), strict=True):
        assert [r["iteration"] for r in (eager, compiled, group)] == [eager["iteration"]] * 3
        for other in (compiled, group):
            assert other["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-4)
            assert other["train_elbo"] == pytest.approx(eager["train_elbo"], rel=1e-4)


@needs_mnist
def test_failed_compilation_midway_falls_back_to_the_same_counter_noise(
    tiny_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compiled loss that fails after taking its noise (and drawing from it): the eager step
    that replaces it draws the iteration's noise from draw 0, as an eager run does."""
    import bench.trainer as trainer_module

    def broken_compile(estimator, model, device, noise):  # noqa: ANN001, ANN202
        def call(x, prior, noises):  # noqa: ANN001, ANN202
            noise.load(noises)
            model.draw_noise(x.shape[0], x.device, x.dtype)  # the first draw is used up
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return call

    monkeypatch.setattr(trainer_module, "compile_loss", broken_compile)
    x = torch.rand(16, 50, 50) * (torch.rand(16, 50, 50, generator=torch.Generator()) < 0.1)
    losses = []
    for flag in ("true", "false"):
        trainer = Trainer(tiny_config("train.noise=counter", SMALL, f"train.compile={flag}",
                                      out=flag))  # fmt: skip
        losses.append([trainer.step(x, 0.3)[0] for _ in range(2)])
        assert ("compile_failed" in trainer.status) == (flag == "true")
        assert trainer.noise.queue == []
    assert losses[0] == losses[1]
