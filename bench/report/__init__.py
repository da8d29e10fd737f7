"""HTML reports: `reports/index.html` and one self-contained page per experiment.

    from bench.report import build_all
    build_all("results", "reports")          # gather whatever results exist, write the pages

`build_reports(runs, evals, reports_root)` does the same from the two tables of
`bench.gather.gather` (or any tables with those columns), which is what the tests use.

Data flows one way: gathered tables + the latest asked grid (bench.grid_record) -> `rows` (one
verdict row per experiment, variant and config hash: runs of different configs are never pooled)
-> `summary`/`status` (numbers) + `figures`/`samples` (PNG data URIs) -> `html` (jinja2
templates in `templates/`, autoescaped) -> files. Every page opens with the asked grid and how
many of its runs are complete, running, failed or missing; runs outside it get rows of their own,
labelled as such. Published figures are set beside ours computed the same way
(bench.report.fidelity), from the references the grid records kept when the runs were asked for.
Only files on disk are read: no model, variant code, data generator or torch is imported
(tests/test_walls.py), so a report of old results does not change with today's code; config
differences are against the schema defaults the grid record kept at launch. Run folders are
shown relative to the results folder, so a report made in a temporary folder shows no
machine-specific paths.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import platform
import re
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from bench.grid_record import GridRecord, read_records
from bench.report import experiments as experiments_meta
from bench.report import figures, representation, summary
from bench.report.configs import (
    VariantInfo,
    read_run_config,
    recorded_defaults,
    row_configs,
    variant_infos,
)
from bench.report.experiments import HEADLINE as GEN_COUNTS
from bench.report.failures import BLANK_MAX_IOU, BLANK_MIN_ACCURACY
from bench.report.fidelity import apply_recorded, budget_rule, resolve_references
from bench.report.html import page_name, render
from bench.report.measures import GENERALISATION_MIN_IN_DISTRIBUTION, generalisation_rule
from bench.report.rows import (
    ROW,
    Row,
    build_rows,
    by_row,
    convergence_sentence,
    label_tables,
)
from bench.report.samples import experiment_samples
from bench.report.status import describe_grid, status

__all__ = ["build_all", "build_reports"]

log = logging.getLogger(__name__)

REPORT_PACKAGES = ("torch", "numpy", "pandas", "scipy", "matplotlib", "seaborn", "jinja2")


def build_all(
    results_root: str | Path,
    reports_root: str | Path,
    *,
    command: str | None = None,
    reconstructions: bool = True,
) -> list[Path]:
    """Gather every run under `results_root` and write the reports into `reports_root`.

    Works on any subset of results (an empty folder gives an index saying so). The grid asked
    for last (`<results_root>/.grids/`, written by run_all.py) names the runs that have not even
    started. Returns the pages written, index first.
    """
    from bench.gather import gather  # the other half of the pipeline; imported when needed

    gathered = gather(results_root)
    records, grid_problems = read_records(results_root)
    return build_reports(
        gathered.runs,
        gathered.evals,
        reports_root,
        results_root=results_root,
        command=command,
        grid=records[-1] if records else None,
        grids_recorded=len(records),
        records=records,
        reconstructions=reconstructions,
        problems=[*gathered.problems, *grid_problems],
    )


def build_reports(
    runs: pd.DataFrame | None,
    evals: pd.DataFrame | None,
    reports_root: str | Path,
    *,
    results_root: str | Path | None = None,
    command: str | None = None,
    grid: GridRecord | None = None,
    grids_recorded: int | None = None,
    reconstructions: bool = True,
    problems: Iterable[str] = (),
    records: Sequence[GridRecord] | None = None,
) -> list[Path]:
    """Write index.html and one page per experiment from gathered `runs` and `evals` tables.

    `grid` is the asked grid the pages judge completeness by (None: no record, and no page
    calls itself complete); `reconstructions=False` skips the reconstruction figures (read from
    each run's samples.npz: bench.samples_file); `problems` are files
    gathering could not read, listed on the index; `records` every grid record, oldest first
    (default: `grid` alone), whose recorded variant references the rows are compared with.
    Returns the pages written, index first.
    """
    t0 = time.perf_counter()
    out = Path(reports_root)
    out.mkdir(parents=True, exist_ok=True)
    shown = _PathShower(results_root, reports_root)
    runs, evals = summary.normalise_runs(runs), summary.normalise_evals(evals)
    records = list(records) if records is not None else ([grid] if grid is not None else [])
    experiments_meta.use(records, _one_config_each(runs))
    rows = build_rows(runs, grid)
    runs, evals = label_tables(runs, evals, rows)
    names = set(runs["variant"]) | set(evals["variant"]) | {r.variant for r in rows}
    defaults = recorded_defaults(records)
    described = {v for r in records for v in r.variants_info}
    infos = variant_infos(sorted(names), runs, defaults, described)
    for record in records:  # oldest first: the newest word on a broken variant wins
        for name, why in record.broken.items():
            if name in infos:
                infos[name].broken = why
    problems = [*problems, *apply_recorded(infos, records)]
    problems += resolve_references(rows, records, infos)
    colours = figures.palette([r.key for r in rows])
    family = {r.key: infos[r.variant] for r in rows if r.variant in infos}
    report = _report_provenance(results_root, command, grid)
    report["command"] = shown.command(report["command"])
    generalisation = figures.generalisation_figure(by_row(runs), family, colours)
    grid_desc = describe_grid(grid, grids_recorded if grids_recorded is not None else int(
        grid is not None))  # fmt: skip

    experiments = []
    written = []
    names_seen = set(runs["experiment"]) | set(evals["experiment"]) | {r.experiment for r in rows}
    for experiment in summary.experiment_order(names_seen):
        exp = _experiment(
            experiment,
            runs[runs["experiment"] == experiment],
            evals[evals["experiment"] == experiment],
            [r for r in rows if r.experiment == experiment],
            infos,
            colours,
            status(runs, rows, grid, experiment),
            reconstructions,
            generalisation,
            shown,
            defaults,
        )
        written.append(render("experiment.html.j2", out / exp["page"], exp=exp, report=report,
                              grid=grid_desc))  # fmt: skip
        experiments.append(exp)
        log.info("report: wrote %s", out / exp["page"])

    overview_variants = sorted({v for e in experiments for v in e["by_variant"]})
    index = render(
        "index.html.j2",
        out / "index.html",
        report=report,
        grid=grid_desc,
        status=status(runs, rows, grid, None),
        experiments=experiments,
        overview_variants=overview_variants,
        variants=[infos[n] for n in sorted(infos)],
        generalisation=generalisation,
        gen_min=GENERALISATION_MIN_IN_DISTRIBUTION,
        paper_figures=_paper_figures(),
        provenance=_run_provenance(runs, shown),
        problems=[shown.text(p) for p in problems],
    )
    log.info("report: %d pages in %.1f s", len(written) + 1, time.perf_counter() - t0)
    return [index, *written]


def _one_config_each(runs: pd.DataFrame) -> dict[str, dict | None]:
    """One readable config.yaml per experiment of the runs table (None: none readable)."""
    out: dict[str, dict | None] = {}
    for name, rows in runs.groupby("experiment", sort=True):
        out[str(name)] = next(
            (c for c in map(read_run_config, rows["run_dir"]) if c is not None), None
        )
    return out


def _paper_figures() -> str:
    """The paper's generalisation figures in words, as the experiments' records give them."""
    parts = []
    for name in sorted(experiments_meta.PAPER, key=lambda e: (e not in GEN_COUNTS, e)):
        figures = experiments_meta.PAPER[name]
        if figures:
            said = ", ".join(f"{family} ~{value:.0%}" for family, value in figures.items())
            source = experiments_meta.PAPER_SOURCE.get(name)
            parts.append(f"{name}: {said}" + (f" ({source})" if source else ""))
    return "; ".join(parts) or "none recorded for these experiments"


def _experiment(
    name: str,
    runs: pd.DataFrame,
    evals: pd.DataFrame,
    rows: list[Row],
    infos: Mapping[str, VariantInfo],
    colours: Mapping[str, Any],
    state: dict[str, Any],
    reconstructions: bool,
    generalisation: str | None,
    shown: _PathShower,
    defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything one experiment's page shows."""
    sentence, rule_per_row = convergence_sentence(rows)
    verdicts = [
        summary.verdict(runs[runs[ROW] == r.key], name, infos.get(r.variant), r, rule_per_row)
        for r in rows
    ]
    # The figures draw one group per row, with the row's own reference; a row trained too
    # briefly gets no published marks.
    row_infos = {
        r.key: dataclasses.replace(infos[r.variant], reference=r.reference if r.comparable
                                   else None)
        for r in rows
        if r.variant in infos
    }  # fmt: skip
    row_runs, row_evals = by_row(runs), by_row(evals)
    targets = runs["converged_accuracy"].dropna()
    target = float(targets.iloc[0]) if len(targets) else None
    # Variants with a folder but no runs are named on the page; those are all known variants.
    known = {n for n, i in infos.items() if i.folder}
    absent = sorted(known - {r.variant for r in rows})
    figs = figures.page_figures(figures.FigureContext(
        name, row_runs, row_evals, colours, row_infos, target, generalisation))  # fmt: skip
    samples: list[tuple[str, Any]] = []
    if reconstructions:
        drawn = experiment_samples(row_runs)
        for s in drawn.values():
            s.notes = [shown.text(note) for note in s.notes]
        samples = [(r.key, drawn[r.key]) for r in rows if r.key in drawn]
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for v in verdicts:
        by_variant.setdefault(v["variant"], []).append(v)
    counted = [v for v in verdicts if v["in_grid"] is not False]
    return {
        "name": name,
        "page": page_name(name),
        "variants": sorted({r.variant for r in rows}),
        "status": state,
        "absent_variants": absent,
        "rule": sentence,
        "rule_per_row": rule_per_row,
        "generalisation": name in summary.GENERALISATION,
        "headline_label": summary.headline_label(name),
        "verdicts": verdicts,
        "asked": counted,
        "outside": [v for v in verdicts if v["in_grid"] is False],
        "by_variant": by_variant,
        "converged": sum(v["k"] for v in counted),
        "figures": figs,
        "probes": representation.table(row_runs),  # experiment representation
        "failures": _failures(runs, rows, shown),
        "comparisons": summary.comparisons(runs, rows, name),
        "samples": samples,
        "configs": row_configs(rows, defaults),
        "provenance": _run_provenance(runs, shown),
        "budget_rule": budget_rule(),
        "generalisation_rule": generalisation_rule(),
        "blank_accuracy": BLANK_MIN_ACCURACY,
        "blank_iou": BLANK_MAX_IOU,
    }


class _PathShower:
    """Paths as the pages print them: run folders relative to the results folder, and in
    command lines the results and reports folders as <results> and <reports>, so that a report
    made in a temporary folder names no folder of the machine that made it."""

    def __init__(self, results_root: str | Path | None, reports_root: str | Path | None) -> None:
        self.roots = _forms(results_root)
        absolute = [(f, "<results>") for f in self.roots if f.startswith("/")]
        absolute += [(f, "<reports>") for f in _forms(reports_root) if f.startswith("/")]
        self.placeholders = sorted(absolute, key=lambda pair: -len(pair[0]))

    def __call__(self, path: Any) -> str:
        text = str(path)
        for root in self.roots:
            if text == root:
                return "."
            if text.startswith(root + "/"):
                return text[len(root) + 1 :]
        return text

    def text(self, message: str) -> str:
        """A message with every mention of a path inside the results folder made relative."""
        for root in self.roots:
            message = message.replace(root + "/", "")
        return message

    def command(self, line: Any) -> Any:
        """A command line with the results and reports folders written <results>, <reports>."""
        if not isinstance(line, str):
            return line
        for form, placeholder in self.placeholders:
            line = re.sub(r"(?<![\w./-])" + re.escape(form) + r"(?![\w.-])", placeholder, line)
        return line


def _failures(runs: pd.DataFrame, rows: list[Row], shown: _PathShower) -> dict[str, Any]:
    """summary.failures, with run folders and the paths in tracebacks made relative (to the
    results folder, or to the project for its own source files)."""
    out = summary.failures(runs, rows, shown)
    project = str(Path(__file__).resolve().parents[2]) + "/"
    for f in out["runs"]:
        f["traceback"] = shown.text(f["traceback"]).replace(project, "")
    return out


def _run_provenance(runs: pd.DataFrame, shown: _PathShower) -> dict[str, Any]:
    """summary.run_provenance, with the folders in its command lines written as placeholders."""
    prov = summary.run_provenance(runs)
    counts: dict[str, int] = {}
    for line, n in prov["commands"]:
        counts[shown.command(line)] = counts.get(shown.command(line), 0) + n
    prov["commands"] = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return prov


def _forms(root: str | Path | None) -> list[str]:
    """The ways a folder may be written: as given, absolute, resolved (longest first)."""
    if root is None:
        return []
    path = Path(root)
    forms = {str(f).rstrip("/") for f in (path, path.absolute(), path.resolve())}
    return sorted((f for f in forms if f not in ("", ".")), key=len, reverse=True)


def shown_root(results_root: str | Path | None) -> str:
    """The results folder as the pages name it: relative to the working directory when it is
    inside it, else by its name only (a page names no folder of the machine that made it)."""
    if results_root is None:
        return "(tables given)"
    path = Path(results_root)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return f"{path.resolve().name} (a folder outside the working directory)"


def _report_provenance(
    results_root: str | Path | None, command: str | None, grid: GridRecord | None
) -> dict[str, Any]:
    """Where this report came from: command, code version, packages, machine."""
    from bench.provenance import git_commit

    packages = []
    for name in REPORT_PACKAGES:
        try:
            packages.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            packages.append((name, None))
    if command is None:
        command = " ".join(sys.argv)
        if "submitit" in sys.argv[0] and grid is not None:  # the SLURM report job of a grid
            command = f"{grid.command}  (its SLURM report job)"
    return {
        "generated": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "results_root": shown_root(results_root),
        "command": command,
        "git_commit": git_commit(),
        "packages": packages,
        "python": sys.version.split()[0],
        "hardware": f"{platform.machine()} {platform.processor() or ''}".strip()
        + f", {os.cpu_count() or 1} CPU cores, {platform.system()} {platform.release()}",
    }
