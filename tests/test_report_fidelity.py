"""Issue 13 on the report: every "ours minus published" like with like.

A synthetic results set with known numbers: sampled counts as the headline with the mode beside
them, rows of older results (mode counts only) and rows that mix the two marked, addtt's bound
compared with our log-mean-exp estimator on addtt's own test images, scales that differ never
subtracted, the remaining differences listed, the budget rule, the generalisation headline rule
(runs that count the training counts), and the references read from the grid record.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.gather import RUN_COLUMNS, gather
from bench.grid_record import (
    AskedRun,
    GridRecord,
    experiment_records,
    make_record,
    read_records,
    write_record,
)
from bench.report import build_all, build_reports
from bench.report.fidelity import (
    MIN_COMPARABLE_ITERATIONS,
    budget_threshold,
    reference_from_dict,
)
from bench.report.html import page_name
from bench.report.measures import GENERALISATION_MIN_IN_DISTRIBUTION
from bench.variants import Reference, discover, load_variant
from tests.test_report import MODE_SHIFT, _run, asked_grid, tables

ADDTT_ACC = [0.975, 0.978, 0.981]  # final_addtt_count_accuracy of the three long NVIL runs
ADDTT_LME = [636.0, 637.0, 638.5]  # final_addtt_lme_elbo_bound_at_0.01
HELDOUT_ACC = [0.96, 0.97, 0.98]  # their held-out sampled accuracies (per count, all counts)
RECORDED_DIFFERENCE = "the recorded source trains on something else entirely"


def _nvil(seed: int, acc: float, addtt_acc: float, addtt_lme: float, target: int) -> dict:
    row = _run("count", "air_nvil_fixed", seed, acc=acc, iters_to_target=20000 + 1000 * seed,
               elbo=620.0 + seed, iw=700.0 + seed, lme=630.0 + seed, target=target,
               iterations=target)  # fmt: skip
    row["config_hash"] = f"nvil{target}"
    row.update({
        "final_addtt_metrics_version": 2.0, "final_addtt_count_accuracy": addtt_acc,
        "final_addtt_count_accuracy_mode": addtt_acc + MODE_SHIFT,
        "final_addtt_elbo_at_0.01": 625.0 + seed, "final_addtt_iw_bound_at_0.01": 900.0,
        "final_addtt_lme_elbo_bound_at_0.01": addtt_lme,
        "final_pyro_count_accuracy": 0.5,  # another protocol: must not be used for addtt's rows
    })  # fmt: skip
    return row


def synthetic() -> pd.DataFrame:
    rows = []
    # air_nvil_fixed, 30,000 iterations (comparable: min(200k, 25k) = 25k), with addtt results.
    for s in range(3):
        rows.append(_nvil(s, HELDOUT_ACC[s], ADDTT_ACC[s], ADDTT_LME[s], 30_000))
    # The same variant at 7,000 iterations: published figures shown, not comparable.
    for s in range(2):
        rows.append(_nvil(s, 0.9, 0.9, 600.0, 7_000))
    # air_concrete: Bernoulli nats; its recorded reference publishes Gaussian ones.
    for s in range(2):
        r = _run("count", "air_concrete", s, acc=0.95, elbo=-90.0, iw=-85.0,
                 scale=("bernoulli", None), target=30_000, iterations=30_000)  # fmt: skip
        r["config_hash"] = "conc"
        rows.append(r)
    # air_nvil_annealed: older results only (no metrics_version: mode counts).
    for s in range(2):
        r = _run("count", "air_nvil_annealed", s, acc=0.9, version=None, target=30_000,
                 iterations=30_000)  # fmt: skip
        r["config_hash"] = "ann_old"
        rows.append(r)
    # air_vimco: one row whose runs mix the versions; annealed-style prior (rescored at 0.01).
    for s, version in ((0, 2), (1, 2), (2, None)):
        r = _run("count", "air_vimco", s, acc=0.8 if version else 0.5, version=version,
                 prior=1e-5, elbo=550.0, target=30_000, iterations=30_000)  # fmt: skip
        if version:
            r["final_elbo_at_0.01"] = 560.0
        r["config_hash"] = "mix"
        rows.append(r)
    # Extrapolation: three DAIR runs count their training counts (0.99) and score 0.70 on 3
    # digits; two draw 3 objects everywhere: 0.60 on the training counts, 1.00 on 3 digits.
    for s in range(5):
        good = s < 3
        by_count = {c: (0.99 if good else 0.6) for c in (0, 1, 2)}
        by_count[3] = 0.70 if good else 1.0
        r = _run("extrapolation", "dair_nvil", s, outcome="converged" if good else
                 "not_converged", per_count=by_count, counts=(0, 1, 2, 3),
                 target=30_000, iterations=30_000)  # fmt: skip
        r["config_hash"] = "gen"
        rows.append(r)
    return pd.DataFrame(rows)


def recorded_grid(runs: pd.DataFrame) -> GridRecord:
    """A grid record of every run, keeping the variants' references as its launch saw them:
    air_concrete's replaced by one that publishes a Gaussian ELBO, to test the scale check."""
    asked = [AskedRun(e, v, h, int(s), int(t)) for e, v, h, s, t in zip(
        runs["experiment"], runs["variant"], runs["config_hash"], runs["seed"],
        runs["target_iterations"], strict=True)]  # fmt: skip
    found = discover().variants
    info = {
        name: {"description": found[name].spec.description,
               "reference": dataclasses.asdict(found[name].spec.reference)}
        for name in ("air_nvil_fixed", "dair_nvil", "air_nvil_annealed")
    }  # fmt: skip
    info["air_concrete"] = {"description": "recorded description", "reference": {
        "source": "a recorded source", "elbo": -80.0, "likelihood": "gaussian",
        "likelihood_sd": 0.3, "count_accuracy": 0.98, "protocol": "aakhundov",
        "budget_iterations": 276000, "differences": [RECORDED_DIFFERENCE]}}  # fmt: skip
    return GridRecord(
        grid_id="fidelity", command="python run_all.py", profile="test", cluster="local",
        experiments=sorted(set(runs["experiment"])), variants=sorted(set(runs["variant"])),
        seeds=[0, 1, 2, 3, 4], overrides=[], runs=asked, variants_info=info,
        experiments_info=experiment_records(sorted(set(runs["experiment"]) - {"main"})),
        first_asked_at=1.7e9, last_asked_at=1.7e9,
    )  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("fidelity")
    runs = synthetic()
    grid = recorded_grid(runs)
    pages = build_reports(runs, None, tmp / "reports", grid=grid, records=[grid],
                          reconstructions=False)  # fmt: skip
    return {"html": {p.name: p.read_text() for p in pages}, "runs": runs}


