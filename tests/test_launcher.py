"""The launcher on this machine: plan, local grid, skip/resume/redo, faults, gather.

The grid runs go through the real entry point (`python run_all.py`) as subprocesses, on the
smoke profile; planning and argument errors are checked in-process, where they are fast.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

import run_all
from bench.config import config_hash, load_config, to_dict
from bench.gather import RUN_COLUMNS, gather
from bench.grid import (
    ATTEMPTS,
    SUBMISSION,
    GridError,
    RunState,
    group_runs,
    load_profile,
    parse_seeds,
)
from bench.launcher import parse_args, plan_grid
from bench.seedgroup import SeedGroup
from bench.storage import read_json_lines
from bench.trainer import Trainer, load_checkpoint
from bench.worker import run_group_task, run_lock, run_task
from tests.conftest import ROOT, TINY, needs_mnist

SMOKE = ["--profile", "smoke", "--experiments", "count", "--no-progress"]


def cli(args: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "run_all.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def env(data_cache: Path) -> dict[str, str]:
    """The environment of a CLI subprocess: the session's multi-MNIST cache, no SLURM."""
    out = {**os.environ, "AIR_CACHE_DIR": str(data_cache)}
    out.pop("SLURM_CONF", None)
    return out


@pytest.fixture
def keep_threads() -> object:
    """Runs trained in this process set torch's thread count (train.threads); put it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _runs(tmp_path: Path, *args: str) -> list:
    return plan_grid(parse_args([*SMOKE, "--results", str(tmp_path / "results"), *args]))[1]


def _history(run_dir: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k != "wall_time"}
        for r in read_json_lines(run_dir / "metrics.jsonl")
    ]


# ---------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--variants", "air_nvil_fixd"],
            "unknown variant 'air_nvil_fixd'; did you mean 'air_nvil_fixed'",
        ),
        (["--experiments", "counting"], "unknown experiment 'counting'; did you mean 'count'"),
        (["--profile", "smok"], "unknown profile 'smok'; did you mean 'smoke'"),
        (["--seeds", "5-2"], "bad seed range '5-2'"),
        (["--seeds", "zero"], "bad seed range 'zero'"),
        (
            ["train.iteration=5"],
            "error: command-line override 'train.iteration=5': unknown key 'train.iteration'; "
            "did you mean 'train.iterations'?",
        ),
        (
            ["train.lrr=1"],
            "error: command-line override 'train.lrr=1': unknown key 'train.lrr'; "
            "did you mean 'train.lr'?",
        ),
        (
            ["train.batch_size=many"],
            "error: command-line override 'train.batch_size=many': train.batch_size expects an "
            "integer, got 'many'",
        ),
        (
            ["train.grad_clip=abc"],
            "train.grad_clip expects a number or null, got 'abc'",
        ),
        (
            ["data.train_counts=1"],
            "data.train_counts expects a list of integers, e.g. [0,1,2], got '1'",
        ),
        (
            ["train.batch_size=0"],  # a range check: about the override too, not about a pair
            "error: command-line override: config field train.batch_size: expected an integer > 0",
        ),
        (["lr"], "expected key=value"),
        (["--variants", "air_nvil_fixed", "air_concrete"], "take commas: --variants a,b"),
        (
            ["profile.slurm.array_paralelism=2"],
            "error: command-line override 'profile.slurm.array_paralelism=2': unknown key "
            "'profile.slurm.array_paralelism'; did you mean 'profile.slurm.array_parallelism'?",
        ),
        (["--cluster", "slurm", "--jobs", "0"], "--jobs must be >= 1"),
        (["--group-size", "-1"], "--group-size must be >= 1, or 0 (auto)"),
        (["profile.group_size=-2"], "group_size must be >= 1 (seeds trained by one job) or 0"),
        (
            ["profile.group_size=ten"],
            "error: command-line override 'profile.group_size=ten': profile.group_size expects "
            "an integer, got 'ten'",
        ),
    ],
)
def test_bad_arguments_exit_2_before_anything_runs(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    results = tmp_path / "results"
    code = run_all.main(["--profile", "smoke", "--results", str(results), *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err
    # One line, about the command line: no experiment x variant pair, no OmegaConf internals.
    assert err.count("\n") == 1 and " x " not in err and "full_key" not in err, err
    assert not results.exists()  # nothing was planned on disk, nothing ran


def test_seed_ranges_and_profile_overrides() -> None:
    assert parse_seeds("0-2,7, 5") == [0, 1, 2, 5, 7]
    assert parse_seeds("3") == [3]
    with pytest.raises(GridError):
        parse_seeds("")
    profile = load_profile("smoke", ["resources.partition=gpu", "slurm.array_parallelism=7"])
    assert profile.resources.partition == "gpu" and profile.slurm.array_parallelism == 7
    with pytest.raises(GridError, match="mem_gb"):
        load_profile("smoke", ["resources.mem_gb=lots"])


def test_grid_identity_and_layers(tmp_path: Path) -> None:
    """Run folders follow the contract; data is fixed per experiment; variants keep their say."""
    runs = _runs(
        tmp_path,
        "--experiments",
        "count,interpolation",
        "--variants",
        "air_nvil_fixed,air_vimco",
        "--seeds",
        "0-1",
    )
    assert len(runs) == 8
    for run in runs:
        assert run.run_dir == (
            tmp_path
            / "results"
            / run.experiment
            / run.variant
            / run.config_hash
            / f"seed_{run.seed}"
        )
        assert run.config_hash == config_hash(run.cfg) and run.cfg.out_dir == str(run.run_dir)
        assert run.cfg.train.iterations == 12  # the smoke profile
    by_exp = {r.experiment: r.cfg.data for r in runs}
    assert by_exp["interpolation"].train_counts == [0, 1, 3]
    assert by_exp["interpolation"].test_counts == [0, 1, 2, 3]
    assert len({(r.experiment, r.cfg.data.seed) for r in runs}) == 2  # one data seed each
    vimco = next(r for r in runs if r.variant == "air_vimco")
    assert vimco.cfg.estimator.name == "air_vimco:vimco"  # variant after profile; own code
    # The same seed of two variants: same data, different hash and folder.
    same = [r for r in runs if r.experiment == "count" and r.seed == 0]
    # (data.reference_protocols only adds evaluation sets: the training and held-out test
    # data are the same.)
    data = [dataclasses.replace(r.cfg.data, reference_protocols=[]) for r in same[:2]]
    assert data[0] == data[1] and same[0].config_hash != same[1].config_hash


def test_group_runs_chunks_the_seeds_of_one_config(tmp_path: Path) -> None:
    """Jobs hold seeds of one (experiment, variant, config hash), at most group_size of them,
    and only runs that are to be trained."""
    grid = _runs(
        tmp_path, "--experiments", "count,interpolation", "--variants", "air_nvil_fixed,air_vimco",
        "--seeds", "0-4",
    )  # fmt: skip
    other_hash = _runs(tmp_path, "--variants", "air_nvil_fixed", "--seeds", "0-2", "train.lr=1e-3")
    special = {
        ("count", "air_nvil_fixed", 1): "complete",
        ("count", "air_nvil_fixed", 2): "error",
        ("count", "air_vimco", 0): "partial",
        ("count", "air_vimco", 3): "queued",
    }
    runs = grid + other_hash
    states = [RunState(special.get((r.experiment, r.variant, r.seed), "new"), "") for r in grid]
    states += [RunState("new", "") for _ in other_hash]
    jobs = group_runs(runs, states, 2)
    assert [(j.runs[0].experiment, j.runs[0].variant, j.seeds) for j in jobs] == [
        ("count", "air_nvil_fixed", [0, 2]),  # seed 1 is complete; seed 2 retries
        ("count", "air_nvil_fixed", [3, 4]),
        ("count", "air_vimco", [0, 1]),
        ("count", "air_vimco", [2, 4]),  # seed 3 is still queued
        ("interpolation", "air_nvil_fixed", [0, 1]),
        ("interpolation", "air_nvil_fixed", [2, 3]),
        ("interpolation", "air_nvil_fixed", [4]),
        ("interpolation", "air_vimco", [0, 1]),
        ("interpolation", "air_vimco", [2, 3]),
        ("interpolation", "air_vimco", [4]),
        ("count", "air_nvil_fixed", [0, 1]),  # same variant and seeds, another config hash
        ("count", "air_nvil_fixed", [2]),
    ]
    for job in jobs:
        assert len({(r.experiment, r.variant, r.config_hash) for r in job.runs}) == 1
    assert jobs[0].runs[0].config_hash != jobs[-1].runs[0].config_hash
    task = jobs[0].task(stop_grace_s=7)
    assert [t["seed"] for t in task["group"]] == [0, 2] and task["stop_grace_s"] == 7
    singles = group_runs(runs, states, 1)  # the default: one run per job, as always
    assert [j.runs for j in singles] == [[r] for r, s in zip(runs, states, strict=True) if s.to_run]
    assert singles[0].task(7) == singles[0].runs[0].task(7)
    assert [len(j.runs) for j in group_runs(runs, states, 10)] == [4, 4, 5, 5, 3]


def test_dry_run_plans_without_touching_disk(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = tmp_path / "results"
    code = run_all.main(
        [
            *SMOKE,
            "--results",
            str(results),
            "--variants",
            "air_nvil_fixed",
            "--seeds",
            "0-2",
            "--dry-run",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "3 runs: 3 to start" in out and out.count("start  count/air_nvil_fixed/seed_") == 3
    assert not results.exists()


def test_broken_variant_is_listed_others_still_planned(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bench.variants as variants

    real = variants.discover

    def with_a_broken_one(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        found = real(*a, **kw)
        found.broken["air_broken"] = "variant.yaml: unknown key 'confg'"
        return found

    monkeypatch.setattr(variants, "discover", with_a_broken_one)
    code = run_all.main([*SMOKE, "--results", str(tmp_path / "r"), "--seeds", "0", "--dry-run"])
    captured = capsys.readouterr()
    assert code == 3
    assert "broken variant air_broken (not run): variant.yaml: unknown key 'confg'" in captured.err
    assert "6 runs: 6 to start" in captured.out


# ---------------------------------------------------------------------------------- local grid
@needs_mnist
def test_local_grid_error_skip_and_redo(tmp_path: Path, env: dict[str, str]) -> None:
    """One run fails (unreadable checkpoints) while the grid goes on; a rerun skips complete
    runs, redoes a truncated result file and says so, and retries the failed run."""
    args = [
        *SMOKE,
        "--variants",
        "air_nvil_fixed,air_concrete",
        "--seeds",
        "0-1",
        "--results",
        str(tmp_path / "results"),
        "--reports",
        str(tmp_path / "reports"),
    ]
    runs = {
        r.name: r
        for r in _runs(tmp_path, "--variants", "air_nvil_fixed,air_concrete", "--seeds", "0-1")
    }
    broken = runs["count/air_concrete/seed_1"].run_dir
    broken.mkdir(parents=True)
    (broken / "checkpoint.pt").write_bytes(b"not a checkpoint")
    (broken / "checkpoint.prev.pt").write_bytes(b"not one either")

    first = cli(args, env)
    assert first.returncode == 3, first.stdout + first.stderr  # a run failed
    error = json.loads((broken / "result.json").read_text())
    assert error["status"] == "error" and "CheckpointError" in error["error"]
    assert "Traceback" in error["error"]
    assert error["provenance"]["command"] == shlex.join(["run_all.py", *args])
    assert {k: error[k] for k in ("experiment", "variant", "seed")} == {
        "experiment": "count",
        "variant": "air_concrete",
        "seed": 1,
    }
    done = [r for name, r in runs.items() if name != "count/air_concrete/seed_1"]
    for run in done:
        record = json.loads((run.run_dir / "result.json").read_text())
        assert record["status"] == "complete", run.name
        assert record["experiment"] == "count" and record["variant"] == run.variant
        # The command the user typed, not the worker's (submitit's _submit.py).
        assert record["provenance"]["command"] == shlex.join(["run_all.py", *args])

    table = pd.read_csv(tmp_path / "results" / "runs.csv")
    assert list(table.columns[: len(RUN_COLUMNS)]) == RUN_COLUMNS and len(table) == 4
    assert sorted(table["status"]) == ["complete", "complete", "complete", "error"]
    evals = pd.read_csv(tmp_path / "results" / "evals.csv")
    assert len(evals) == 3 * 3  # 12 iterations, evaluated every 4, for the 3 runs that trained

    truncated = runs["count/air_nvil_fixed/seed_0"].run_dir / "result.json"
    final = json.loads(truncated.read_text())["final"]
    truncated.write_text(truncated.read_text()[:40])  # a crash in the middle of a write
    untouched = runs["count/air_nvil_fixed/seed_1"].run_dir / "result.json"
    mtime = untouched.stat().st_mtime_ns

    again = cli(args, env)
    assert again.returncode == 3, again.stdout + again.stderr  # the broken run fails again
    assert "redo   count/air_nvil_fixed/seed_0" in again.stdout
    assert "result.json is unreadable" in again.stdout
    assert "retry  count/air_concrete/seed_1" in again.stdout
    assert "2 to skip" in again.stdout
    assert json.loads(truncated.read_text())["final"] == final  # redone: the same numbers
    assert untouched.stat().st_mtime_ns == mtime  # complete runs are not touched


@needs_mnist
@pytest.mark.usefixtures("keep_threads")
def test_kill_9_mid_training_then_rerun_resumes_to_identical_metrics(
    tmp_path: Path, env: dict[str, str]
) -> None:
    longer = ["train.iterations=200", "train.eval_every=20", "train.checkpoint_every=20"]
    args = [
        *SMOKE,
        "--variants",
        "air_nvil_fixed",
        "--seeds",
        "0",
        "--results",
        str(tmp_path / "results"),
        "--reports",
        str(tmp_path / "reports"),
        *longer,
    ]
    (run,) = _runs(tmp_path, "--variants", "air_nvil_fixed", "--seeds", "0", *longer)
    proc = subprocess.Popen(
        [sys.executable, "run_all.py", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if len(read_json_lines(run.run_dir / "metrics.jsonl")) >= 2:  # checkpoint at 40
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the run never reached its second evaluation")
        # A crash of everything: the job's own process group (its controller and worker; the
        # job id is the controller's pid), then the launcher's.
        job = int(json.loads((run.run_dir / SUBMISSION).read_text())["job_id"])
        os.killpg(job, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert not (run.run_dir / "result.json").exists(), "killed too late: the run had finished"
    killed_at = load_checkpoint(run.run_dir, run.config_hash)["iteration"]
    assert 0 < killed_at < 200

    again = cli(args, env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resume count/air_nvil_fixed/seed_0" in again.stdout
    attempts = read_json_lines(run.run_dir / ATTEMPTS)
    assert attempts[-1]["start_iteration"] == killed_at and attempts[-1]["end"] == "complete"
    resumed = json.loads((run.run_dir / "result.json").read_text())

    reference = Trainer(  # the same run, uninterrupted, in this process
        load_config([("reference", to_dict(run.cfg))], [f"out_dir={tmp_path / 'reference'}"])
    ).run()
    assert resumed["final"] == reference["final"]
    assert _history(run.run_dir) == _history(tmp_path / "reference")


@needs_mnist
@pytest.mark.usefixtures("keep_threads")
def test_debug_cluster_runs_in_process(
    tmp_path: Path, data_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIR_CACHE_DIR", str(data_cache))
    code = run_all.main(
        [
            *SMOKE,
            "--cluster",
            "debug",
            "--variants",
            "air_nvil_fixed",
            "--seeds",
            "3",
            "--results",
            str(tmp_path / "results"),
            "--reports",
            str(tmp_path / "reports"),
        ]
    )
    assert code == 0
    (row,) = gather(tmp_path / "results").runs.itertuples()
    assert row.status == "complete" and row.seed == 3 and row.iterations == 12


@needs_mnist
@pytest.mark.usefixtures("keep_threads")
def test_local_grid_in_seed_groups_equals_one_run_per_job(
    tmp_path: Path, env: dict[str, str], data_cache: Path
) -> None:
    """group_size 2 over 3 seeds: 2 jobs; each seed keeps its own complete folder, with the
    numbers of the same seed trained alone (what a group_size 1 job runs; here in-process)."""
    grid = [*SMOKE, "--variants", "air_nvil_fixed", "--seeds", "0-2"]
    grouped = cli([*grid, "--group-size", "2", *_folders(tmp_path / "grouped")], env)
    assert grouped.returncode == 0, grouped.stdout + grouped.stderr
    assert "3 runs in 2 jobs (groups of up to 2 seeds)" in grouped.stdout

    runs = plan_grid(parse_args([*grid, "--results", str(tmp_path / "grouped" / "results")]))[1]
    jobs = [json.loads((r.run_dir / SUBMISSION).read_text())["job_id"] for r in runs]
    assert jobs[0] == jobs[1] != jobs[2]  # seeds 0 and 1 in one job, seed 2 in another
    for run in runs:
        alone = tmp_path / "single" / run.run_dir.name
        overrides = [f"out_dir={alone}", f"data.cache_dir={data_cache}"]
        cfg = load_config([("alone", to_dict(run.cfg))], overrides)
        Trainer(cfg).run()
        record = json.loads((run.run_dir / "result.json").read_text())
        assert record["status"] == "complete" and record["seed"] == run.seed
        assert record["experiment"] == "count" and record["variant"] == "air_nvil_fixed"
        assert (run.run_dir / "model.pt").exists() and (run.run_dir / "config.yaml").exists()
        assert not (run.run_dir / "checkpoint.pt").exists()  # a finished run keeps weights only
        _assert_close(record["final"], json.loads((alone / "result.json").read_text())["final"])
        history, reference = _history(run.run_dir), _history(alone)
        assert [h["iteration"] for h in history] == [4, 8, 12]
        for got, expected in zip(history, reference, strict=True):
            _assert_close(got, expected)
        (attempt,) = read_json_lines(run.run_dir / ATTEMPTS)
        assert attempt["end"] == "complete" and attempt["end_iteration"] == 12
        assert attempt.get("group_seeds") == ([0, 1] if run.seed < 2 else None)


def _folders(root: Path) -> list[str]:
    return ["--results", str(root / "results"), "--reports", str(root / "reports")]


def _assert_close(got: dict, expected: dict) -> None:
    """Equal up to float rounding: a seed group computes each seed's numbers in another order."""
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
        else:
            assert got[key] == value, key


