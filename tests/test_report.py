"""The HTML reports, built from a synthetic results set whose rates and curves are known.

The numbers on the page are read back out of the HTML and checked against the values the
synthetic runs were built with; the pages are then opened in a real headless Chromium.
"""

from __future__ import annotations

import json
import math
import re
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from bench.config import load_config, to_dict
from bench.grid_record import AskedRun, GridRecord, experiment_records, variant_records
from bench.report import build_all, build_reports
from bench.report.failures import (
    BLANK,
    CRASHED,
    DIVERGED,
    NOT_SUSTAINED,
    OVER,
    UNDER,
    UNKNOWN,
    classify,
    traceback_excerpt,
)
from bench.report.html import page_name
from tests.conftest import TINY, needs_mnist

EVIL = "<script>alert(1)</script>"  # a variant name that must stay text
EVIL_CONFIG = "<img src=x onerror=alert(2)>"  # a config value that must stay text
TARGET = 200_000  # iterations of every synthetic run: the published budget, so comparable
EVERY = 2000  # evaluation interval
TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "bench/trainer.py", line 280, in _loop\n'
    "    out = self.estimator.loss(self.model, x, prior)\n"
    "RuntimeError: CUDA out of memory <b>bold?</b>\n"
)


# ---------------------------------------------------------------------------------- synthetic set
def _confusion(acc_by_count: dict[int, float], kind: str, per_count: int = 1000) -> list[list]:
    """A 4x4 confusion matrix with the given per-count accuracies; errors go up or down."""
    m = np.zeros((4, 4), dtype=int)
    for c, acc in acc_by_count.items():
        right = round(acc * per_count)
        m[c, c] = right
        wrong = per_count - right
        if kind == "over" or c == 0:
            m[c, min(c + 1, 3)] += wrong
        else:
            m[c, c - 1] += wrong
    return m.tolist()


MODE_SHIFT = 0.004  # the synthetic runs' mode-based accuracies sit this far above the sampled


def _run(experiment, variant, seed, status="complete", outcome="converged", acc=0.985, *,
         iters_to_target=None, kind="over", iou=0.8, elbo=600.0, iw=610.0, counts=(0, 1, 2),
         wall=3600.0, iterations=TARGET, error=None, diverged_at=None, run_dir=None,
         per_count=None, version=2, lme=None, scale=("gaussian", 0.3), prior=0.01,
         target=TARGET):  # fmt: skip
    """One row of the runs table, with final metrics consistent with `acc`: the keys of
    metrics_version 2 (sampled counts, mode beside them), or, with version=None, those of older
    results (mode counts in count_accuracy, no version)."""
    row = {
        "experiment": experiment, "variant": variant, "seed": seed, "config_hash": "abc123",
        "run_dir": run_dir or f"/nonexistent/{experiment}/{variant}/seed_{seed}",
        "status": status, "outcome": outcome if status == "complete" else None,
        "diverged_at": diverged_at, "iterations": iterations, "target_iterations": target,
        "wall_time_s": wall if status == "complete" else math.nan,
        "iterations_to_target": iters_to_target, "error": error, "slurm_job_id": "777",
        "git_commit": "deadbeef", "device": "cpu (x86_64, 2 cores)", "host": "node1",
        "converged_accuracy": 0.98, "converged_evals": 3,
    }  # fmt: skip
    if status == "complete" and outcome != "diverged":
        by_count = per_count or {c: acc for c in counts}
        conf = _confusion(by_count, kind)
        m = np.asarray(conf)
        row.update({
            "final_count_accuracy": float(np.trace(m) / m.sum()),
            **{f"final_count_accuracy_{c}": by_count[c] for c in by_count},
            "final_elbo": elbo, "final_iw_bound": iw, "final_box_iou": iou,
            "final_mean_count": float((m.sum(0) * np.arange(4)).sum() / m.sum()),
            "final_confusion": json.dumps(conf),
        })  # fmt: skip
        if version is not None:
            held = {"interpolation": 2, "extrapolation": 3}.get(experiment)
            seen = [c for c in by_count if c != held]
            lme = iw - 1.5 if lme is None else lme
            row.update({
                "final_metrics_version": version,
                "final_count_accuracy_mode": row["final_count_accuracy"] + MODE_SHIFT,
                **{f"final_count_accuracy_mode_{c}": by_count[c] + MODE_SHIFT for c in by_count},
                "final_count_accuracy_in_distribution": float(np.mean([by_count[c]
                                                                       for c in seen])),
                "final_over_count_rate": float(np.triu(m, 1).sum() / m.sum()),
                "final_under_count_rate": float(np.tril(m, -1).sum() / m.sum()),
                "final_box_iou_frame": iou, "final_box_precision": 0.9, "final_box_recall": 0.85,
                "final_lme_elbo_bound": lme, "final_elbo_at_0.01": elbo,
                "final_iw_bound_at_0.01": iw, "final_lme_elbo_bound_at_0.01": lme,
                "final_likelihood": scale[0], "final_likelihood_sd": scale[1],
                "final_prior_prob": prior, "final_iw_samples": 100.0,
            })  # fmt: skip
    return row


