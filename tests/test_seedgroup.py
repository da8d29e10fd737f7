"""Seeds trained together in one vectorised process equal separate single-seed runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.config import config_hash
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
                                                   "train.grad_clip=1.0"]])  # fmt: skip
def test_group_equals_separate_runs(tiny_config, variant_overrides: list[str]) -> None:
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
        _close(a["final"], g["final"])
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
    real_accumulate = Trainer.accumulate

    def signal_during_first_iteration(trainer, *args):  # noqa: ANN001, ANN002, ANN202
        group.stop_requested = True  # as StopOnSignal does, from the signal handler
        return real_accumulate(trainer, *args)

    monkeypatch.setattr(Trainer, "accumulate", signal_during_first_iteration)
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
    import bench.seedgroup as seedgroup

    seeds = [7, 8]
    reference = Trainer(tiny_config("seed=8", SMALL, out="ref8")).run()
    cfgs = [tiny_config(f"seed={s}", SMALL, out=f"g{s}") for s in seeds]
    real_clip, calls = seedgroup._clip_per_seed, []

    def nan_for_the_first_seed_at_iteration_5(params, max_norm):  # noqa: ANN001, ANN202
        norms = real_clip(params, max_norm)
        calls.append(1)
        if len(calls) == 6:
            norms[0] = float("nan")
        return norms

    monkeypatch.setattr(seedgroup, "_clip_per_seed", nan_for_the_first_seed_at_iteration_5)
    diverged, other = SeedGroup(cfgs).run()
    assert diverged["status"] == "complete" and diverged["outcome"] == "diverged"
    assert diverged["diverged_at"] == 5 and diverged["final"] is None
    assert other["outcome"] != "diverged" and other["iterations"] == 12
    _close(reference["final"], other["final"])
