"""The report against the grid that was asked for, over a results folder that mixes configs.

The scenario of issue 14: smoke runs (12 iterations) and an interrupted CPU grid (7000
iterations) in the same results folder. The run folders are written directly (configs resolved
by the launcher's own planning, so hashes and layout are the real ones); the grid records are
written by the launcher's hook (`bench.grid_record.record_grid`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from bench.config import to_yaml
from bench.gather import gather
from bench.grid_record import (
    FOLDER,
    AskedRun,
    GridRecord,
    experiment_records,
    latest_record,
    read_records,
    record_grid,
    seed_ranges,
    write_record,
)
from bench.launcher import parse_args, plan_grid
from bench.report import build_all, build_reports
from tests.conftest import needs_mnist
from tests.test_report import _run, rows_by_variant, tables

TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "bench/trainer.py", line 280, in _loop\n'
    "RuntimeError: the loss became a string\n"
)


# ---------------------------------------------------------------------------------- fixture
def _final(accuracy: float) -> dict:
    """Final metrics whose confusion matrix has the given accuracy (errors over-count)."""
    per = 100
    right = round(accuracy * per)
    confusion = [[right if i == j else (per - right if j == min(i + 1, 3) else 0)
                  for j in range(4)] for i in range(3)] + [[0, 0, 0, 0]]  # fmt: skip
    acc = right / per
    return {
        "metrics_version": 2, "count_accuracy": acc, "count_accuracy_0": acc,
        "count_accuracy_1": acc, "count_accuracy_2": acc, "count_accuracy_mode": acc,
        "count_accuracy_in_distribution": acc, "over_count_rate": 1 - acc,
        "under_count_rate": 0.0, "elbo": -150.0, "iw_bound": -140.0, "lme_elbo_bound": -141.0,
        "elbo_at_0.01": -150.0, "iw_bound_at_0.01": -140.0, "lme_elbo_bound_at_0.01": -141.0,
        "likelihood": "gaussian", "likelihood_sd": 0.3, "prior_prob": 0.01, "box_iou": 0.6,
        "box_iou_frame": 0.7, "box_precision": 0.8, "box_recall": 0.75, "mean_count": 1.3,
        "confusion": confusion, "confusion_mode": confusion,
    }  # fmt: skip


def write_run(spec, status: str, accuracy: float = 0.5) -> None:
    """A run folder as the worker leaves it: config, evaluations, and (unless it was cut short)
    result.json."""
    d = spec.run_dir
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(to_yaml(spec.cfg))
    total = spec.cfg.train.iterations
    done = total if status != "partial" else total // 2
    points = [max(1, done * k // 4) for k in range(1, 5)]
    (d / "metrics.jsonl").write_text("".join(
        json.dumps({"iteration": it, "wall_time": it * 0.03, "count_accuracy": accuracy * it / done,
                    "elbo": -200.0 + it / done * 50}) + "\n"
        for it in points
    ))  # fmt: skip
    provenance = {"git_commit": "abc", "device": "cpu", "host": "vm",
                  "command": "python run_all.py --profile cpu"}  # fmt: skip
    if status == "complete":
        record = {"status": "complete", "outcome": "not_converged", "iterations": total,
                  "wall_time_s": total * 0.03, "iterations_to_target": None,
                  "final": _final(accuracy), "config_hash": spec.config_hash, "seed": spec.seed,
                  "provenance": provenance}  # fmt: skip
    elif status == "error":
        record = {"status": "error", "error": TRACEBACK, "experiment": spec.experiment,
                  "variant": spec.variant, "seed": spec.seed, "config_hash": spec.config_hash,
                  "provenance": provenance}  # fmt: skip
    else:
        return  # cut short: no result, nothing holds it
    (d / "result.json").write_text(json.dumps(record))


def launch(results: Path, *words: str) -> list:
    """Plan a grid exactly as run_all.py does and record it with the launcher's hook."""
    args = parse_args(["--results", str(results), "--no-progress", *words])
    profile, runs, broken = plan_grid(args)
    assert record_grid(results, args, profile, runs, broken) is not None
    return runs


