"""`run_all.py --cluster slurm` end to end on a real single-node SLURM cluster (smoke profile).

One scenario, in the order a user lives it: a grid of 2 variants x 3 seeds in groups of up to
2 seeds (4 jobs: seeds 0-1 trained together, seed 2 alone) goes out as two job arrays
(max_array_size=3) and a report job; one running group task is forced through a timeout
(SIGUSR2, as SLURM sends it), checkpoints both seeds, is requeued and resumes both; an
invocation while the jobs run submits nothing; the report job runs after the arrays; a last
invocation submits nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit

from bench.grid import ATTEMPTS, SUBMISSION
from bench.storage import read_json_lines
from tests.conftest import ROOT, needs_mnist
from tests.slurm_fixtures import slurm_cluster  # noqa: F401  (the fixture)

pytestmark = needs_mnist

VARIANTS = "air_nvil_fixed,air_concrete"
# Long enough (a few seconds) that a task can be caught mid-training; evaluations and
# checkpoints every 20 iterations.
LONGER = ["train.iterations=150", "train.eval_every=20", "train.checkpoint_every=20"]


def _job_names() -> list[str]:
    """Every submission this cluster has accounted for (sacct sees finished ones too), as
    "<job id>|<name>" with array task suffixes dropped: an array's tasks start, are requeued and
    finish while a test looks (its entries in sacct/squeue change then), but a new submission
    always brings a new job id."""
    out = subprocess.run(
        [
            "sacct",
            "--noheader",
            "--parsable2",
            "--allocations",
            "--starttime=2000-01-01",
            "--format=JobID,JobName",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    queued = subprocess.run(
        ["squeue", "--noheader", "--array", "--format=%i|%j"],
        capture_output=True,
        text=True,
        check=True,
    )
    entries = set(out.stdout.split()) | set(queued.stdout.split())
    return sorted({f"{e.split('|')[0].split('_')[0]}|{e.split('|', 1)[-1]}" for e in entries})


def _run_all_on_slurm(tmp_path: Path, *args: str) -> list[str]:
    """The run_all.py command line of these tests: the smoke profile on the local cluster,
    results and reports under `tmp_path`, runs long enough (LONGER) to be caught mid-training."""
    return [
        sys.executable, "run_all.py", "--cluster", "slurm", "--profile", "smoke",
        "--results", str(tmp_path / "results"), "--reports", str(tmp_path / "reports"),
        "--no-progress", *args, *LONGER,
    ]  # fmt: skip


def _wait_for(check, timeout: float, what: str):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.usefixtures("slurm_cluster")
def test_grid_on_slurm_requeue_resume_and_no_double_submit(
    tmp_path: Path, data_cache: Path
) -> None:
    results = tmp_path / "results"
    env = {**os.environ, "AIR_CACHE_DIR": str(data_cache)}
    cmd = _run_all_on_slurm(
        tmp_path, "--experiments", "count", "--variants", VARIANTS, "--seeds", "0-2",
        "profile.slurm.max_array_size=3", "profile.group_size=2",
    )  # fmt: skip

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*cmd, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )

    # A resource the cluster cannot give is refused before anything is submitted.
    before = _job_names()
    bad = run("profile.resources.gpus_per_node=1")
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "SLURM rejects" in bad.stderr and "gres" in bad.stderr.lower()
    assert _job_names() == before

    first = subprocess.Popen(
        [*cmd, "--wait"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        target = _wait_for(
            lambda: next(iter(results.glob("count/air_nvil_fixed/*/seed_0")), None),
            60,
            "the first run folder",
        )
        partner = target.parent / "seed_1"  # trained in the same task
        # Caught mid-training: after its first evaluation and checkpoint, before the end.
        _wait_for(
            lambda: len(read_json_lines(target / "metrics.jsonl")) >= 1,
            90,
            "the target run's first evaluation",
        )
        job_id = json.loads((target / SUBMISSION).read_text())["job_id"]
        assert json.loads((partner / SUBMISSION).read_text())["job_id"] == job_id
        job = submitit.SlurmJob(folder=tmp_path / "unused", job_id=job_id)
        job._interrupt(timeout=True)  # SIGUSR2, exactly what SLURM sends before a time limit

        # While the arrays are queued or running, a second invocation submits nothing.
        names = _job_names()
        second = run()
        assert second.returncode == 0, second.stdout + second.stderr
        assert "nothing to submit" in second.stdout, second.stdout
        assert "to start" not in second.stdout and "to resume" not in second.stdout
        assert _job_names() == names

        out, _ = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, out
    assert "submitted array" in out and "report job" in out
    assert "6 runs in 4 jobs (groups of up to 2 seeds)" in out

    session = json.loads(next(results.glob(".submitit/*/session.json")).read_text())
    assert [a["tasks"] for a in session["arrays"]] == [3, 1]  # split at max_array_size
    assert [a["runs"] for a in session["arrays"]] == [5, 1]  # tasks: seeds 0-1, 2, 0-1 | 2
    assert len(session["runs"]) == 6
    for run_dir in results.glob("count/*/*/seed_*"):
        record = json.loads((run_dir / "result.json").read_text())
        assert record["status"] == "complete" and record["iterations"] == 150, run_dir
        assert record["provenance"]["slurm_job_id"], run_dir

    # Both seeds of the interrupted task checkpointed where they stopped, were requeued, and
    # resumed from there.
    log = Path(json.loads((target / SUBMISSION).read_text())["stderr"]).read_text()
    for run_dir in (target, partner):
        attempts = read_json_lines(run_dir / ATTEMPTS)
        assert [a["end"] for a in attempts] == ["requeued", "complete"], attempts
        assert attempts[0]["group_seeds"] == [0, 1]
        stopped_at = attempts[0]["end_iteration"]
        assert 0 < stopped_at < 150
        assert attempts[1]["start_iteration"] == stopped_at
        assert attempts[1]["restart_count"] == "1"  # SLURM_RESTART_COUNT of the requeued job
        assert f"/{run_dir.name}: resuming from iteration {stopped_at}" in log

    # The report job ran after the arrays and gathered every run.
    report = submitit.SlurmJob(Path(session["folder"]) / "%j", session["report"]["job_id"])
    report._results_timeout_s = 5
    assert report.result()["runs"] == {"complete": 6}
    runs_csv = (results / "runs.csv").read_text()
    assert runs_csv.count(",complete,") == 6

    # Everything is complete: a last invocation submits nothing at all.
    names = _job_names()
    last = run()
    assert last.returncode == 0, last.stdout + last.stderr
    assert "6 runs: 6 to skip" in last.stdout and "nothing to submit" in last.stdout
    assert _job_names() == names


@pytest.mark.usefixtures("slurm_cluster")
def test_runs_whose_group_job_died_are_recorded_and_submitted_again(
    tmp_path: Path, data_cache: Path
) -> None:
    """A job killed from outside (scancel here; a node failure or a hard time limit alike) leaves
    no result: the next invocation records each of its runs (here a group of 2 seeds) as failed,
    with the job's state, and submits them again."""
    results = tmp_path / "results"
    env = {**os.environ, "AIR_CACHE_DIR": str(data_cache)}
    cmd = _run_all_on_slurm(
        tmp_path, "--variants", "air_nvil_fixed", "--seeds", "0-1", "--group-size", "2"
    )
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "2 runs in 1 job (groups of up to 2 seeds)" in first.stdout
    run_dirs = sorted(results.glob("count/air_nvil_fixed/*/seed_*"))
    job_id = json.loads((run_dirs[0] / SUBMISSION).read_text())["job_id"]
    assert json.loads((run_dirs[1] / SUBMISSION).read_text())["job_id"] == job_id
    subprocess.run(["scancel", job_id], check=True)
    _wait_for(
        lambda: (
            "CANCELLED"
            in subprocess.run(
                ["sacct", "--noheader", "--allocations", f"--jobs={job_id}", "--format=State"],
                capture_output=True,
                text=True,
            ).stdout
        ),
        30,
        "sacct to record the cancellation",
    )

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count(f"SLURM job {job_id} ended CANCELLED") == 2, again.stdout
    assert "retry  count/air_nvil_fixed/seed_0" in again.stdout
    assert "retry  count/air_nvil_fixed/seed_1" in again.stdout
    assert "submitted array" in again.stdout
    resubmitted = [json.loads((d / SUBMISSION).read_text()) for d in run_dirs]
    assert resubmitted[0]["job_id"] == resubmitted[1]["job_id"] != job_id
    resubmitted = resubmitted[0]
    subprocess.run(["scancel", f"--name={resubmitted['job_name']}"], check=True)
    subprocess.run(
        ["scancel", f"--name={resubmitted['job_name'].rsplit('-', 1)[0]}-report"], check=True
    )