def _curve(row: dict) -> list[dict]:
    """Evaluations of a run: accuracy rises to its final value around its target iteration."""
    last = int(row["iterations"]) if row["status"] != "queued" else 0
    final = row.get("final_count_accuracy", 0.5)
    final = 0.5 if final is None or final != final else final
    mid = row["iterations_to_target"] or 20000
    out = []
    for it in range(EVERY, last + 1, EVERY):
        acc = final / (1 + math.exp(-(it - mid * 0.8) / 2500))
        out.append({
            "experiment": row["experiment"], "variant": row["variant"], "seed": row["seed"],
            "config_hash": "abc123", "iteration": it, "wall_time": it * 0.09,
            "prior_prob": 0.01, "count_accuracy": acc, "elbo": 400 + 200 * acc,
            "box_iou": 0.7 * acc, "mean_count": 1.0, "train_loss": -acc, "train_elbo": 0.0,
        })  # fmt: skip
    return out


def synthetic(tmp: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """A results set with known rates, times, accuracies, failures and pending runs."""
    rows = []
    truth: dict = {}
    # air_nvil_fixed: 7/10 converge; one over-counts, one under-counts, one crashes.
    its = [8000, 10000, 12000, 14000, 16000, 18000, 20000]
    accs = [0.981, 0.983, 0.984, 0.985, 0.986, 0.987, 0.990]
    for s in range(7):
        rows.append(_run("main", "air_nvil_fixed", s, acc=accs[s], iters_to_target=its[s],
                         elbo=620 + s, iw=630 + s))  # fmt: skip
    rows.append(_run("main", "air_nvil_fixed", 7, outcome="not_converged", acc=0.70, kind="over"))
    rows.append(_run("main", "air_nvil_fixed", 8, outcome="not_converged", acc=0.60, kind="under"))
    rows.append(_run("main", "air_nvil_fixed", 9, status="error", error=TRACEBACK,
                     iterations=12000))  # fmt: skip
    truth["air_nvil_fixed"] = {
        "k": 7, "n": 10, "iters": its,
        "accs": [r["final_count_accuracy"] for r in rows if r["variant"] == "air_nvil_fixed"
                 and r["status"] == "complete"],
        "elbos": [620 + s for s in range(7)] + [600.0, 600.0],
        "failures": {OVER: 1, UNDER: 1, CRASHED: 1},
    }  # fmt: skip
    # air_concrete: 10/10.
    for s in range(10):
        rows.append(_run("main", "air_concrete", s, acc=0.99, iters_to_target=20000 + 2000 * s))
    truth["air_concrete"] = {"k": 10, "n": 10, "iters": [20000 + 2000 * s for s in range(10)]}
    # The hostile name: 2/10, every failure class but crashed.
    for s in range(2):
        rows.append(_run("main", EVIL, s, acc=0.99, iters_to_target=30000))
    for s in range(2, 5):
        rows.append(_run("main", EVIL, s, outcome="not_converged", acc=0.5, kind="over"))
    for s in range(5, 7):
        rows.append(_run("main", EVIL, s, outcome="not_converged", acc=0.9, iou=0.1))
    for s in range(7, 9):
        rows.append(_run("main", EVIL, s, outcome="diverged", diverged_at=5000, iterations=5000))
    rows.append(_run("main", EVIL, 9, outcome="not_converged", acc=0.985, kind="under"))
    truth[EVIL] = {
        "k": 2, "n": 10,
        "failures": {OVER: 3, BLANK: 2, DIVERGED: 2, NOT_SUSTAINED: 1},
    }  # fmt: skip
    # air_vimco: still going; seeds 5-9 not even queued.
    for s in range(3):
        rows.append(_run("main", "air_vimco", s, status="running", iterations=10000 + 1000 * s))
    for s in range(3, 5):
        rows.append(_run("main", "air_vimco", s, status="queued", iterations=0))
    # A variant whose folder is gone; its config (from its run folder) holds a hostile string.
    gone = tmp / "results" / "main" / "legacy_gone" / "h" / "seed_0"
    gone.mkdir(parents=True)
    (gone / "config.yaml").write_text(
        f"seed: 0\nestimator:\n  name: '{EVIL_CONFIG}'\nmodel:\n  dair: false\n"
    )
    for s in range(4):
        rows.append(_run("main", "legacy_gone", s, outcome="converged" if s < 2 else
                         "not_converged", acc=0.99 if s < 2 else 0.8, iters_to_target=15000,
                         run_dir=str(gone)))  # fmt: skip
    # Generalisation: AIR vs DAIR on the held-out count.
    for exp, held, air, dair in (
        ("interpolation", 2, 0.55, 0.93),
        ("extrapolation", 3, 0.02, 0.78),
    ):
        counts = (0, 1, 3) if held == 2 else (0, 1, 2, 3)
        for variant, head in (("air_nvil_fixed", air), ("dair_nvil", dair)):
            for s in range(5):
                by_count = {c: 0.99 for c in counts}
                by_count[held] = head + 0.01 * s
                rows.append(_run(exp, variant, s, outcome="not_converged", per_count=by_count,
                                 counts=counts))  # fmt: skip
            truth[(exp, variant)] = [head + 0.01 * s for s in range(5)]
    evals = [e for r in rows for e in _curve(r)]
    return pd.DataFrame(rows), pd.DataFrame(evals), truth


def asked_grid(runs: pd.DataFrame, extra: list[tuple[str, str, str, int]] = ()) -> GridRecord:
    """A grid record asking for every run of `runs` and the `extra` (experiment, variant,
    config hash, seed) runs, which have no folder; with what the launcher records besides (each
    variant folder's description and reference, the schema defaults): the report reads only
    that, never the folders or bench.config."""
    asked = [
        AskedRun(e, v, h, int(s), int(t) if t == t else None)
        for e, v, h, s, t in zip(runs["experiment"], runs["variant"], runs["config_hash"],
                                 runs["seed"], runs["target_iterations"], strict=True)
    ] + [AskedRun(e, v, h, s, TARGET) for e, v, h, s in extra]  # fmt: skip
    return GridRecord(
        grid_id="test", command="python run_all.py --profile test", profile="test",
        cluster="local", experiments=sorted({r.experiment for r in asked}),
        variants=sorted({r.variant for r in asked}), seeds=sorted({r.seed for r in asked}),
        overrides=[], runs=asked, first_asked_at=1.7e9, last_asked_at=1.7e9,
        variants_info=variant_records({r.variant for r in asked}),
        # as the launcher records them (the synthetic "main" has no YAML: none for it)
        experiments_info=experiment_records(sorted({r.experiment for r in asked} - {"main"})),
        defaults=to_dict(load_config()),
    )  # fmt: skip


# ---------------------------------------------------------------------------------- HTML reading
class _Tables(HTMLParser):
    """Cells of every table with an id: {id: [row, ...]}, a row being {"attrs", "cells"}."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[dict]] = {}
        self.stack: list[str | None] = []
        self.row: dict | None = None
        self.cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.stack.append(a.get("id"))
            if a.get("id"):
                self.tables[a["id"]] = []
        elif tag == "tr" and self.stack and self.stack[-1]:
            self.row = {"attrs": a, "cells": []}
        elif tag in ("td", "th") and self.row is not None:
            self.cell = []
        elif tag in ("br", "li", "div", "p") and self.cell is not None:
            self.cell.append(" ")  # a line break in the cell separates words

    def handle_endtag(self, tag):
        if tag == "table" and self.stack:
            self.stack.pop()
        elif tag in ("td", "th") and self.cell is not None and self.row is not None:
            self.row["cells"].append(re.sub(r"\s+", " ", "".join(self.cell)).strip())
            self.cell = None
        elif tag == "tr" and self.row is not None and self.stack and self.stack[-1]:
            self.tables[self.stack[-1]].append(self.row)
            self.row = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def tables(html: str) -> dict[str, list[dict]]:
    parser = _Tables()
    parser.feed(html)
    return parser.tables


def rows_by_variant(html: str, table: str) -> dict[str, list[str]]:
    return {
        r["attrs"]["data-variant"]: r["cells"]
        for r in tables(html)[table]
        if "data-variant" in r["attrs"]
    }


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("report")
    runs, evals, truth = synthetic(tmp)
    # The grid asked for every run there is, and air_vimco seeds 5-9, which never started.
    grid = asked_grid(runs, [("main", "air_vimco", "abc123", s) for s in range(5, 10)])
    t0 = time.perf_counter()
    pages = build_reports(runs, evals, tmp / "reports", results_root=tmp / "results",
                          command="run_all.py --report-only", grid=grid)  # fmt: skip
    seconds = time.perf_counter() - t0
    html = {p.name: p.read_text() for p in pages}
    return {"tmp": tmp, "pages": pages, "html": html, "truth": truth, "runs": runs,
            "seconds": seconds}  # fmt: skip


def _main(built: dict) -> str:
    return built["html"][page_name("main")]


def _floats(text: str) -> list[float]:
    return [float(x.replace(",", "")) for x in re.findall(r"[-+]?\d[\d,]*\.?\d*", text)]


# ---------------------------------------------------------------------------------- numbers
def test_pages_written_one_per_experiment(built: dict) -> None:
    names = [p.name for p in built["pages"]]
    assert names == ["index.html", "main.html", "interpolation.html", "extrapolation.html"]
    assert built["seconds"] < 60


def test_convergence_counts_and_wilson_intervals(built: dict) -> None:
    rows = rows_by_variant(_main(built), "verdict-table")
    nvil = rows["air_nvil_fixed"]
    assert nvil[1].startswith("7/10 (0.70)")
    assert "[0.40, 0.89]" in nvil[1]  # the worked example
    assert rows["air_concrete"][1].startswith("10/10 (1.00)")
    assert "[0.72, 1.00]" in rows["air_concrete"][1]
    assert rows[EVIL][1].startswith("2/10 (0.20)")
    assert "[0.06, 0.51]" in rows[EVIL][1]
    assert "+5 not finished" in rows["air_vimco"][1]  # 3 running + 2 queued, not in n
    assert rows["air_vimco"][1].startswith("0/0")


def test_iterations_to_target_median_and_bootstrap(built: dict) -> None:
    from bench.report.stats import bootstrap_median_ci

    rows = rows_by_variant(_main(built), "verdict-table")
    for variant in ("air_nvil_fixed", "air_concrete"):
        its = built["truth"][variant]["iters"]
        med, lo, hi, n = _floats(rows[variant][2])
        assert med == np.median(its)
        assert (lo, hi) == tuple(round(v) for v in bootstrap_median_ci(its))
        assert lo <= med <= hi and n == len(its)


def test_final_accuracy_median_iqr_and_per_count(built: dict) -> None:
    rows = rows_by_variant(_main(built), "verdict-table")
    accs = built["truth"]["air_nvil_fixed"]["accs"]
    med, q25, q75, n, mode = _floats(rows["air_nvil_fixed"][3])
    assert med == pytest.approx(np.median(accs), abs=5e-4)
    assert q25 == pytest.approx(np.percentile(accs, 25), abs=5e-4)
    assert q75 == pytest.approx(np.percentile(accs, 75), abs=5e-4)
    assert n == 9  # the crashed run has no final evaluation
    assert mode == pytest.approx(np.median(accs) + MODE_SHIFT, abs=5e-4)  # the mode beside it
    per_count = _floats(rows["air_concrete"][5])
    assert per_count == [0, 0.99, 1, 0.99, 2, 0.99]
    elbo_med = _floats(rows["air_nvil_fixed"][6])[0]
    assert elbo_med == pytest.approx(np.median(built["truth"]["air_nvil_fixed"]["elbos"]), abs=0.05)
    assert "[Gaussian sd 0.3]" in rows["air_nvil_fixed"][6]


def test_published_reference_and_difference(built: dict) -> None:
    rows = rows_by_variant(_main(built), "verdict-table")
    ref, ours, delta = rows["air_nvil_fixed"][-3:]
    assert "REFERENCE.md rows 1, 2, 3" in ref
    assert ref.startswith(
        "success rate: 0.80 count accuracy: 0.983 iterations to target: 30,000 "
        "ELBO: 627.4 log p(x) \u2265 (LME): 636.8"
    )
    # One difference per published figure, in the same order: rate, accuracy, iterations, ...
    # None is like with like: the synthetic runs have no results on addtt's test images.
    rate, acc, iters, elbo, lme = [d.split()[0] for d in re.findall(r"[-+][\d,.]+ \u2260", delta)]
    assert delta.count("\u2260") == 5 and "=" not in delta
    assert rate == "-0.10"
    assert acc == f"{np.median(built['truth']['air_nvil_fixed']['accs']) - 0.983:+.3f}"
    assert iters == "-16,000"  # median 14,000 vs 30,000
    elbos = built["truth"]["air_nvil_fixed"]["elbos"]
    assert elbo == f"{np.median(elbos) - 627.4:+.1f}"
    # addtt's 636.8 is set against our log-mean-exp bound (IW - 1.5 in the synthetic runs)
    assert lme == f"{np.median([e + 10 - 1.5 for e in elbos]) - 636.8:+.1f}"
    assert "no addtt test-image results in these runs" in ref
    assert "unknown: no recorded reference" in rows["legacy_gone"][-3]


def test_generalisation_headline_and_reference(built: dict) -> None:
    html = built["html"]["interpolation.html"]
    rows = rows_by_variant(html, "verdict-table")
    for variant, published in (("air_nvil_fixed", 0.6), ("dair_nvil", 0.95)):
        truth = built["truth"][("interpolation", variant)]
        headline = _floats(rows[variant][3])[0]
        assert headline == pytest.approx(np.median(truth), abs=5e-4)
        assert f"count accuracy on 2-digit images: {published:.3f}" in rows[variant][-3]
        assert rows[variant][-1] == f"{np.median(truth) - published:+.3f} \u2260"
    assert "Generalisation: AIR against DAIR" in html
    assert 'id="generalisation"' in built["html"]["index.html"]


def test_convergence_definition_printed(built: dict) -> None:
    assert "count accuracy &gt;= 0.98 in each of the last 3 periodic evaluations" in _main(built)


def test_figures_embedded(built: dict) -> None:
    html = _main(built)
    uris = re.findall(r'<img src="([^"]+)"', html)
    assert len(uris) >= 5  # ECDF, two learning curves, per-seed accuracy, confusion matrices
    assert all(u.startswith("data:image/png;base64,") for u in uris)


# ---------------------------------------------------------------------------------- failures
def test_failures_classified_and_counted(built: dict) -> None:
    html = _main(built)
    table = tables(html)["failure-table"]
    header = table[0]["cells"]
    rows = rows_by_variant(html, "failure-table")
    for variant in ("air_nvil_fixed", EVIL):
        cells = dict(zip(header, rows[variant], strict=True))
        expected = built["truth"][variant]["failures"]
        assert int(cells["failed"]) == sum(expected.values())
        for kind in header[3:]:
            assert int(cells[kind] or 0) == expected.get(kind, 0), (variant, kind)
    assert "RuntimeError: CUDA out of memory &lt;b&gt;bold?&lt;/b&gt;" in html  # escaped excerpt
    assert "<b>bold?</b>" not in html


@pytest.mark.parametrize(
    "row, kind",
    [
        ({"status": "error"}, CRASHED),
        ({"status": "timeout"}, CRASHED),
        ({"status": "complete", "outcome": "diverged", "diverged_at": 10}, DIVERGED),
        ({"status": "complete", "outcome": "not_converged"}, UNKNOWN),
        ({"status": "complete", "final_count_accuracy": 0.985, "converged_accuracy": 0.98},
         NOT_SUSTAINED),
        ({"status": "complete", "final_count_accuracy": 0.9, "final_box_iou": 0.1}, BLANK),
        ({"status": "complete", "final_count_accuracy": 0.7, "final_box_iou": 0.6,
          "final_confusion": [[90, 10, 0], [0, 60, 40], [0, 5, 95]]}, OVER),
        ({"status": "complete", "final_count_accuracy": 0.7, "final_box_iou": 0.6,
          "final_confusion": "[[100, 0, 0], [30, 70, 0], [0, 40, 60]]"}, UNDER),
        ({"status": "complete", "final_count_accuracy": 0.9, "final_mean_count": 1.2,
          "final_confusion": [[90, 10, 0], [0, 100, 0], [0, 10, 90]]}, OVER),  # tie: mean count
    ],
)  # fmt: skip
def test_failure_rules(row: dict, kind: str) -> None:
    assert classify(row).kind == kind


def test_traceback_excerpt_keeps_the_end() -> None:
    text = "\n".join(f"line {i}" for i in range(40))
    excerpt = traceback_excerpt(text, lines=5)
    assert excerpt.splitlines() == ["...", "line 35", "line 36", "line 37", "line 38", "line 39"]
    assert traceback_excerpt(None) == ""


# ---------------------------------------------------------------------------------- comparisons
def test_comparisons(built: dict) -> None:
    rows = {(r["cells"][0], r["cells"][1]): r["cells"] for r in tables(_main(built))[
        "comparison-table"][1:]}  # fmt: skip
    cells = rows[("air_concrete", "air_nvil_fixed")]
    assert cells[2:4] == ["10/10", "7/10"]
    assert cells[4] == "+0.30"
    p = sps.fisher_exact([[10, 0], [7, 3]]).pvalue
    assert cells[5] == f"{p:.3f}"
    conc = [0.99] * 10
    nvil = built["truth"]["air_nvil_fixed"]["accs"]
    u = sps.mannwhitneyu(conc, nvil).statistic
    assert float(cells[6]) == pytest.approx(u / (len(conc) * len(nvil)), abs=0.005)


# ---------------------------------------------------------------------------------- partial
def test_partial_report_names_running_queued_and_missing(built: dict) -> None:
    html = _main(built)
    assert "Partial results:" in html
    text = re.sub(r"\s+", " ", html)
    assert "<strong>running</strong>: air_vimco &mdash; seed 0: 10,000/200,000 iterations" in text
    assert "<strong>queued</strong>: air_vimco &mdash; seeds 3-4" in text
    assert "<strong>missing</strong>: air_vimco &mdash; seeds 5-9" in text
    assert "Complete:" in built["html"]["interpolation.html"]


def test_empty_results_give_an_index_that_says_so(tmp_path: Path) -> None:
    pages = build_reports(None, None, tmp_path, results_root=tmp_path / "nothing")
    assert [p.name for p in pages] == ["index.html"]
    assert "No results yet" in pages[0].read_text()


# ---------------------------------------------------------------------------------- safety
def test_every_string_escaped_and_page_self_contained(built: dict) -> None:
    for name, html in built["html"].items():
        assert EVIL not in html, name
        assert "<img src=x" not in html, name
        assert "<script" not in html.lower(), name  # the pages carry no script at all
        assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html), name
        assert "<link" not in html.lower() and "@import" not in html, name
        assert "script-src &#39;none&#39;" in html  # and the browser would refuse one anyway
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in _main(built)
    assert EVIL_CONFIG.replace("<", "&lt;").replace(">", "&gt;") in _main(built)


def test_names_that_look_like_markup_or_maths(tmp_path: Path) -> None:
    """Figures draw names as typed (no math-text parse errors); pages print them as text."""
    odd = "a$b$_{c} \\alpha & <i>"
    runs = pd.DataFrame([_run("main", odd, s, iters_to_target=1000 * (s + 1)) for s in range(3)])
    evals = pd.DataFrame([e for r in runs.to_dict("records") for e in _curve(r)])
    pages = build_reports(runs, evals, tmp_path, reconstructions=False)
    html = pages[1].read_text()
    assert html.count('<img src="data:image/png;base64,') >= 5  # every figure was drawn
    assert "a$b$_{c} \\alpha &amp; &lt;i&gt;" in html


def test_hostile_experiment_name_gets_a_safe_file_name() -> None:
    assert page_name("main") == "main.html"
    odd = page_name("../../etc/<x>")
    assert "/" not in odd and "<" not in odd and odd.endswith(".html")
    assert page_name("index") != "index.html"
    assert page_name("a b") != page_name("a_b")


# ---------------------------------------------------------------------------------- browser
@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    """`visit`, once Chromium is known to be installed (or installable) and to start."""
    from tests.browser import BrowserError, ensure_chromium, visit

    probe = tmp_path_factory.mktemp("probe") / "probe.html"
    probe.write_text("<!DOCTYPE html><title>probe</title><p>probe</p>")
    try:
        ensure_chromium()
        visit(probe)
    except (BrowserError, OSError) as err:
        pytest.skip(f"no Chromium that starts here to open the pages with: {err}")
    return visit


@pytest.mark.slow
def test_pages_in_headless_chromium(built: dict, browser) -> None:
    from tests.browser import blankness

    pages = {p.name: p for p in built["pages"]}
    for name in ("index.html", page_name("main")):
        visit = browser(pages[name])
        assert visit.errors == [], visit.errors
        assert visit.external_requests == [], visit.external_requests
        assert visit.dialogs == []  # the <script> variant did not run
        ink, spread = blankness(visit.screenshot)
        assert ink > 0.05 and spread > 20, (name, ink, spread)
        assert visit.requests and visit.requests[0].startswith("file:")
    assert EVIL in visit.text  # shown as text on the experiment page


FITS = """(() => {
  const width = document.documentElement.clientWidth;
  const out = {width, page: document.documentElement.scrollWidth, over: []};
  for (const el of document.querySelectorAll('#failed-runs td, #failed-runs td *')) {
    const box = el.getBoundingClientRect();
    const cell = el.closest('td').getBoundingClientRect();
    const clipped = el.scrollWidth > el.clientWidth + 1;
    if (box.right > width + 0.5 || box.right > cell.right + 0.5 || clipped)
      out.over.push([el.tagName, (el.textContent || '').slice(0, 60), box.right, cell.right]);
  }
  out.rows = document.querySelectorAll('#failed-runs tbody tr').length;
  return out;
})()"""


@pytest.mark.slow
def test_failed_runs_table_fits_a_1400px_window(tmp_path: Path, browser) -> None:
    """Long run folders and unbroken error lines wrap inside their cells; nothing is cut off."""
    results = tmp_path / "results"
    long = "air_nvil_fixed_with_a_rather_long_descriptive_name_for_a_new_idea"
    rows = []
    for s in range(3):
        run_dir = results / "interpolation" / long / "0123456789" / f"seed_{s}"
        error = TRACEBACK + "ValueError: " + "/very/long/path/without/spaces" * 12 + "\n"
        rows.append(_run("interpolation", long, s, status="error", error=error,
                         run_dir=str(run_dir)))  # fmt: skip
    rows.append(_run("interpolation", long, 3, outcome="not_converged", acc=0.5,
                     run_dir="/somewhere/else/" + "deep/" * 30 + "seed_3"))  # fmt: skip
    pages = build_reports(pd.DataFrame(rows), None, tmp_path / "reports", results_root=results,
                          reconstructions=False)  # fmt: skip
    visit = browser(pages[1], width=1400, evaluate={"fits": FITS})
    fits = visit.values["fits"]
    assert fits["rows"] == 4
    assert fits["page"] <= fits["width"], fits  # no horizontal scrolling at 1400 px
    assert fits["over"] == [], fits["over"]
    assert f"interpolation/{long}/0123456789/seed_0" in visit.text  # relative to results/


@pytest.mark.slow
def test_browser_helper_sees_what_it_must_catch(tmp_path: Path, browser) -> None:
    """The checks above are only as good as the helper: feed it a page that breaks every rule."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<!DOCTYPE html><html><body><h1>bad</h1><img src="http://example.invalid/x.png">'
        "<script>console.error('boom'); alert('hi');</script></body></html>"
    )
    visit = browser(bad)
    assert "http://example.invalid/x.png" in visit.external_requests
    assert any("boom" in e for e in visit.errors)
    assert visit.dialogs == ["hi"]