# ---------------------------------------------------------------------------------- worker
def _tiny_task(tmp_path: Path, data_cache: Path, seed: int, *overrides: str) -> dict:
    """A worker task for a tiny run in tmp_path/seed_<seed>."""
    cfg = load_config(
        overrides=[
            *TINY, f"data.cache_dir={data_cache}", "train.threads=1", *overrides, f"seed={seed}",
            f"out_dir={tmp_path / f'seed_{seed}'}",
        ]
    )  # fmt: skip
    return {
        "experiment": "count",
        "variant": "air_nvil_fixed",
        "seed": seed,
        "config_hash": config_hash(cfg),
        "run_dir": cfg.out_dir,
        "config": to_dict(cfg),
        "stop_grace_s": 30,
    }


@needs_mnist
@pytest.mark.usefixtures("keep_threads")
def test_timeout_signal_checkpoints_at_next_iteration_then_hands_over(
    tmp_path: Path, data_cache: Path
) -> None:
    """SIGUSR2 (SLURM's timeout warning): the worker stops after the current iteration, saves a
    checkpoint there, and only then calls submitit's handler (here a stand-in), which requeues."""
    cfg = load_config(
        overrides=[
            *TINY,
            f"data.cache_dir={data_cache}",
            "train.iterations=60",
            "train.checkpoint_every=1000",
            "train.threads=1",
            f"out_dir={tmp_path / 'run'}",
        ]
    )
    task = {
        "experiment": "count",
        "variant": "air_nvil_fixed",
        "seed": 0,
        "config_hash": config_hash(cfg),
        "run_dir": cfg.out_dir,
        "config": to_dict(cfg),
        "stop_grace_s": 30,
    }
    handed_over = _signal_while_training(run_task, task, tmp_path / "run" / "metrics.jsonl")
    assert handed_over == [signal.SIGUSR2]
    (attempt,) = read_json_lines(tmp_path / "run" / ATTEMPTS)
    stopped = attempt["end_iteration"]
    assert attempt["end"] == "requeued" and 4 <= stopped < 60
    # Saved exactly where it stopped, although checkpoint_every is 1000.
    assert load_checkpoint(tmp_path / "run", task["config_hash"])["iteration"] == stopped
    assert not (tmp_path / "run" / "result.json").exists()

    again = run_task(task)  # a requeued job: resumes where it stopped
    assert again["status"] == "complete"
    assert read_json_lines(tmp_path / "run" / ATTEMPTS)[-1]["start_iteration"] == stopped


