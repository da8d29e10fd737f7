"""Sizing a grid for one GPU (bench/gpu_plan.py): auto group size, expected wall time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.gpu_plan import SEED_GB, USABLE, auto_group_size, expected_wall_line
from bench.launcher import main as run_all_main


def test_auto_group_size_from_free_memory() -> None:
    # 139 GB free (an H200) holds every seed of a 16-seed config.
    assert auto_group_size(16, "cuda", free_gb=139.0)[0] == 16
    # 10 GB free: 10 * 0.8 / 1 GB = 8 seeds per group.
    size, why = auto_group_size(16, "cuda:0", free_gb=10.0)
    assert size == int(10.0 * USABLE / SEED_GB) == 8
    assert "10 GB free on cuda:0" in why and "up to 8 seeds" in why
    assert auto_group_size(16, "cuda", free_gb=0.1)[0] == 1  # never below one seed
    size, why = auto_group_size(16, "cpu")
    assert size == 1 and "not a usable CUDA device" in why


def test_expected_wall_time_from_this_devices_measurement(tmp_path: Path) -> None:
    line = expected_wall_line([30000] * 80, tmp_path, "NVIDIA H200")
    assert "unknown (2,400,000 seed-iterations" in line and "--end-to-end" in line
    perf = tmp_path / "perf"
    perf.mkdir()
    row = {"device": "NVIDIA H200", "seed_iterations_per_s": 4000.0,
           "command": "run_all.py --cluster debug -v air_nvil_fixed"}  # fmt: skip
    (perf / "perf_e2e.json").write_text(json.dumps(row))
    line = expected_wall_line([30000] * 80, tmp_path, "NVIDIA H200")
    assert "~10 min (2,400,000 seed-iterations at 4,000/s" in line
    # Another device's figure is not this one's.
    assert "unknown" in expected_wall_line([30000] * 80, tmp_path, "NVIDIA A100")
    assert expected_wall_line([], tmp_path, "NVIDIA H200").endswith("nothing to train")


def test_gpu_profile_plans_auto_groups_and_says_the_expected_time(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = run_all_main(["--profile", "gpu", "--dry-run", "--results", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "1 experiment(s) x 5 variant(s) x 16 seed(s)" in out
    # No GPU here (CI): auto falls back to one run per job and says why.
    assert "group_size 0 (auto): cuda is not a usable CUDA device" in out
    assert "80 runs in 80 jobs (one run per job)" in out
    assert "expected wall time: unknown (2,400,000 seed-iterations to train" in out
