"""Local execution around the jobs: one GPU per job, the data check before the grid starts,
per-run progress, and the speed benchmark's command line."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest

import bench.data.mnist as mnist
import bench.local as local
import run_all
from bench import perf
from bench.config import load_config
from bench.datasets import load_datasets
from bench.grid import ATTEMPTS, SUBMISSION, RunGroup, load_profile
from bench.preflight import DataMissing, cache_file, check_data, data_specs
from bench.progress import JobBars, RateMeter, Snapshot, describe, read_snapshot
from bench.storage import read_json_lines
from tests.conftest import TINY, needs_mnist
from tests.test_launcher import SMOKE, _runs


# ---------------------------------------------------------------------------------- GPUs
def test_each_job_gets_its_own_gpu_in_its_environment() -> None:
    env = local.controller_env(
        {"CUDA_VISIBLE_DEVICES": "0,1,2", "HOME": "/h"}, "cmd", "1", 60.0, 30
    )
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["HOME"] == "/h"
    assert env["SUBMITIT_EXECUTOR"] == "local" and env["SUBMITIT_LOCAL_COMMAND"] == "cmd"
    assert env["SUBMITIT_LOCAL_TIMEOUT_S"] == "3600"
    cpu = local.controller_env({"CUDA_VISIBLE_DEVICES": "0"}, "cmd", "", 1.0, 30)
    assert cpu["CUDA_VISIBLE_DEVICES"] == ""  # CPU jobs see no GPU, as before


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert local.visible_gpus() == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,GPU-abc")
    assert local.visible_gpus() == ["3", "GPU-abc"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert local.visible_gpus() == []


def test_jobs_at_once_is_one_per_gpu_for_cuda_runs(tmp_path: Path) -> None:
    profile = load_profile("smoke")  # local.jobs: 2
    cuda = [RunGroup([r]) for r in _runs(tmp_path, "-s", "0-3", "-v", "air_nvil_fixed",
                                                "-d", "cuda")]  # fmt: skip
    cpu = [RunGroup([r]) for r in _runs(tmp_path, "-s", "0-3", "-v", "air_nvil_fixed")]
    four = ["0", "1", "2", "3"]
    assert local.local_slots(cuda, profile, four, None) == 4
    assert local.local_slots(cuda, profile, four, 3) == 3  # --jobs 3 caps it
    assert local.local_slots(cuda, profile, [], None) == 2  # no GPU: unchanged
    assert local.local_slots(cpu, profile, four, None) == 2  # CPU runs: unchanged


@needs_mnist
def test_local_cuda_jobs_each_see_one_gpu(
    tmp_path: Path, data_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Two faked GPUs, three CUDA runs: two jobs at once, each given one GPU of its own (CI has
    no GPU, so each run then fails with "CUDA is not available"; what it was given is in its
    attempts line and submission.json)."""
    monkeypatch.setenv("AIR_CACHE_DIR", str(data_cache))
    monkeypatch.setattr(local, "visible_gpus", lambda: ["0", "1"])
    results = tmp_path / "results"
    grid = ["-v", "air_nvil_fixed", "-s", "0-2", "-d", "cuda"]
    code = run_all.main([*SMOKE, *grid, "--results", str(results), "--reports", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 3  # every run failed: no CUDA here
    assert "CUDA jobs: 2 GPU(s): 0, 1; 2 job(s) at once, one GPU each" in out
    attempts = []
    for run_dir in sorted(results.glob("count/air_nvil_fixed/*/seed_*")):
        (attempt,) = read_json_lines(run_dir / ATTEMPTS)
        given = json.loads((run_dir / SUBMISSION).read_text())["cuda_visible_devices"]
        assert attempt["cuda_visible_devices"] == given and given in ("0", "1")
        assert "CUDA is not available" in json.loads((run_dir / "result.json").read_text())["error"]
        attempts.append(attempt)
    assert len(attempts) == 3
    for a in attempts:  # jobs that ran at the same time had different GPUs
        for b in attempts:
            overlap = a["started_at"] < b["ended_at"] and b["started_at"] < a["ended_at"]
            if a is not b and overlap:
                assert a["cuda_visible_devices"] != b["cuda_visible_devices"]


# ---------------------------------------------------------------------------------- data
def test_missing_mnist_stops_the_grid_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """No MNIST, no cache, no network: one clear message, exit 1, no job started."""
    monkeypatch.setenv("AIR_DATA_DIR", str(tmp_path / "no-mnist"))
    monkeypatch.setenv("AIR_CACHE_DIR", str(tmp_path / "no-cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the download cache fallback
    monkeypatch.setattr(mnist, "MIRRORS", [(tmp_path / "no-mirror").as_uri() + "/"])
    results = tmp_path / "results"
    code = run_all.main([*SMOKE, "-v", "air_nvil_fixed", "-s", "0-1", "--results", str(results)])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "MNIST file(s) not found" in err and f"searched folder: {tmp_path / 'no-mnist'}" in err
    assert "Put the four MNIST files" in err and "set AIR_DATA_DIR" in err
    assert "Nothing was started." in err
    assert not (results / "count").exists() and not (results / ".submitit").exists()


@needs_mnist
def test_cached_data_sets_need_no_mnist(tmp_path: Path, data_cache: Path) -> None:
    """The check looks where the data loader caches: with both sets cached, MNIST is not
    needed; without them, a folder without MNIST is reported."""
    cfg = load_config(overrides=[*TINY, f"data.cache_dir={data_cache}"])
    load_datasets(cfg)  # generates (or finds) both sets in the cache
    assert all(cache_file(spec, cfg.data.cache_dir).is_file() for spec in data_specs(cfg))
    empty = tmp_path / "empty"
    empty.mkdir()
    cached = load_config(
        overrides=[*TINY, f"data.cache_dir={data_cache}", f"data.data_dir={empty}"]
    )
    assert check_data([cached]) == []  # nothing to read: the sets are cached
    uncached = load_config(overrides=[*TINY, f"data.cache_dir={tmp_path / 'c'}",
                                      f"data.data_dir={empty}"])  # fmt: skip
    with pytest.raises(DataMissing, match="MNIST file"):
        check_data([uncached])


# ---------------------------------------------------------------------------------- progress
def test_progress_of_a_running_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert read_snapshot(run_dir, 1000) == Snapshot(iterations=1000)
    assert describe(read_snapshot(run_dir, 1000), RateMeter()) == "starting"
    lines = [{"iteration": 100, "count_accuracy": 0.25}, {"iteration": 200, "count_accuracy": 0.5}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"it')
    (run_dir / "progress.json").write_text(json.dumps({"iteration": 230, "iterations": 1000}))
    snap = read_snapshot(run_dir, 1000)
    assert snap == Snapshot(iteration=230, iterations=1000, count_accuracy=0.5, evaluated_at=200)

    meter = RateMeter()
    meter.add(0.0, 100)
    meter.add(30.0, 100)  # still starting (compiling, say): not counted in the rate
    meter.add(40.0, 300)
    assert meter.rate() == pytest.approx(20.0) and meter.eta_s(1000) == pytest.approx(35.0)
    assert describe(snap, meter) == "count acc 0.500 @200, 20.0 it/s, ETA 0:35"
    done = Snapshot(iteration=1000, iterations=1000, count_accuracy=0.5, evaluated_at=1000)
    assert describe(done, meter) == "count acc 0.500 @1000, final evaluation"


def test_one_bar_per_running_job(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"iteration": 50, "count_accuracy": 0.75}))
    out = io.StringIO()
    bars = JobBars(enabled=True, file=out)
    bars.start("job", "count/air_nvil_fixed/seed_0", run_dir, 400)
    for iteration in (60, 80):
        (run_dir / "progress.json").write_text(json.dumps({"iteration": iteration}))
        bars.refresh()
        time.sleep(0.05)
    bars.close_all()
    text = out.getvalue()
    assert "count/air_nvil_fixed/seed_0" in text and "80/400, count acc" in text
    assert "count acc 0.750 @50" in text and "it/s, ETA" in text


# ---------------------------------------------------------------------------------- bench.perf
def test_perf_command_line(capsys: pytest.CaptureFixture) -> None:
    args = perf.parse_args(["-v", "air_nvil_fixed,dair_nvil", "air_vimco", "train.lr=1e-3"])
    assert args.variants == ["air_nvil_fixed", "dair_nvil", "air_vimco"]
    assert args.overrides == ["train.lr=1e-3"] and args.iterations == 200
    assert perf.parse_args(["-g", "1,4", "16"]).group_sizes == [1, 4, 16]
    with pytest.raises(SystemExit):
        perf.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for default in ("(default: 200)", "(default: 20)", "(default: cpu)", "(default: results/perf)"):
        assert default in help_text
    with pytest.raises(SystemExit):
        perf.parse_args(["train.lrr=1"])
    assert "unknown key 'train.lrr'; did you mean 'train.lr'?" in capsys.readouterr().err