@needs_mnist
@pytest.mark.usefixtures("keep_threads")
def test_timeout_signal_stops_a_seed_group_which_resumes_every_member(
    tmp_path: Path, data_cache: Path
) -> None:
    """SIGUSR2 to a group: every member checkpoints after the current iteration, then submitit's
    handler requeues; the requeued group resumes each member where it stopped."""
    longer = ["train.iterations=60", "train.checkpoint_every=1000"]
    tasks = [_tiny_task(tmp_path, data_cache, seed, *longer) for seed in (0, 1)]
    group = {"group": tasks, "stop_grace_s": 30}
    handed_over = _signal_while_training(
        run_group_task, group, tmp_path / "seed_0" / "metrics.jsonl"
    )
    assert handed_over == [signal.SIGUSR2]
    stopped = []
    for task in tasks:
        run_dir = Path(task["run_dir"])
        (attempt,) = read_json_lines(run_dir / ATTEMPTS)
        assert attempt["end"] == "requeued" and attempt["group_seeds"] == [0, 1]
        assert 4 <= attempt["end_iteration"] < 60
        assert (
            load_checkpoint(run_dir, task["config_hash"])["iteration"] == attempt["end_iteration"]
        )
        assert not (run_dir / "result.json").exists()
        stopped.append(attempt["end_iteration"])
    assert stopped[0] == stopped[1]  # trained together, stopped together

    again = run_group_task(group)  # the requeued job
    assert [r["status"] for r in again] == ["complete", "complete"]
    for task in tasks:
        attempts = read_json_lines(Path(task["run_dir"]) / ATTEMPTS)
        assert attempts[-1]["start_iteration"] == stopped[0] and attempts[-1]["end"] == "complete"
    reference = Trainer(
        load_config([("ref", tasks[0]["config"])], [f"out_dir={tmp_path / 'reference'}"])
    ).run()
    _assert_close(again[0]["final"], reference["final"])