def _rows(html: str, table: str = "verdict-table") -> dict[str, list[str]]:
    return {r["attrs"]["data-row"]: r["cells"] for r in tables(html)[table]
            if "data-row" in r["attrs"]}  # fmt: skip


def _floats(text: str) -> list[float]:
    return [float(x.replace(",", "")) for x in re.findall(r"[-+]?\d[\d,]*\.?\d*", text)]


def _count(built: dict) -> dict[str, list[str]]:
    return _rows(built["html"][page_name("count")])


# ---------------------------------------------------------------------------------- counts
def test_sampled_count_accuracy_is_the_headline_with_the_mode_beside(built: dict) -> None:
    cells = _count(built)["air_nvil_fixed \u00b7 30,000 it."]
    med, q25, q75, n, mode = _floats(cells[3])
    assert med == pytest.approx(np.median(HELDOUT_ACC), abs=5e-4)
    assert (q25, q75) == pytest.approx(tuple(np.percentile(HELDOUT_ACC, [25, 75])), abs=5e-4)
    assert n == 3 and "mode" in cells[3]
    assert mode == pytest.approx(np.median(HELDOUT_ACC) + MODE_SHIFT, abs=5e-4)


def test_rows_of_older_results_say_their_counts_are_modes(built: dict) -> None:
    html = built["html"][page_name("count")]
    old = _count(built)["air_nvil_annealed"]
    assert "older results (no metrics_version): counts from the posterior mode" in old[0]
    assert old[3].startswith("\u2013")  # no sampled accuracy: nothing shown as if it were one
    assert "mode: 0.900" in old[3]
    assert 'data-counts="mode"' in html and 'data-counts="sampled"' in html
    mixed = _count(built)["air_vimco"]
    assert "runs mix metrics versions: 2 with sampled counts, 1 older" in mixed[0]
    med, _, _, n, mode = _floats(mixed[3])
    assert (med, n) == (0.8, 2)  # the older run's 0.5 (a mode count) is not pooled in
    assert mode == pytest.approx(np.median([0.8 + MODE_SHIFT, 0.8 + MODE_SHIFT, 0.5]), abs=5e-4)


