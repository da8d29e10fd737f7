"""A finished run keeps model.pt only (issue 14 point 8): what it holds, who reads it, and the
disk the launcher's plan announces."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.api import load_run
from bench.config import config_hash
from bench.disk import Footprint, disk_line, footprint
from bench.gather import gather
from bench.grid import inspect_run
from bench.launcher import main
from bench.model_file import MODEL_FILE
from bench.seedgroup import train_group
from bench.trainer import CHECKPOINT, PREVIOUS_CHECKPOINT, CheckpointError, Trainer, train_run
from tests.conftest import needs_mnist

pytestmark = needs_mnist

FEW = ["train.iterations=8", "train.eval_every=4", "train.checkpoint_every=2"]


def _images() -> np.ndarray:
    x = np.zeros((4, 50, 50), dtype=np.float32)
    x[1, 10:30, 12:26] = 1.0
    x[2, 5:20, 30:45] = 0.7
    return x


def test_finished_run_keeps_model_file_only_and_loads_from_it(tiny_config) -> None:
    cfg = tiny_config(*FEW, out="done")
    trainer = Trainer(cfg)
    result = trainer.run()
    run_dir = Path(cfg.out_dir)
    assert result["status"] == "complete"
    assert (run_dir / MODEL_FILE).is_file()
    assert not (run_dir / CHECKPOINT).exists() and not (run_dir / PREVIOUS_CHECKPOINT).exists()

    run = load_run(run_dir)
    assert run.iteration == 8
    x = torch.as_tensor(_images())
    with torch.no_grad():
        expected = trainer.model.eval()(x, trainer.prior_prob(run.iteration), sample=False)
    out = run.infer(_images())
    np.testing.assert_array_equal(out.counts, expected.counts().numpy())
    np.testing.assert_allclose(out.reconstructions, expected.canvas.numpy(), rtol=0, atol=0)

    # The state logic reads result.json: a rerun skips it, the grid and gather call it complete.
    mtime = (run_dir / "result.json").stat().st_mtime_ns
    assert train_run(cfg)["final"] == result["final"]
    assert (run_dir / "result.json").stat().st_mtime_ns == mtime
    assert inspect_run(run_dir, config_hash(cfg), None).status == "complete"


def test_unfinished_run_loads_its_newest_checkpoint(tiny_config) -> None:
    cfg = tiny_config(*FEW, out="partial")
    Trainer(cfg).run(stop_after=6)
    run_dir = Path(cfg.out_dir)
    assert (run_dir / CHECKPOINT).exists() and not (run_dir / MODEL_FILE).exists()
    assert load_run(run_dir).iteration == 6
    assert inspect_run(run_dir, config_hash(cfg), None).status == "partial"


def test_damaged_model_file_is_a_clear_error(tiny_config) -> None:
    cfg = tiny_config(*FEW, out="damaged")
    Trainer(cfg).run()
    path = Path(cfg.out_dir) / MODEL_FILE
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.pt is unreadable"):
        load_run(cfg.out_dir)
    path.unlink()
    with pytest.raises(CheckpointError, match="no model.pt and no checkpoint.pt"):
        load_run(cfg.out_dir)


def test_seed_group_finishes_runs_with_the_same_files(tiny_config) -> None:
    cfgs = [tiny_config(f"seed={s}", *FEW, "estimator.params.baseline_hidden=16", out=f"g{s}")
            for s in (0, 1)]  # fmt: skip
    results = train_group(cfgs)
    for cfg, result in zip(cfgs, results, strict=True):
        run_dir = Path(cfg.out_dir)
        assert result["status"] == "complete"
        assert sorted(p.name for p in run_dir.glob("*.pt")) == [MODEL_FILE]
        assert load_run(run_dir).iteration == 8


def test_disk_estimate_matches_the_files_written(tiny_config) -> None:
    """The plan's figures come from the parameter count; they match real files within 1 %, for
    an estimator with its own network (NVIL) and one without (Concrete)."""
    for extra, out in (([], "nvil"), (["model.presence=concrete", "estimator.name=reparam"], "c")):
        cfg = tiny_config(*FEW, *extra, out=out)
        Trainer(cfg).run(stop_after=2)
        run_dir = Path(cfg.out_dir)
        estimate = footprint(cfg)
        assert estimate.checkpoint_bytes == pytest.approx(
            (run_dir / CHECKPOINT).stat().st_size, rel=0.01
        )
        Trainer(cfg).run()
        assert estimate.final_bytes == pytest.approx(
            (run_dir / MODEL_FILE).stat().st_size, rel=0.01
        )
        if out == "nvil":  # NVIL's baseline and every Adam moment stay out of model.pt
            assert estimate.checkpoint_bytes > 3 * estimate.final_bytes


def test_default_cpu_model_sizes() -> None:
    """The default model (every profile but smoke): one NVIL checkpoint ~74.5 MB, model.pt
    ~13.1 MB (measured on files: bench/disk.py's constants are checked above)."""
    from bench.config import load_config

    fp = footprint(load_config())
    assert fp.checkpoint_bytes == pytest.approx(74.5e6, rel=0.01)
    assert fp.final_bytes == pytest.approx(13.1e6, rel=0.01)


def test_disk_line_counts_finished_and_unfinished_runs() -> None:
    class Run:
        def __init__(self, cfg) -> None:  # noqa: ANN001
            self.cfg = cfg

    class State:
        def __init__(self, status: str) -> None:
            self.status = status

    from bench.config import load_config

    cfg = load_config()
    fp: Footprint = footprint(cfg)
    runs = [Run(cfg)] * 3
    line = disk_line(runs, [State("complete"), State("partial"), State("new")])
    peak = (fp.final_bytes + 2 * fp.training_bytes) / 1e6
    assert f"up to ~{peak:.0f} MB while its 2 unfinished run(s)" in line
    assert f"~{3 * fp.final_bytes / 1e6:.0f} MB once finished" in line
    assert f"~{fp.training_bytes / 1e6:.0f} MB per run while training" in line
    done = disk_line(runs, [State("complete")] * 3)
    assert "(every run is finished)" in done
    assert disk_line([], []) == "disk: nothing to store (no runs)"


def test_plan_states_disk_and_a_finished_grid_is_skipped(
    tmp_path: Path, data_cache: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("AIR_CACHE_DIR", str(data_cache))
    args = ["--profile", "smoke", "--experiments", "count", "--variants", "air_nvil_fixed",
            "--seeds", "0", "--no-progress", "--cluster", "debug",
            "--results", str(tmp_path / "results"), "--reports", str(tmp_path / "reports"),
            "train.iterations=4"]  # fmt: skip
    assert main([*args, "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "1 runs: 1 to start" in plan
    assert "per run while training (2 checkpoints with Adam state)" in plan
    assert "while its 1 unfinished run(s) hold checkpoints" in plan

    assert main(args) == 0
    capsys.readouterr()
    (run_dir,) = (tmp_path / "results").glob("count/air_nvil_fixed/*/seed_0")
    assert sorted(p.name for p in run_dir.glob("*.pt")) == [MODEL_FILE]
    runs = gather(tmp_path / "results").runs
    assert list(runs["status"]) == ["complete"]

    assert main([*args, "--dry-run"]) == 0
    again = capsys.readouterr().out
    assert "1 runs: 1 to skip" in again and "(every run is finished)" in again
    record = json.loads((run_dir / "result.json").read_text())
    assert record["status"] == "complete"
