"""HTML reports: `reports/index.html` and one self-contained page per experiment.

    from bench.report import build_all
    build_all("results", "reports")          # gather whatever results exist, write the pages

`build_reports(runs, evals, reports_root)` does the same from the two tables of
`bench.gather.gather` (or any tables with those columns), which is what the tests use.

Data flows one way: gathered tables -> `summary` (numbers) + `figures`/`samples` (PNG data URIs)
-> `html` (jinja2 templates in `templates/`, autoescaped) -> files. A partial result set gives a
partial report that says what is missing and what is still running.
"""

from __future__ import annotations

import datetime as dt
import logging
import platform
import sys
import time
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from bench.report import figures, summary
from bench.report.failures import BLANK_MAX_IOU, BLANK_MIN_ACCURACY
from bench.report.html import page_name, render

__all__ = ["build_all", "build_reports"]

log = logging.getLogger(__name__)

REPORT_PACKAGES = ("torch", "numpy", "pandas", "scipy", "matplotlib", "seaborn", "jinja2")
Expected = Mapping[str, Mapping[str, Iterable[int]]]


def build_all(
    results_root: str | Path,
    reports_root: str | Path,
    *,
    command: str | None = None,
    expected: Expected | None = None,
    reconstructions: bool = True,
) -> list[Path]:
    """Gather every run under `results_root` and write the reports into `reports_root`.

    Works on any subset of results (an empty folder gives an index saying so). `expected`
    (experiment -> variant -> seeds, from the launcher's plan) lets the pages name runs that
    have not even started; without it, a seed that some variant has counts as expected for all.
    Returns the pages written, index first.
    """
    from bench.gather import gather  # the other half of the pipeline; imported when needed

    gathered = gather(results_root)
    return build_reports(
        gathered.runs,
        gathered.evals,
        reports_root,
        results_root=results_root,
        command=command,
        expected=expected,
        reconstructions=reconstructions,
        problems=gathered.problems,
    )


def build_reports(
    runs: pd.DataFrame | None,
    evals: pd.DataFrame | None,
    reports_root: str | Path,
    *,
    results_root: str | Path | None = None,
    command: str | None = None,
    expected: Expected | None = None,
    reconstructions: bool = True,
    implementations: str | Path | None = None,
    problems: Iterable[str] = (),
) -> list[Path]:
    """Write index.html and one page per experiment from gathered `runs` and `evals` tables.

    `reconstructions=False` skips loading checkpoints (the slowest part); `implementations`
    points at another variants folder (tests); `problems` are files gathering could not read,
    listed on the index. Returns the pages written, index first.
    """
    t0 = time.perf_counter()
    out = Path(reports_root)
    out.mkdir(parents=True, exist_ok=True)
    runs, evals = summary.normalise_runs(runs), summary.normalise_evals(evals)
    names = sorted(set(runs["variant"]) | set(evals["variant"]))
    infos = summary.variant_infos(names, runs, implementations)
    colours = figures.palette(names)
    report = _report_provenance(results_root, command)
    generalisation = figures.generalisation_figure(runs, infos, colours)

    experiments = []
    written = []
    for experiment in summary.experiment_order(set(runs["experiment"]) | set(evals["experiment"])):
        exp = _experiment(
            experiment,
            runs[runs["experiment"] == experiment],
            evals[evals["experiment"] == experiment],
            infos,
            colours,
            (expected or {}).get(experiment),
            reconstructions,
            generalisation,
        )
        written.append(render("experiment.html.j2", out / exp["page"], exp=exp, report=report))
        experiments.append(exp)
        log.info("report: wrote %s", out / exp["page"])

    index = render(
        "index.html.j2",
        out / "index.html",
        report=report,
        experiments=experiments,
        overview_variants=sorted({v for e in experiments for v in e["by_variant"]}),
        variants=[infos[n] for n in sorted(infos)],
        generalisation=generalisation,
        provenance=summary.run_provenance(runs),
        problems=list(problems),
    )
    log.info("report: %d pages in %.1f s", len(written) + 1, time.perf_counter() - t0)
    return [index, *written]