def test_overview_marks_accuracies_of_older_results(built: dict) -> None:
    index = re.sub(r"\s+", " ", built["html"]["index.html"])
    cell = re.search(r'data-row="air_nvil_annealed">(.*?)</div>', index).group(1)
    assert "accuracy 0.900" in cell and "(mode counts: older results)" in cell
    cell = re.search(r'data-row="dair_nvil">(.*?)</div>', index).group(1)
    assert "accuracy 0.700" in cell and "mode" not in cell  # the generalisation headline


def test_no_qualifying_run_shows_no_generalisation_headline(tmp_path: Path) -> None:
    """Every run draws 3 objects everywhere: 100 % on 3 digits, and no headline at all."""
    runs = []
    for s in range(3):
        r = _run("extrapolation", "dair_nvil", s, outcome="not_converged", counts=(0, 1, 2, 3),
                 per_count={0: 0.5, 1: 0.5, 2: 0.5, 3: 1.0})  # fmt: skip
        runs.append(r)
    runs = pd.DataFrame(runs)
    pages = build_reports(runs, None, tmp_path, reconstructions=False, records=[asked_grid(runs)])
    cells = _rows(pages[1].read_text())["dair_nvil"]
    assert cells[3].startswith("\u2013") and "0 of 3 runs count the training counts" in cells[3]
    assert "all runs: 1.000" in cells[3]
    assert "no run counts its training counts" in cells[-3]
    index = re.sub(r"\s+", " ", pages[0].read_text())
    assert "(no run counts its training counts)" in index


def test_comparisons_never_pair_sampled_with_mode_rows(built: dict) -> None:
    pairs = {(r["cells"][0], r["cells"][1]) for r in tables(built["html"][page_name(
        "count")])["comparison-table"][1:]}  # fmt: skip
    assert ("air_concrete", "air_nvil_fixed \u00b7 30,000 it.") in pairs  # both sampled
    assert not any("air_nvil_annealed" in p or "air_vimco" in p for pair in pairs for p in pair)