# ---------------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> Path:
    """A tiny real run in the results layout, with a checkpoint to draw reconstructions from."""
    from bench.config import config_hash, load_config
    from bench.trainer import Trainer

    root = tmp_path_factory.mktemp("results")
    few = ["train.iterations=4", "train.eval_every=2", "train.checkpoint_every=2"]
    cfg = load_config(overrides=[*TINY, *few, f"data.cache_dir={data_cache}", "out_dir=x"])
    cfg.out_dir = str(root / "main" / "air_nvil_fixed" / config_hash(cfg) / "seed_0")
    Trainer(cfg).run()
    return root


@needs_mnist
@pytest.mark.slow
def test_reconstructions_from_a_real_checkpoint(trained: Path, tmp_path: Path) -> None:
    run_dir = next(trained.glob("main/air_nvil_fixed/*/seed_0"))
    result = json.loads((run_dir / "result.json").read_text())
    ok = _run("main", "air_nvil_fixed", 0, outcome="converged", run_dir=str(run_dir),
              iters_to_target=2)  # fmt: skip
    bad = _run("main", "air_nvil_fixed", 1, outcome="not_converged", acc=0.5)  # no folder
    runs = pd.DataFrame([ok, bad])
    pages = build_reports(runs, None, tmp_path, results_root=trained)
    html = pages[1].read_text()
    section = html.split('id="reconstructions"')[1].split('id="config"')[0]
    assert section.count('<img src="data:image/png;base64,') == 1  # from seed 0's samples.npz
    assert "failed seed 1: no samples recorded" in section
    assert result["provenance"]["git_commit"] is None or result["provenance"]["git_commit"] in html


@needs_mnist
@pytest.mark.slow
def test_build_all_from_run_folders(trained: Path, tmp_path: Path) -> None:
    pytest.importorskip("bench.gather", reason="bench/gather.py (issue 4) has not landed yet")
    pages = build_all(trained, tmp_path / "reports")
    assert [p.name for p in pages] == ["index.html", "main.html"]
    assert "air_nvil_fixed" in pages[1].read_text()
