"""The training loop: determinism, exact resume, divergence, checkpoints, config errors, API."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.api import load_run
from bench.config import ConfigError, load_config
from bench.storage import read_json_lines
from bench.trainer import CHECKPOINT, PREVIOUS_CHECKPOINT, CheckpointError, Trainer, build
from tests.conftest import ROOT, needs_mnist

pytestmark = needs_mnist


def _history(run_dir: Path) -> list[dict]:
    """Evaluation records without the wall-clock field, which legitimately differs."""
    return [
        {k: v for k, v in r.items() if k != "wall_time"}
        for r in read_json_lines(run_dir / "metrics.jsonl")
    ]


def _final(result: dict) -> dict:
    return result["final"]


def test_same_config_and_seed_give_same_numbers(tiny_config) -> None:
    a = Trainer(tiny_config(out="a")).run()
    b = Trainer(tiny_config(out="b")).run()
    assert _history(Path(tiny_config(out="a").out_dir)) == _history(
        Path(tiny_config(out="b").out_dir)
    )
    assert _final(a) == _final(b)
    c = Trainer(tiny_config("seed=1", out="c")).run()
    assert _final(c) != _final(a)


@pytest.mark.parametrize("stop_at", [4, 6])  # at an evaluation, and between two
def test_resume_equals_uninterrupted(tiny_config, stop_at: int) -> None:
    full_cfg = tiny_config(out="full")
    full = Trainer(full_cfg).run()

    cfg = tiny_config("train.checkpoint_every=2", out="resumed")
    partial = Trainer(cfg).run(stop_after=stop_at)
    assert partial["status"] == "partial"
    resumed = Trainer(cfg).run()  # a new process would do exactly this
    assert _history(Path(cfg.out_dir)) == _history(Path(full_cfg.out_dir))
    assert _final(resumed) == _final(full)
    assert resumed["iterations"] == full["iterations"] == 12


def test_parameters_and_optimiser_state_identical_after_resume(tiny_config) -> None:
    cfg_a = tiny_config(out="a")
    ta = Trainer(cfg_a)
    ta.run()
    cfg_b = tiny_config("train.checkpoint_every=3", out="b")
    Trainer(cfg_b).run(stop_after=5)
    tb = Trainer(cfg_b)
    tb.run()
    for (name, pa), pb in zip(
        ta.model.state_dict().items(), tb.model.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), name


def test_nan_is_recorded_as_divergence(tiny_config, monkeypatch) -> None:
    cfg = tiny_config(out="nan")
    trainer = Trainer(cfg)
    original = trainer.estimator.loss

    def poisoned(model, x, prior):
        out = original(model, x, prior)
        if trainer.iteration == 5:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer.estimator, "loss", poisoned)
    result = trainer.run()
    assert result["outcome"] == "diverged" and result["diverged_at"] == 5
    on_disk = json.loads((Path(cfg.out_dir) / "result.json").read_text())
    assert on_disk["outcome"] == "diverged" and on_disk["iterations"] == 5


def test_completed_run_is_skipped_and_corrupt_result_redone(tiny_config) -> None:
    from bench.trainer import train_run

    cfg = tiny_config(out="done")
    first = train_run(cfg)
    mtime = (Path(cfg.out_dir) / "result.json").stat().st_mtime_ns
    assert train_run(cfg) == first
    assert (Path(cfg.out_dir) / "result.json").stat().st_mtime_ns == mtime
    (Path(cfg.out_dir) / "result.json").write_text('{"status": "comp')  # truncated
    again = train_run(cfg)
    assert again["final"] == first["final"]


def test_corrupt_checkpoint_falls_back_then_fails_clearly(tiny_config) -> None:
    cfg = tiny_config("train.iterations=8", out="ck")
    Trainer(cfg).run(stop_after=7)  # checkpoints at 4 and 7 (a finished run keeps neither)
    run_dir = Path(cfg.out_dir)
    assert (run_dir / PREVIOUS_CHECKPOINT).exists()
    data = (run_dir / CHECKPOINT).read_bytes()
    (run_dir / CHECKPOINT).write_bytes(data[: len(data) // 3])  # truncated by a crash
    t = Trainer(cfg)
    result = t.run()  # resumes from the previous checkpoint and finishes
    assert result["status"] == "complete" and result["iterations"] == 8
    (run_dir / CHECKPOINT).write_bytes(b"garbage")
    (run_dir / PREVIOUS_CHECKPOINT).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="checkpoint"):
        Trainer(cfg).run()


def test_checkpoint_of_other_config_is_refused(tiny_config) -> None:
    Trainer(tiny_config(out="x")).run(stop_after=4)
    with pytest.raises(CheckpointError, match="config hash"):
        Trainer(tiny_config("train.lr=0.001", out="x")).run()


def test_optimiser_groups_use_their_own_learning_rates(tiny_config) -> None:
    """One Adam step moves each parameter by about its group's lr (pyro issue 1374)."""
    cfg = tiny_config("train.lr=0.0001", "estimator.params.baseline_lr=0.1")
    model, estimator, opt = build(cfg, torch.device("cpu"))
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"model": 1e-4, "baseline": 0.1}
    before = {id(p): p.detach().clone() for g in opt.param_groups for p in g["params"]}
    x = torch.rand(8, 50, 50) * (torch.rand(8, 50, 50) > 0.9)
    out = estimator.loss(model, x, 0.01)
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    for group in opt.param_groups:
        steps = torch.cat([(p.detach() - before[id(p)]).abs().flatten() for p in group["params"]])
        moved = steps[steps > 0]
        assert moved.numel() > 0, f"group {group['name']} did not move"
        # Adam's first step has magnitude lr for every coordinate with a non-zero gradient.
        assert torch.allclose(moved.median(), torch.tensor(group["lr"]), rtol=0.05), group["name"]


