"""Stopping the grid: Ctrl-C and SIGTERM checkpoint the running runs and record them
"interrupted" (never "error"), a killed launcher leaves no worker behind, and the workers'
signal handling in-process (a stop that arrives inside a training step).

The launcher tests go through the real entry point (`python run_all.py`) as subprocesses, on
the smoke profile, as a user would stop it: SIGINT to its process group (a terminal's Ctrl-C),
SIGTERM or SIGKILL to its pid.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import bench.trainer as trainer_module
import run_all
from bench.grid import ATTEMPTS, SUBMISSION, lock_holder
from bench.storage import read_json_lines
from bench.trainer import Trainer, load_checkpoint
from bench.worker import run_group_task, run_task
from tests.conftest import ROOT, needs_mnist
from tests.test_launcher import SMOKE, _runs, _tiny_task, cli, keep_threads  # noqa: F401

LONG = ["train.iterations=3000", "train.eval_every=20", "train.checkpoint_every=1000"]
HAS_CXX = any(shutil.which(c) for c in ("c++", "g++", "clang++"))


@pytest.fixture
def env(data_cache: Path) -> dict[str, str]:
    """The environment of a CLI subprocess: the session's multi-MNIST cache, no SLURM."""
    out = {**os.environ, "AIR_CACHE_DIR": str(data_cache)}
    out.pop("SLURM_CONF", None)
    return out


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """run_all.py in a session of its own, as a terminal runs a foreground command."""
    return subprocess.Popen(
        [sys.executable, "run_all.py", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie is not: it has exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _assert_stopped_cleanly(
    run_dir: Path, config_hash: str, signame: str, own_process: bool = False
) -> int:
    """The run was checkpointed where it stopped and recorded interrupted; no worker is left."""
    record = json.loads((run_dir / "result.json").read_text())
    assert record["status"] == "interrupted" and record["signal"] == signame, record
    stopped = record["iteration"]
    assert 0 < stopped < 3000
    assert load_checkpoint(run_dir, config_hash)["iteration"] == stopped  # lossless stop
    assert json.loads((run_dir / "progress.json").read_text())["iteration"] == stopped
    attempt = read_json_lines(run_dir / ATTEMPTS)[-1]
    assert attempt["end"] == "interrupted" and attempt["end_iteration"] == stopped
    assert lock_holder(run_dir) is None  # released
    assert own_process or not _alive(attempt["pid"])  # no orphan
    return stopped


# ---------------------------------------------------------------------------------- launcher
@needs_mnist
def test_sigterm_to_run_all_stops_its_workers_which_checkpoint(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """`kill <pid>` of run_all.py (local cluster): both running workers checkpoint and stop,
    run_all exits 143, and the run that had failed before is now "interrupted", not "error"."""
    grid = ["--variants", "air_nvil_fixed", "--seeds", "0-1"]
    args = [*SMOKE, *grid, "--results", str(tmp_path / "results"), *LONG]
    runs = _runs(tmp_path, *grid, *LONG)
    stale = {"status": "error", "error": "Traceback ...\nRuntimeError: an earlier crash"}
    runs[1].run_dir.mkdir(parents=True)
    (runs[1].run_dir / "result.json").write_text(json.dumps(stale))

    proc = _start(args, env)
    try:
        _wait_for(
            lambda: all(read_json_lines(r.run_dir / "metrics.jsonl") for r in runs),
            180,
            "both runs to evaluate once",
        )
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, out
    assert "stopping 2 running job(s)" in out
    for run in runs:
        stopped = _assert_stopped_cleanly(run.run_dir, run.config_hash, "SIGTERM")
        assert f"interrupted {run.name}: stopped; the same command resumes it" in out
        record = json.loads((run.run_dir / "result.json").read_text())
        assert record["provenance"]["command"] == shlex.join(["run_all.py", *args])
        submission = json.loads((run.run_dir / SUBMISSION).read_text())
        assert not _alive(int(submission["job_id"]))  # the job's controller is gone too

        plan = cli([*args, "--dry-run"], env)
        assert f"resume count/air_nvil_fixed/seed_{run.seed}" in plan.stdout
        assert f"interrupted by SIGTERM at iteration {stopped}: resume from" in plan.stdout


@needs_mnist
@pytest.mark.slow
@pytest.mark.skipif(not HAS_CXX, reason="torch.compile on CPU needs a C++ compiler")
def test_ctrl_c_of_a_compiled_run_records_interrupted_never_error(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """The issue's case: Ctrl-C (SIGINT to the terminal's process group) while compiled runs
    train. Before, the KeyboardInterrupt raised inside a custom op of the compiled graph came
    out as a RuntimeError and the run was recorded as a crash."""
    grid = ["--variants", "air_nvil_fixed", "--seeds", "0"]
    args = [*SMOKE, *grid, "--results", str(tmp_path / "results"), *LONG, "train.compile=true"]
    (run,) = _runs(tmp_path, *grid, *LONG, "train.compile=true")
    proc = _start(args, env)
    try:
        _wait_for(
            lambda: bool(read_json_lines(run.run_dir / "metrics.jsonl")), 300, "an evaluation"
        )
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out
    _assert_stopped_cleanly(run.run_dir, run.config_hash, "SIGINT")
    record = json.loads((run.run_dir / "result.json").read_text())
    assert "exception" not in record and "error" not in record  # nothing was cut short
    assert "compile_failed" not in load_checkpoint(run.run_dir, None)["status"]


@needs_mnist
def test_a_killed_launcher_leaves_no_worker_training(tmp_path: Path, env: dict[str, str]) -> None:
    """SIGKILL to run_all.py alone: its job's controller is told by the kernel (Linux) and
    stops the worker, which checkpoints; nothing keeps training on its own."""
    grid = ["--variants", "air_nvil_fixed", "--seeds", "0"]
    args = [*SMOKE, *grid, "--results", str(tmp_path / "results"), *LONG]
    (run,) = _runs(tmp_path, *grid, *LONG)
    proc = _start(args, env)
    try:
        _wait_for(
            lambda: bool(read_json_lines(run.run_dir / "metrics.jsonl")), 180, "an evaluation"
        )
        proc.kill()
        proc.communicate(timeout=30)
        _wait_for(lambda: run.run_dir.joinpath("result.json").exists(), 60, "the worker to stop")
        _wait_for(lambda: lock_holder(run.run_dir) is None, 30, "the worker to exit")
    finally:
        job = json.loads((run.run_dir / SUBMISSION).read_text())["job_id"]
        if _alive(int(job)):
            os.killpg(int(job), signal.SIGKILL)
    _assert_stopped_cleanly(run.run_dir, run.config_hash, "SIGTERM")


# ---------------------------------------------------------------------------------- worker
def _interrupting_step(at: int, then_raise: bool) -> Callable:
    """Trainer.step that, at iteration `at`, gets SIGINT in the middle of the step (as Ctrl-C
    inside a custom op would), and then, if asked, fails as the op does when a
    KeyboardInterrupt is raised inside it (compiled code turns it into a RuntimeError)."""
    real = Trainer.step

    def step(self: Trainer, x: Any, prior_prob: float) -> Any:
        if self.iteration == at:
            os.kill(os.getpid(), signal.SIGINT)
            if then_raise:
                raise RuntimeError(
                    'aoti_torch_call_dispatcher("air::sparse_weight_grad", ...) API call failed'
                )
        return real(self, x, prior_prob)

    return step


@needs_mnist
@pytest.mark.usefixtures("keep_threads")
@pytest.mark.parametrize("then_raise", [False, True], ids=["clean", "op-raises"])
def test_a_stop_inside_a_step_is_an_interruption_never_an_error(
    tmp_path: Path, data_cache: Path, monkeypatch: pytest.MonkeyPatch, then_raise: bool
) -> None:
    task = _tiny_task(tmp_path, data_cache, 0, "train.iterations=60", "train.checkpoint_every=40")
    run_dir = Path(task["run_dir"])
    run_dir.mkdir()
    (run_dir / "result.json").write_text(json.dumps({"status": "error", "error": "stale"}))
    monkeypatch.setattr(trainer_module.Trainer, "step", _interrupting_step(7, then_raise))

    before = signal.getsignal(signal.SIGINT)
    record = run_task(task)
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    assert record["status"] == "interrupted" and record["signal"] == "SIGINT"
    assert json.loads((run_dir / "result.json").read_text()) == record  # the stale error is gone
    (attempt,) = read_json_lines(run_dir / ATTEMPTS)
    assert attempt["end"] == "interrupted"
    if then_raise:  # cut short mid-step: resumes from its last periodic checkpoint (none yet)
        assert record["iteration"] is None and "API call failed" in record["exception"]
        assert load_checkpoint(run_dir, task["config_hash"]) is None
    else:  # the step finished, then the loop stopped and saved where it was
        assert record["iteration"] == 8 == attempt["end_iteration"]
        assert load_checkpoint(run_dir, task["config_hash"])["iteration"] == 8
    monkeypatch.undo()
    again = run_task(task)  # the next launch resumes it to the end
    assert again["status"] == "complete" and again["iterations"] == 60


@needs_mnist
@pytest.mark.usefixtures("keep_threads")
def test_sigterm_stops_a_seed_group_and_records_every_member_interrupted(
    tmp_path: Path, data_cache: Path
) -> None:
    tasks = [_tiny_task(tmp_path, data_cache, seed, *LONG[:1]) for seed in (0, 1)]
    started = Path(tasks[0]["run_dir"]) / "metrics.jsonl"

    def kill_when_training() -> None:
        while not started.exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=kill_when_training, daemon=True).start()
    records = run_group_task({"group": tasks, "stop_grace_s": 30})
    assert [r["status"] for r in records] == ["interrupted", "interrupted"]
    stopped = {r["iteration"] for r in records}
    assert len(stopped) == 1 and 0 < stopped.pop() < 3000  # trained together, stopped together
    for task, record in zip(tasks, records, strict=True):
        run_dir = Path(task["run_dir"])
        assert load_checkpoint(run_dir, task["config_hash"])["iteration"] == record["iteration"]
        assert read_json_lines(run_dir / ATTEMPTS)[-1]["end"] == "interrupted"


@needs_mnist
@pytest.mark.usefixtures("keep_threads")
def test_ctrl_c_in_the_debug_cluster_checkpoints_and_stops_the_grid(
    tmp_path: Path, data_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--cluster debug trains in this process: Ctrl-C stops the run after its step, with its
    checkpoint, and the grid stops there (exit 130; the second seed is not started)."""
    monkeypatch.setenv("AIR_CACHE_DIR", str(data_cache))
    grid = ["--variants", "air_nvil_fixed", "--seeds", "0-1"]
    runs = _runs(tmp_path, *grid, *LONG)
    started = runs[0].run_dir / "metrics.jsonl"

    def ctrl_c_when_training() -> None:
        while not started.exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=ctrl_c_when_training, daemon=True).start()
    args = [*SMOKE, *grid, "--cluster", "debug", "--results", str(tmp_path / "results"), *LONG]
    assert run_all.main(args) == 130
    _assert_stopped_cleanly(runs[0].run_dir, runs[0].config_hash, "SIGINT", own_process=True)
    assert not runs[1].run_dir.exists()