@needs_mnist
@pytest.mark.usefixtures("keep_threads")
def test_seed_group_leaves_out_complete_locked_and_broken_members(
    tmp_path: Path, data_cache: Path
) -> None:
    """Seed 0 is complete, seed 1 is held by another live process, seed 3's checkpoints are
    unreadable: seeds 2 and 4 train together, seed 3 gets its own error record."""
    tasks = [_tiny_task(tmp_path, data_cache, seed) for seed in range(5)]
    dirs = [Path(t["run_dir"]) for t in tasks]
    dirs[0].mkdir()
    done = {"status": "complete", "config_hash": tasks[0]["config_hash"], "seed": 0}
    (dirs[0] / "result.json").write_text(json.dumps(done))
    dirs[3].mkdir()
    (dirs[3] / "checkpoint.pt").write_bytes(b"not a checkpoint")

    with run_lock(dirs[1]) as mine:  # another flock on the file: as another process holds it
        assert mine
        records = run_group_task({"group": tasks, "stop_grace_s": 30})
    assert [r["status"] for r in records] == ["complete", "busy", "complete", "error", "complete"]
    assert records[0] == done and json.loads((dirs[0] / "result.json").read_text()) == done
    assert not (dirs[1] / "result.json").exists() and not (dirs[1] / ATTEMPTS).exists()
    assert "CheckpointError" in records[3]["error"] and "Traceback" in records[3]["error"]
    for k in (2, 4):
        record = json.loads((dirs[k] / "result.json").read_text())
        assert record["iterations"] == 12 and record["variant"] == "air_nvil_fixed"
    ends = {k: read_json_lines(dirs[k] / ATTEMPTS)[-1] for k in (0, 2, 3, 4)}
    assert [ends[k]["end"] for k in (0, 2, 3, 4)] == ["already complete", "complete", "error",
                                                     "complete"]  # fmt: skip
    assert ends[2]["group_seeds"] == [0, 1, 2, 3, 4] and ends[2]["busy_seeds"] == [1]
    assert ends[2]["start_iteration"] == 0 and ends[2]["end_iteration"] == 12