# ---------------------------------------------------------------------------------- published
def _published(built: dict, key: str) -> tuple[list[str], list[str], list[str]]:
    """(published lines, ours lines, difference lines) of a row, one per published figure."""
    html = built["html"][page_name("count")]
    row = re.search(r'<tr data-variant="[^"]*" data-row="' + re.escape(key) + r'".*?</tr>', html,
                    re.S).group(0)  # fmt: skip
    cells = re.findall(r'<td class="(?:ref|n ours|n delta)">(.*?)</td>', row, re.S)

    def items(cell: str) -> list[str]:
        lines = re.findall(r"<li[^>]*>(.*?)</li>", cell.split("<details")[0], re.S)
        return [re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", li)).strip() for li in lines]

    return items(cells[0]), items(cells[1]), items(cells[2])


def test_count_accuracy_compared_on_the_published_rows_test_images(built: dict) -> None:
    published, ours, delta = _published(built, "air_nvil_fixed \u00b7 30,000 it.")
    i = published.index("count accuracy: 0.983")
    assert ours[i] == (f"{np.median(ADDTT_ACC):.3f} addtt test images; "
                       f"held-out {np.median(HELDOUT_ACC):.3f}")  # fmt: skip
    assert delta[i] == f"{np.median(ADDTT_ACC) - 0.983:+.3f} ="  # like with like


def test_addtt_bound_is_compared_with_the_log_mean_exp_estimator(built: dict) -> None:
    published, ours, delta = _published(built, "air_nvil_fixed \u00b7 30,000 it.")
    i = published.index("log p(x) \u2265 (LME): 636.8")
    assert ours[i].startswith(f"{np.median(ADDTT_LME):.1f} addtt test images")  # not 900 (IW)
    assert delta[i] == f"{np.median(ADDTT_LME) - 636.8:+.1f} ="
    assert not any(p.startswith("IW bound") for p in published)  # 636.8 is not an IW bound
    j = published.index("ELBO: 627.4")
    assert ours[j].startswith("626.0 addtt test images") and delta[j] == "-1.4 ="


def test_figures_from_periodic_evaluations_say_they_are_not_like_with_like(built: dict) -> None:
    published, _, delta = _published(built, "air_nvil_fixed \u00b7 30,000 it.")
    i = published.index("success rate: 0.80")
    assert delta[i] == "+0.20 \u2260"
    html = built["html"][page_name("count")]
    assert "ours from the periodic held-out evaluations, not on addtt test images" in html


def test_remaining_differences_listed_per_row(built: dict) -> None:
    cells = _count(built)
    ref = load_variant(Path("implementations/air_nvil_fixed")).spec.reference
    assert ref.differences  # the variant's yaml lists them
    for difference in ref.differences:
        assert difference in cells["air_nvil_fixed \u00b7 30,000 it."][-3]
    assert RECORDED_DIFFERENCE in cells["air_concrete"][-3]  # the grid record's, not the folder's
    assert "reference from the grid record fidelity" in cells["air_concrete"][-3]


def test_bernoulli_and_gaussian_nats_are_never_subtracted(built: dict) -> None:
    cells = _count(built)
    assert "[Bernoulli]" in cells["air_concrete"][6]
    assert "[Gaussian sd 0.3]" in cells["air_nvil_fixed \u00b7 30,000 it."][6]
    published, ours, delta = _published(built, "air_concrete")
    i = published.index("ELBO: -80.0")
    assert delta[i] == "\u2013 \u2260"  # no difference computed
    assert "different scales: ours Bernoulli nats, published Gaussian sd 0.3 nats" in cells[
        "air_concrete"][-3]  # fmt: skip


def test_bounds_at_the_reference_prior_shown_for_rescored_rows(built: dict) -> None:
    vimco = _count(built)["air_vimco"]
    assert "at prior 0.01: ELBO 560.0 \u00b7 IW 610.0 \u00b7 LME 608.5" in vimco[6]
    assert "at prior 0.01" not in _count(built)["air_nvil_fixed \u00b7 30,000 it."][6]


def test_budget_rule_stated_and_applied(built: dict) -> None:
    html = re.sub(r"\s+", " ", built["html"][page_name("count")])
    assert "min(the source&#39;s training length, 25,000) iterations" in html
    short = _count(built)["air_nvil_fixed \u00b7 7,000 it."]
    assert short[-1] == ("budget 7,000 iterations < 25,000; the source trained 200,000: "
                         "not comparable")  # fmt: skip
    assert "count accuracy: 0.983" in short[-3]  # still shown
    assert budget_threshold(Reference(budget_iterations=20_000)) == 20_000
    assert budget_threshold(Reference(budget_iterations=276_000)) == MIN_COMPARABLE_ITERATIONS
    assert budget_threshold(None) == MIN_COMPARABLE_ITERATIONS


# ---------------------------------------------------------------------------------- generalisation
def test_generalisation_headline_uses_runs_that_count_the_training_counts(built: dict) -> None:
    html = built["html"][page_name("extrapolation")]
    cells = _rows(html)["dair_nvil"]
    assert _floats(cells[3])[0] == pytest.approx(0.70)  # not 1.00, nor the median of all five
    assert "3 of 5 runs count the training counts" in cells[3]
    assert "all runs: 0.700" in cells[3]  # median of 0.7, 0.7, 0.7, 1.0, 1.0
    assert _floats(cells[4])[0] == pytest.approx(0.99)  # in-distribution accuracy beside it
    over = _floats(cells[5])[0]
    assert over == pytest.approx(0.0075, abs=1e-3)  # the good runs' 1 % of 0-2 digits, / 4
    text = re.sub(r"\s+", " ", html)
    assert (f"at least {GENERALISATION_MIN_IN_DISTRIBUTION:g}; the other runs are listed, "
            "marked, and left out") in text  # fmt: skip
    assert cells[-1].startswith(f"{0.70 - 0.8:+.3f}")  # the paper's DAIR, 80 %


def test_every_generalisation_run_listed_with_its_in_distribution_accuracy(built: dict) -> None:
    html = built["html"][page_name("extrapolation")]
    listed = [r["cells"] for r in tables(html)["generalisation-runs"][1:]]
    assert [c[1] for c in listed] == ["0", "1", "2", "3", "4"]
    for cells in listed[:3]:
        assert cells[2:4] == ["0.700", "0.990"] and cells[-1] == "yes"
    for cells in listed[3:]:
        assert cells[2:4] == ["1.000", "0.600"]
        assert cells[-1] == "no: does not count the training counts"
        assert float(cells[4]) >= 0.3  # the over-count rate that explains the 100 %


# ---------------------------------------------------------------------------------- gather
def test_gather_turns_every_final_key_into_a_column(tmp_path: Path) -> None:
    run = tmp_path / "count" / "air_nvil_fixed" / "h" / "seed_0"
    run.mkdir(parents=True)
    final = {"metrics_version": 2, "count_accuracy": 0.9, "count_accuracy_mode": 0.91,
             "a_metric_added_later": 1.5, "likelihood": "gaussian", "likelihood_sd": 0.3,
             "confusion": [[1, 0], [0, 1]], "elbo_at_0.01": 600.0}  # fmt: skip
    (run / "result.json").write_text(json.dumps({
        "status": "complete", "outcome": "converged", "final": final,
        "final_protocols": {"addtt": {"count_accuracy": 0.95, "lme_elbo_bound": 636.0},
                            "pyro": {"skipped": "its images hold 0-2 digits"}},
    }))  # fmt: skip
    g = gather(tmp_path)
    row = g.runs.iloc[0]
    assert list(g.runs.columns[: len(RUN_COLUMNS)]) == RUN_COLUMNS  # old names first, unchanged
    assert row["final_count_accuracy"] == 0.9 and row["final_count_accuracy_mode"] == 0.91
    assert row["final_a_metric_added_later"] == 1.5  # no list to edit
    assert row["final_likelihood"] == "gaussian" and row["final_elbo_at_0.01"] == 600.0
    assert json.loads(row["final_confusion"]) == [[1, 0], [0, 1]]
    assert row["final_addtt_count_accuracy"] == 0.95
    assert row["final_addtt_lme_elbo_bound"] == 636.0
    assert row["final_pyro_skipped"] == "its images hold 0-2 digits"
    assert pd.isna(row["final_box_iou"])  # a fixed column the result lacks


# ---------------------------------------------------------------------------------- records
def test_grid_record_keeps_each_variants_reference(tmp_path: Path) -> None:
    from bench.grid_record import variant_records

    kept = variant_records(["air_nvil_fixed", "air_concrete", "air_vimco", "no_such_variant"])
    assert set(kept) == {"air_nvil_fixed", "air_concrete", "air_vimco"}
    record = make_record([], profile="p", cluster="local", experiments=["count"], seeds=[0],
                         overrides=[], variants_info=kept)  # fmt: skip
    write_record(tmp_path, record)
    (back,), problems = read_records(tmp_path)
    assert problems == []
    ref = reference_from_dict(back.variants_info["air_nvil_fixed"]["reference"])
    assert ref == load_variant(Path("implementations/air_nvil_fixed")).spec.reference
    assert ref.lme_elbo_bound == 636.8 and ref.iw_bound is None
    concrete = reference_from_dict(back.variants_info["air_concrete"]["reference"])
    assert concrete == load_variant(Path("implementations/air_concrete")).spec.reference
    assert concrete.count_accuracy_by_count[2] == 0.955  # JSON's string keys back to counts


def test_report_reads_references_from_the_record_not_the_folder(tmp_path: Path) -> None:
    """A run of a variant whose folder no longer exists: the grid record still has its
    reference; without a record the page says the reference is unknown."""
    results = tmp_path / "results"
    run = results / "count" / "gone_variant" / "h" / "seed_0"
    run.mkdir(parents=True)
    (run / "result.json").write_text(json.dumps({"status": "complete", "outcome": "converged",
                                                 "iterations": 30000, "final": {
                                                     "metrics_version": 2,
                                                     "count_accuracy": 0.97}}))  # fmt: skip
    pages = build_all(results, tmp_path / "before", reconstructions=False)
    assert "unknown: no recorded reference" in pages[1].read_text()
    record = make_record(
        [],
        profile="p",
        cluster="local",
        experiments=["count"],
        seeds=[0],
        overrides=[],
        variants_info={
            "gone_variant": {
                "description": "a variant since deleted",
                "reference": {"source": "somebody's paper", "count_accuracy": 0.99},
            }
        },
    )
    record.runs = [AskedRun("count", "gone_variant", "h", 0, 30000)]
    write_record(results, record)
    pages = build_all(results, tmp_path / "after", reconstructions=False)
    html = re.sub(r"\s+", " ", pages[1].read_text())
    assert "count accuracy: 0.990" in html and "somebody&#39;s paper" in html
    assert f"reference from the grid record {record.grid_id}" in html
    assert "a variant since deleted" in pages[0].read_text()


# ---------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "reference, message",
    [
        ("{elbo: 600.0}", "reference.likelihood must be set with reference.elbo"),
        ("{lme_elbo_bound: 6.0, likelihood: gaussian}", "reference.likelihood_sd must be a "
         "positive number"),
        ("{likelihood: poisson}", "reference.likelihood must be 'gaussian', 'bernoulli'"),
        ("{budget_iterations: 0}", "reference.budget_iterations must be a positive number"),
        ("{count_accuracy: 98.3}", "reference.count_accuracy must be in [0, 1]"),
        ("{differences: ['']}", "reference.differences must be a list of non-empty lines"),
        ("{protocol: mine}", "reference.protocol must be one of heldout"),
    ],
)  # fmt: skip
def test_bad_reference_fields_name_the_field(tmp_path: Path, reference: str, message: str) -> None:
    from bench.variants import VariantError

    folder = tmp_path / "v"
    folder.mkdir()
    (folder / "variant.yaml").write_text(f"description: x\nreference: {reference}\n")
    with pytest.raises(VariantError, match=re.escape(message)):
        load_variant(folder)


def test_every_variant_folder_still_loads() -> None:
    found = discover()
    assert found.broken == {}
    for name, variant in found.variants.items():
        ref = variant.spec.reference
        if ref is not None and ref.notes:
            assert "Still differs" not in ref.notes, name  # moved into reference.differences


def test_a_bad_recorded_reference_names_the_field(tmp_path: Path) -> None:
    from bench.grid_record import GridRecordError

    data = make_record([], profile="p", cluster="local", experiments=["count"], seeds=[0],
                       overrides=[]).to_dict()  # fmt: skip
    data["variants_info"] = {"air_nvil_fixed": {"reference": "not an object"}}
    with pytest.raises(GridRecordError, match="field 'variants_info'"):
        GridRecord.from_dict(data, "x.json")
    del data["variants_info"]  # records written before the field existed still read
    assert GridRecord.from_dict(data, "x.json").variants_info == {}