VARIANTS = "air_nvil_fixed,air_concrete,dair_nvil"


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Smoke runs of three variants (seeds 0-1, all complete), then a CPU grid of the same three
    (seeds 0-2) that was interrupted: NVIL 2 complete + 1 cut short, Concrete 1 complete +
    1 crashed + 1 never started, DAIR never started."""
    tmp = tmp_path_factory.mktemp("mixed")
    results = tmp / "results"
    smoke = launch(results, "--profile", "smoke", "-e", "count", "-v", VARIANTS, "-s", "0-1")
    for spec in smoke:
        write_run(spec, "complete", accuracy=0.4)
    # The smoke grid was asked first; make its record older than the CPU grid's for certain.
    (old,), _ = read_records(results)
    old.last_asked_at = old.first_asked_at = old.first_asked_at - 3600
    write_record(results, old)
    cpu = {(r.variant, r.seed): r for r in launch(results, "--profile", "cpu", "-e", "count",
                                                  "-v", VARIANTS, "-s", "0-2")}  # fmt: skip
    write_run(cpu["air_nvil_fixed", 0], "complete", accuracy=0.80)
    write_run(cpu["air_nvil_fixed", 1], "complete", accuracy=0.86)
    write_run(cpu["air_nvil_fixed", 2], "partial", accuracy=0.5)
    write_run(cpu["air_concrete", 0], "complete", accuracy=0.35)
    write_run(cpu["air_concrete", 1], "error")
    pages = build_all(results, tmp / "reports", reconstructions=False)
    return {
        "tmp": tmp, "results": results, "pages": pages,
        "html": {p.name: p.read_text() for p in pages},
        "cpu": cpu, "smoke": {(r.variant, r.seed): r for r in smoke},
    }  # fmt: skip


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", html)


def _rows(html: str, table: str = "verdict-table") -> dict[str, dict]:
    """Rows of a table by their data-row key (attributes and cells)."""
    return {r["attrs"]["data-row"]: r for r in tables(html)[table] if "data-row" in r["attrs"]}


# ---------------------------------------------------------------------------------- rows
def test_one_row_per_variant_and_config(mixed: dict) -> None:
    rows = _rows(mixed["html"]["count.html"])
    hashes = {r["attrs"]["data-config"] for r in rows.values()}
    expected = {s.config_hash for s in [*mixed["cpu"].values(), *mixed["smoke"].values()]}
    assert hashes == expected and len(rows) == 6  # 3 variants x 2 configs, none pooled
    for variant in VARIANTS.split(","):
        cpu, smoke = f"{variant} \u00b7 7,000 it.", f"{variant} \u00b7 12 it."
        assert rows[cpu]["attrs"]["data-config"] == mixed["cpu"][variant, 0].config_hash
        assert rows[smoke]["attrs"]["data-config"] == mixed["smoke"][variant, 0].config_hash
        assert "not in the asked grid" in rows[smoke]["cells"][0]
        assert "not in the asked grid" not in rows[cpu]["cells"][0]
    nvil = rows["air_nvil_fixed \u00b7 7,000 it."]["cells"]
    assert nvil[1].startswith("0/2 (0.00)") and "+1 not finished" in nvil[1]
    assert nvil[3].startswith("0.830")  # median of 0.80 and 0.86: the smoke runs stay out
    assert "1 asked run missing" not in nvil[0]
    assert "1 asked run missing" in rows["air_concrete \u00b7 7,000 it."]["cells"][0]
    assert "3 asked runs missing" in rows["dair_nvil \u00b7 7,000 it."]["cells"][0]
    assert rows["air_nvil_fixed \u00b7 12 it."]["cells"][1].startswith("0/2 (0.00)")
    # Asked-grid rows first, then the others under their own heading.
    order = [r["attrs"].get("data-row") for r in tables(mixed["html"]["count.html"])[
        "verdict-table"] if "data-row" in r["attrs"]]  # fmt: skip
    assert [k.endswith("7,000 it.") for k in order] == [True] * 3 + [False] * 3
    assert "Not in the asked grid" in mixed["html"]["count.html"]


def test_published_figures_not_compared_with_short_runs(mixed: dict) -> None:
    rows = _rows(mixed["html"]["count.html"])
    smoke = rows["air_nvil_fixed \u00b7 12 it."]["cells"]
    # The rule: at least min(the source's training length, 25,000) iterations.
    assert smoke[-1] == ("budget 12 iterations < 25,000; the source trained 200,000: "
                         "not comparable")  # fmt: skip
    assert "success rate: 0.80" in smoke[-3]  # the published figures are still shown
    cpu = rows["air_nvil_fixed \u00b7 7,000 it."]["cells"]
    assert cpu[-1] == ("budget 7,000 iterations < 25,000; the source trained 200,000: "
                       "not comparable")  # fmt: skip
    assert not re.search(r"[-+]\d", cpu[-1])  # no difference is printed at all


def test_comparisons_only_between_rows_of_one_budget(mixed: dict) -> None:
    pairs = [(r["cells"][0], r["cells"][1]) for r in tables(mixed["html"]["count.html"])[
        "comparison-table"][1:]]  # fmt: skip
    assert pairs  # the smoke rows (all finished) compare with each other ...
    for a, b in pairs:  # ... and never with a 7000-iteration row
        assert a.split("\u00b7")[1] == b.split("\u00b7")[1], (a, b)


def test_convergence_rule_is_one_sentence_and_per_row(mixed: dict) -> None:
    html = _text(mixed["html"]["count.html"])
    assert html.count("Converged means") == 1
    sentence = html.split("Converged means")[1].split(".</p>")[0]
    assert "N = 1 or 3" in sentence  # smoke: the last evaluation; cpu: the last 3
    rows = _rows(mixed["html"]["count.html"])
    smoke, cpu = rows["air_nvil_fixed \u00b7 12 it."], rows["air_nvil_fixed \u00b7 7,000 it."]
    assert "converged: \u2265 0.98 in the last evaluation" in smoke["cells"][1]
    assert "converged: \u2265 0.98 in each of the last 3 evaluations" in cpu["cells"][1]


# ---------------------------------------------------------------------------------- status
def test_status_names_the_asked_grid_and_counts_its_missing_runs(mixed: dict) -> None:
    for page in ("index.html", "count.html"):
        html = mixed["html"][page]
        text = _text(html)
        assert 'id="status" data-state="incomplete"' in html, page
        assert "Complete:" not in html, page
        status = html.split('id="status"')[1].split("</div>")[0]
        counts = dict(re.findall(r'data-count="(\w+)"[^>]*><strong>(\d+)</strong>', status))
        assert counts == {"complete": "3", "failed": "1", "running": "0", "interrupted": "1",
                          "missing": "4"}, page  # fmt: skip
        assert "4 of the 9 runs of the asked grid" in _text(status), page
        grid = {r["cells"][0]: r["cells"][1] for r in tables(html)["grid-table"]}
        assert grid["profile"].startswith("cpu (7,000 iterations per run)")
        assert grid["experiments"] == "count" and grid["seeds"] == "0-2"
        assert grid["variants"] == "air_nvil_fixed, air_concrete, dair_nvil"
        assert grid["overrides"] == "none"
        assert "the latest of 2 grids recorded" in grid["asked"]
        assert "--profile cpu" in grid["command"] and "--seeds 0-2" in grid["command"]
        assert "missing</strong>: " in text
        assert re.search(r"dair_nvil \u00b7 7,000 it\. &mdash; seeds 0-2 \(no run folder\)", text)
        assert re.search(r"air_concrete \u00b7 7,000 it\. &mdash; seed 2 \(no run folder\)", text)
        assert "6 runs on disk" in text and "outside the asked grid" in text
    index = tables(mixed["html"]["index.html"])["experiments-table"]
    cells = dict(zip(index[0]["cells"], index[1]["cells"], strict=True))
    assert cells["asked runs"] == "9" and cells["missing"] == "4" and cells["state"] == "incomplete"
    assert cells["runs outside the asked grid"] == "6"


def test_overview_lists_each_config_apart(mixed: dict) -> None:
    rows = rows_by_variant(mixed["html"]["index.html"], "overview-table")
    nvil = rows["air_nvil_fixed"][1]
    assert "7,000 iterations" in nvil and "12 iterations" in nvil
    assert nvil.index("7,000 iterations") < nvil.index("12 iterations")
    assert "not in the asked grid" in nvil.split("12 iterations")[1]


def test_without_a_grid_record_nothing_is_called_complete(tmp_path: Path) -> None:
    runs = pd.DataFrame([_run("main", "air_nvil_fixed", s) for s in range(3)])
    pages = build_reports(runs, None, tmp_path, reconstructions=False)
    for page in pages:
        html = page.read_text()
        assert 'data-state="unknown"' in html and "No record of the asked grid" in html
        assert "Complete:" not in html


def test_a_complete_grid_says_so(tmp_path: Path) -> None:
    runs = pd.DataFrame([_run("main", "air_nvil_fixed", s) for s in range(3)])
    asked = [AskedRun("main", "air_nvil_fixed", "abc123", s, 200_000) for s in range(3)]
    grid = GridRecord("g", "python run_all.py", "paper", "slurm", ["main"], ["air_nvil_fixed"],
                      [0, 1, 2], [], asked, first_asked_at=1e9, last_asked_at=1e9)  # fmt: skip
    html = build_reports(runs, None, tmp_path, grid=grid, reconstructions=False)[1].read_text()
    assert 'data-state="complete"' in html and "Complete:</strong> all 3 runs" in html
    grid.runs.append(AskedRun("main", "air_nvil_fixed", "abc123", 3, 200_000))
    html = build_reports(runs, None, tmp_path, grid=grid, reconstructions=False)[1].read_text()
    assert 'data-state="incomplete"' in html and "Complete:" not in html


# ---------------------------------------------------------------------------------- paths
def test_no_machine_paths_run_folders_relative_to_results(mixed: dict) -> None:
    tmp = str(mixed["tmp"])
    for name, html in mixed["html"].items():
        assert tmp not in html, name
    failed = {(r["cells"][0], r["cells"][1]): r["cells"][-1]
              for r in tables(mixed["html"]["count.html"])["failed-runs"][1:]}  # fmt: skip
    spec = mixed["cpu"]["air_concrete", 1]
    shown = failed["air_concrete \u00b7 7,000 it.", "1"]
    assert shown == f"count/air_concrete/{spec.config_hash}/seed_1"
    csv = pd.read_csv(mixed["results"] / "runs.csv")
    assert tmp not in (mixed["results"] / "runs.csv").read_text()
    assert f"count/air_concrete/{spec.config_hash}/seed_1" in set(csv["run_dir"])
    assert Path(gather(mixed["results"], write_csv=False).runs["run_dir"][0]).is_dir()


def test_user_command_from_run_provenance_shown(mixed: dict) -> None:
    section = mixed["html"]["count.html"].split('id="provenance"')[-1]
    assert "python run_all.py --profile cpu</code> &mdash; 10 runs" in section


# ---------------------------------------------------------------------------------- records
def test_grid_record_round_trip_and_same_grid_same_file(tmp_path: Path) -> None:
    results = tmp_path / "results"
    runs = launch(results, "--profile", "smoke", "-e", "count", "-v", "air_nvil_fixed",
                  "-s", "0-2,5", "train.lr=3e-4")  # fmt: skip
    (first,), problems = read_records(results)
    assert problems == []
    assert [r.key for r in first.runs] == [(r.experiment, r.variant, r.config_hash, r.seed)
                                           for r in runs]  # fmt: skip
    assert first.seeds == [0, 1, 2, 5] and first.overrides == ["train.lr=3e-4"]
    assert {r.iterations for r in first.runs} == {12}
    cfg = first.config("count", "air_nvil_fixed", runs[0].config_hash)
    assert cfg["train"]["lr"] == 3e-4 and "seed" not in cfg and "out_dir" not in cfg
    assert "cache_dir" not in cfg["data"]  # machine-specific folders are not recorded
    # What the report needs of the experiment comes from its YAML at launch, not from today's.
    info = first.experiments_info["count"]
    assert info["headline_count"] is None and info["paper"] == {}
    assert info["headline_label"] == "final count accuracy"
    launch(results, "--profile", "smoke", "-e", "count", "-v", "air_nvil_fixed",
           "-s", "0-2,5", "train.lr=3e-4")  # fmt: skip
    (again,), _ = read_records(results)
    assert again.path == first.path and again.first_asked_at == first.first_asked_at
    assert again.last_asked_at >= first.last_asked_at
    launch(results, "--profile", "smoke", "-e", "count", "-v", "air_nvil_fixed", "-s", "0")
    latest, n, _ = latest_record(results)
    assert n == 2 and latest.seeds == [0] and latest.grid_id != first.grid_id
    assert seed_ranges([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"


def test_experiment_records_carry_headline_and_paper() -> None:
    info = experiment_records(["interpolation", "extrapolation"])
    assert info["interpolation"]["headline_count"] == 2
    assert info["extrapolation"]["headline_count"] == 3
    assert info["extrapolation"]["paper"] == {"AIR": 0.0, "DAIR": 0.8}
    assert info["interpolation"]["headline_label"] == "count accuracy on 2-digit images"
    assert "3.1.1" in info["interpolation"]["paper_source"]


def test_dry_run_records_nothing(tmp_path: Path) -> None:
    args = parse_args(["--results", str(tmp_path / "r"), "--profile", "smoke", "-e", "count",
                       "-v", "air_nvil_fixed", "-s", "0", "--dry-run"])  # fmt: skip
    profile, runs, broken = plan_grid(args)
    assert record_grid(tmp_path / "r", args, profile, runs, broken) is None
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"seeds": ["0"]}, "field 'seeds': expected an array of integers, got ['0']"),
        ({"runs": [{"experiment": "count"}]}, "field 'runs[0].variant': expected a string, got "
         "nothing (missing)"),
        ({"version": 7}, "field 'version': expected 1, got 7"),
        ({"last_asked_at": "yesterday"}, "field 'last_asked_at': expected a number"),
        ({"experiments_info": {"count": {"headline_count": "3"}}},
         "field 'experiments_info': expected an object of {headline_count: int or null"),
    ],
)  # fmt: skip
def test_a_bad_record_is_a_problem_naming_file_and_field(
    tmp_path: Path, change: dict, message: str
) -> None:
    results = tmp_path / "results"
    launch(results, "--profile", "smoke", "-e", "count", "-v", "air_nvil_fixed", "-s", "0")
    (path,) = (results / FOLDER).glob("*.json")
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, **change}))
    (results / FOLDER / "torn.json").write_text('{"version": 1, "grid')
    records, problems = read_records(results)
    assert records == []
    assert any(p.startswith(str(path)) and message in p for p in problems), problems
    assert any("torn.json: not valid JSON" in p for p in problems), problems
    index = build_all(results, tmp_path / "reports", reconstructions=False)[0].read_text()
    assert "could not be read" in index and "No results yet" in index


# ---------------------------------------------------------------------------------- launcher
@needs_mnist
@pytest.mark.slow
def test_run_all_records_the_grid_and_the_report_judges_it(
    tmp_path: Path, data_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The launcher's hook end to end: a one-run smoke grid, trained in this process."""
    import torch

    import run_all

    monkeypatch.setenv("AIR_CACHE_DIR", str(data_cache))
    threads = torch.get_num_threads()
    results, reports = tmp_path / "results", tmp_path / "reports"
    words = ["--profile", "smoke", "-e", "count", "-v", "air_nvil_fixed", "--no-progress",
             "--results", str(results), "--reports", str(reports),
             "--cluster", "debug"]  # fmt: skip
    try:
        assert run_all.main([*words, "--seeds", "3"]) == 0
        assert run_all.main([*words, "--seeds", "3-4", "--dry-run"]) == 0
    finally:
        torch.set_num_threads(threads)
    (record,), problems = read_records(results)
    assert problems == [] and [(r.variant, r.seed, r.iterations) for r in record.runs] == [
        ("air_nvil_fixed", 3, 12)]  # fmt: skip
    html = (reports / "count.html").read_text()
    assert 'data-state="complete"' in html and "Complete:</strong> the one run" in html
    assert str(tmp_path) not in html