@needs_mnist
@pytest.mark.usefixtures("keep_threads")
def test_an_exception_in_a_seed_group_records_every_unfinished_member(
    tmp_path: Path, data_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(self: SeedGroup) -> list:
        raise RuntimeError("out of GPU memory, say")

    monkeypatch.setattr(SeedGroup, "run", boom)
    tasks = [_tiny_task(tmp_path, data_cache, seed) for seed in (0, 1)]
    records = run_group_task({"group": tasks, "stop_grace_s": 30})
    for task, record in zip(tasks, records, strict=True):
        assert record["status"] == "error" and record["seed"] == task["seed"]
        assert "Traceback" in record["error"] and "out of GPU memory" in record["error"]
        assert json.loads((Path(task["run_dir"]) / "result.json").read_text()) == record
        assert read_json_lines(Path(task["run_dir"]) / ATTEMPTS)[-1]["end"] == "error"
    with pytest.raises(RuntimeError, match="out of GPU memory"):  # --cluster debug: to pdb
        run_group_task({"group": tasks, "stop_grace_s": 30}, raise_errors=True)


# ---------------------------------------------------------------------------------- gather
def _fake_run(root: Path, variant: str, seed: int, evals: int, status: str = "complete") -> Path:
    run_dir = root / "count" / variant / "abc123" / f"seed_{seed}"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(
        "train:\n  iterations: 100\neval:\n  converged_accuracy: 0.98\n  converged_evals: 3\n"
    )
    lines = [
        {
            "iteration": 10 * (i + 1),
            "wall_time": float(i),
            "count_accuracy": i / evals,
            "count_accuracy_0": 1.0,
            "elbo": -100.0 + i,
            "confusion": [[1, 0], [0, 1]],
        }
        for i in range(evals)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    record = {
        "status": status,
        "outcome": "converged",
        "iterations": 100,
        "wall_time_s": 5.0,
        "evaluation_s": 0.5,
        "final_evaluation_s": 1.25,
        "final": {
            "count_accuracy": 0.99,
            "count_accuracy_2": 0.97,
            "elbo": -90.0,
            "confusion": [[1, 0], [0, 1]],
        },
        "config_hash": "abc123",
        "seed": seed,
        "provenance": {"git_commit": "abc", "host": "h", "device": "cpu"},
    }
    if status == "error":
        record = {"status": "error", "error": "Traceback ...\nValueError: boom", "seed": seed}
    (run_dir / "result.json").write_text(json.dumps(record))
    return run_dir


def test_gather_tables_and_unreadable_files(tmp_path: Path) -> None:
    root = tmp_path / "results"
    _fake_run(root, "a", 0, evals=3)
    _fake_run(root, "a", 1, evals=2, status="error")
    torn = _fake_run(root, "b", 0, evals=3)
    (torn / "result.json").write_text('{"status": "comp')  # truncated
    bad_line = _fake_run(root, "b", 1, evals=3)
    with open(bad_line / "metrics.jsonl", "a") as f:
        f.write("{not json\n" + json.dumps({"iteration": 99, "count_accuracy": 1.0}) + "\n")
    submitted = root / "count" / "c" / "abc123" / "seed_0"
    submitted.mkdir(parents=True)
    (submitted / "submission.json").write_text(
        json.dumps({"cluster": "slurm", "job_name": "air-x-0"})
    )

    g = gather(root)
    runs = g.runs.set_index(["variant", "seed"])
    assert list(g.runs.columns) == RUN_COLUMNS
    assert runs.loc[("a", 0), "status"] == "complete"
    assert runs.loc[("a", 0), "final_count_accuracy_2"] == 0.97
    assert pd.isna(runs.loc[("a", 0), "final_count_accuracy_3"])
    assert json.loads(runs.loc[("a", 0), "final_confusion"]) == [[1, 0], [0, 1]]
    assert runs.loc[("a", 0), "target_iterations"] == 100
    assert runs.loc[("a", 0), ["evaluation_s", "final_evaluation_s"]].tolist() == [0.5, 1.25]
    assert runs.loc[("a", 1), "status"] == "error" and "boom" in runs.loc[("a", 1), "error"]
    assert runs.loc[("b", 0), "status"] == "partial"  # unreadable result: flagged, not raised
    assert "unreadable" in runs.loc[("b", 0), "error"]
    assert runs.loc[("c", 0), "status"] == "queued"  # submitted, nothing yet, no SLURM here
    assert any("not valid JSON" in p for p in g.problems)
    assert len(g.evals[g.evals.variant == "b"]) == 3 + 3 + 1  # the bad line alone is skipped
    assert set(g.evals.columns) >= {
        "experiment",
        "variant",
        "seed",
        "config_hash",
        "iteration",
        "count_accuracy",
        "elbo",
        "confusion",
    }
    assert pd.read_csv(root / "runs.csv").shape == g.runs.shape


def test_concurrent_gathers_leave_complete_files(tmp_path: Path) -> None:
    root = tmp_path / "results"
    for v in range(4):
        for seed in range(5):
            _fake_run(root, f"v{v}", seed, evals=100)
    expected = gather(root)
    script = (
        "import sys; from pathlib import Path; from bench.gather import gather\n"
        "for _ in range(5): gather(Path(sys.argv[1]))\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(root)], cwd=ROOT, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    reads = 0
    while any(p.poll() is None for p in procs):
        # Whatever moment it is read, each file is one whole version.
        assert pd.read_csv(root / "runs.csv").shape == expected.runs.shape
        assert pd.read_csv(root / "evals.csv").shape == expected.evals.shape
        reads += 1
    for p in procs:
        assert p.wait() == 0, p.stderr.read()
    assert reads > 0
    assert sorted(f.name for f in root.iterdir() if f.is_file()) == ["evals.csv", "runs.csv"]


def _signal_while_training(run: Callable[[dict], Any], task: dict, started: Path) -> list[int]:
    """Run `run(task)` and send SIGUSR2 once `started` exists, with a stand-in for submitit's
    handler that requeues (SystemExit); returns the signals the stand-in received."""
    handed_over = []

    def submitit_handler(signum: int, frame: object) -> None:
        handed_over.append(signum)
        raise SystemExit(-1)  # what submitit does after `scontrol requeue`

    def send_when_training() -> None:
        while not started.exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGUSR2)

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    threading.Thread(target=send_when_training, daemon=True).start()
    try:
        with pytest.raises(SystemExit):
            run(task)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    return handed_over
