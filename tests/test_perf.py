"""The speed benchmark runs end to end and writes its table (tiny settings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import perf
from bench.train_loop import batch_indices, batches_per_epoch, epoch_batches
from tests.conftest import TINY, needs_mnist


@needs_mnist
def test_perf_writes_table(tmp_path: Path, data_cache: Path) -> None:
    model = [o for o in TINY if o.startswith("model.")]
    overrides = [*model, "train.batch_size=8", "data.n_train=256", f"data.cache_dir={data_cache}"]
    code = perf.main(["-v", "air_nvil_fixed", "-n", "3", "-w", "1", "-g", "1", "2",
                      "-o", str(tmp_path), *overrides])  # fmt: skip
    assert code == 0
    rows = json.loads((tmp_path / "perf.json").read_text())["rows"]
    assert rows[0]["variant"] == "air_nvil_fixed" and rows[0]["median_ms"] > 0
    assert rows[0]["gflop_per_iteration"] > 0 and rows[0]["ratio_to_floor"] > 0
    groups = (tmp_path / "perf_groups.csv").read_text().splitlines()
    assert len(groups) == 3 and groups[0].startswith("variant,seeds")


@needs_mnist
def test_perf_end_to_end_runs_a_real_grid(tmp_path: Path, data_cache: Path, monkeypatch) -> None:
    """--end-to-end trains a tiny grid through run_all.py and counts every seed-iteration it
    trained over the whole wall time, with evaluation's and checkpoints' share of it."""
    monkeypatch.setenv("AIR_CACHE_DIR", str(data_cache))
    code = perf.main(["--end-to-end", "-v", "air_nvil_fixed", "--seeds", "0-1",
                      "--group-size", "2", "-o", str(tmp_path), "train.iterations=8"])  # fmt: skip
    assert code == 0
    row = json.loads((tmp_path / "perf_e2e.json").read_text())
    assert row["runs"] == row["complete"] == 2
    assert row["seed_iterations"] == 16  # two seeds, 8 iterations each, trained together
    assert row["seed_iterations_per_s"] == pytest.approx(16 / row["wall_s"])
    assert 0 < row["evaluation_share"] < 1 and 0 < row["checkpoint_share"] < 1
    assert 0 < row["training_loop_s"] < row["wall_s"]
    assert row["evaluation_s"] > 0  # periodic (every 4) and final evaluations were timed


def test_epoch_batches_are_each_seeds_batch_indices() -> None:
    """The group loop's one-gather batches are exactly each seed's own data order."""
    for n, batch in ((100, 16), (10, 16), (64, 16)):
        per_epoch = batches_per_epoch(n, batch)
        for epoch in (0, 3):
            rows = epoch_batches([0, 5, 9], epoch, n, batch, torch.device("cpu"))
            for s, seed in enumerate([0, 5, 9]):
                for pos in range(per_epoch):
                    it = epoch * per_epoch + pos
                    assert torch.equal(rows[s, pos], batch_indices(seed, it, n, batch))