def _experiment(
    name: str,
    runs: pd.DataFrame,
    evals: pd.DataFrame,
    infos: Mapping[str, summary.VariantInfo],
    colours: Mapping[str, Any],
    expected: Mapping[str, Iterable[int]] | None,
    reconstructions: bool,
    generalisation: str | None,
) -> dict[str, Any]:
    """Everything one experiment's page shows."""
    variants = sorted(set(runs["variant"]) | set(evals["variant"]))
    verdicts = [
        summary.verdict(runs[runs["variant"] == v], name, infos.get(v))
        for v in variants
        if (runs["variant"] == v).any()
    ]
    targets = runs["converged_accuracy"].dropna()
    target = float(targets.iloc[0]) if len(targets) else None
    # Variants with a folder but no runs are named on the page; those are all known variants.
    known = [n for n, i in infos.items() if i.folder]
    status = summary.experiment_status(runs, name, expected, known)
    is_gen = name in summary.GENERALISATION
    figs = [
        {
            "title": "Iterations to target (ECDF)",
            "caption": "Fraction of finished seeds that have converged by each iteration, per "
            "variant; a converged run counts from the first evaluation at which it reached the "
            "target. Curves end at the convergence rate. Dotted vertical lines: published "
            "iterations to target (main experiments only).",
            "uri": figures.ecdf_figure(runs, colours, infos, name),
        },
        {
            "title": "Learning curves: count accuracy",
            "caption": "Held-out count accuracy at each periodic evaluation: one thin line per "
            "seed, the median over seeds (thick) and its interquartile band. Dashed: the "
            "convergence target.",
            "uri": figures.learning_curves(evals, colours, "count_accuracy", target),
        },
        {
            "title": "Learning curves: ELBO",
            "caption": "Held-out ELBO (nats per image, one sample) at each evaluation, as above; "
            "the view starts at the 5th percentile so early values do not flatten the rest.",
            "uri": figures.learning_curves(evals, colours, "elbo"),
        },
        {
            "title": f"Per-seed {summary.headline_label(name)}",
            "caption": "One dot per complete run (filled: converged; hollow: not converged), the "
            "median as a black bar, and the published figure as a black triangle."
            + ("" if is_gen else " Dashed: the convergence target."),
            "uri": figures.final_accuracy_figure(runs, name, colours, infos, target),
        },
        {
            "title": "Count confusion matrices",
            "caption": "Final evaluation, summed over the complete runs of each variant; each row "
            "(true count) as fractions of its images. Mass right of the diagonal is "
            "over-counting, left of it under-counting.",
            "uri": figures.confusion_figure(runs),
        },
    ]
    if is_gen:
        figs.append({
            "title": "Generalisation: AIR against DAIR",
            "caption": "Held-out-count accuracy of every seed in this experiment and its "
            "companion; blue AIR, orange DAIR (model.dair), black bars medians, dashed lines the "
            "paper's figures (Eslami et al. 2016, section 3.1.1).",
            "uri": generalisation,
        })  # fmt: skip
    samples: list[tuple[str, Any]] = []
    if reconstructions:
        from bench.report.samples import experiment_samples  # torch: only when drawing

        samples = sorted(experiment_samples(runs).items())
    return {
        "name": name,
        "page": page_name(name),
        "variants": variants,
        "status": status,
        "rule": summary.convergence_rule(runs),
        "generalisation": is_gen,
        "headline_label": summary.headline_label(name),
        "verdicts": verdicts,
        "by_variant": {r["variant"]: r for r in verdicts},
        "converged": sum(r["k"] for r in verdicts),
        "figures": figs,
        "failures": summary.failures(runs),
        "comparisons": summary.comparisons(runs, name),
        "samples": samples,
        "configs": summary.experiment_configs(runs, infos),
        "provenance": summary.run_provenance(runs),
        "blank_accuracy": BLANK_MIN_ACCURACY,
        "blank_iou": BLANK_MAX_IOU,
    }


def _report_provenance(results_root: str | Path | None, command: str | None) -> dict[str, Any]:
    """Where this report came from: command, code version, packages, machine."""
    from bench.provenance import git_commit

    packages = []
    for name in REPORT_PACKAGES:
        try:
            packages.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            packages.append((name, None))
    return {
        "generated": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "results_root": str(results_root) if results_root is not None else "(tables given)",
        "command": command if command is not None else " ".join(sys.argv),
        "git_commit": git_commit(),
        "packages": packages,
        "python": sys.version.split()[0],
        "hardware": f"{platform.machine()} {platform.processor() or ''}".strip()
        + f", {_cpu_count()} CPU cores, {platform.system()} {platform.release()}",
    }


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 1