def test_config_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'train.iterations'"):
        load_config(overrides=["train.iteration=5"])
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(overrides=["train.batch_size=many"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  lstm_hiden: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*model.lstm_hiden.*model.lstm_hidden"):
        load_config([bad])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([tmp_path / "missing.yaml"])
    with pytest.raises(ConfigError, match="prior.kind"):
        load_config(overrides=["prior.kind=sometimes"])
    with pytest.raises(ValueError, match="unknown estimator 'nvl'.*did you mean 'nvil'"):
        from implementations.core.model import AIR, ModelConfig
        from implementations.registry import build_estimator

        build_estimator(load_config(overrides=["estimator.name=nvl"]).estimator, AIR(ModelConfig()))


def test_api_loads_run_and_infers(tiny_config) -> None:
    cfg = tiny_config(out="api")
    Trainer(cfg).run()
    run = load_run(cfg.out_dir)
    images = np.zeros((5, 50, 50), dtype=np.float32)
    images[1, 10:30, 10:25] = 1.0
    out = run.infer(images)
    assert out.counts.shape == (5,) and out.presence_prob.shape == (5, 3)
    assert out.reconstructions.shape == (5, 50, 50)
    assert len(out.boxes) == 5 and all(
        b.shape == (c, 4) for b, c in zip(out.boxes, out.counts, strict=True)
    )
    assert run.infer(images[1]).counts.shape == (1,)
    with pytest.raises(ValueError, match=r"expected shape \(N, 50, 50\)"):
        run.infer(np.zeros((2, 28, 28), dtype=np.float32))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        run.infer(np.full((1, 50, 50), 255.0))
    with pytest.raises(ValueError, match="dtype"):
        run.infer(np.zeros((1, 50, 50), dtype=np.uint8))
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        load_run(Path(cfg.out_dir) / "nope")


def test_run_all_smoke_subprocess(tmp_path: Path, data_cache: Path) -> None:
    """The real entry point, as a user runs it, on the smoke config."""
    out = tmp_path / "smoke"
    cmd = [sys.executable, "run_all.py", "-c", "configs/smoke.yaml", "-o", str(out),
           "--no-progress", "train.iterations=6", "train.eval_every=3",
           f"data.cache_dir={data_cache}", "model.lstm_hidden=32"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert summary["status"] == "complete" and summary["iterations"] == 6
    assert np.isfinite(summary["elbo"]) and np.isfinite(summary["iw_bound"])
    for name in ("config.yaml", "metrics.jsonl", "result.json", "model.pt"):
        assert (out / name).exists(), name
    assert not (out / "checkpoint.pt").exists()  # a finished run keeps its weights only
    assert len(read_json_lines(out / "metrics.jsonl")) == 2
    bad = subprocess.run([*cmd[:-1], "model.lstm_hiden=32"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "did you mean 'model.lstm_hidden'" in bad.stderr


@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
    reason="torch.compile on CPU needs a C++ compiler (c++, g++ or clang++); none on PATH",
)
def test_compiled_step_equals_eager_step_and_compiles_once(tiny_config) -> None:
    """train.compile: same losses and parameters as eager, one graph whatever the prior.

    Sparse images on, so the custom sparse ops are inside the compiled graph; the prior changes
    every step, as an annealed prior does, and must not trigger recompilation.
    """
    from torch._dynamo.utils import counters

    results = {}
    for compiled in (False, True):
        flag = "true" if compiled else "false"
        cfg = tiny_config(f"train.compile={flag}", "model.sparse_images=true", out=flag)
        trainer = Trainer(cfg)
        torch.manual_seed(0)
        x = torch.rand(16, 50, 50) * (torch.rand(16, 50, 50) < 0.1)
        counters.clear()
        losses = [trainer.step(x, prior)[0] for prior in (0.5, 0.3, 0.1, 0.01)]
        if compiled:
            assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
        params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        results[compiled] = (losses, params)
    np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-4)
    for name, eager in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], eager, rtol=1e-4, atol=1e-5, msg=name)


def test_failed_compilation_falls_back_to_eager(tiny_config, monkeypatch, caplog) -> None:
    """No C++ compiler (say): the run warns, records why, and trains eagerly to the same loss."""
    import bench.trainer as trainer_module

    def broken_compile(*args: object) -> object:
        def call(*a: object) -> None:
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return call

    monkeypatch.setattr(trainer_module, "compile_loss", broken_compile)
    x = torch.rand(16, 50, 50) * (torch.rand(16, 50, 50, generator=torch.Generator()) < 0.1)
    losses = []
    for flag in ("true", "false"):
        trainer = Trainer(tiny_config(f"train.compile={flag}", out=flag))
        torch.manual_seed(0)
        losses.append([trainer.step(x, 0.3)[0] for _ in range(2)])
        if flag == "true":
            assert "InvalidCxxCompiler" in trainer.status["compile_failed"]
            assert "training eagerly instead" in caplog.text
    assert losses[0] == losses[1]
