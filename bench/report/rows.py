"""Verdict rows: one per (experiment, variant, config hash), never pooled across configs.

Runs of one variant trained under different configs (a 12-iteration smoke run and a 7000-iteration
CPU run, or two learning rates) are different experiments and get different rows. A row comes
from the run folders on disk and from the asked grid (bench.grid_record): a config that the grid
asked for but that has no run folder yet still has a row, with its runs counted as missing.

Each row has a `key`, unique within its experiment, that names it on the page and in the figure
legends: the variant's name when the variant has one row there, else the variant's name plus
what tells its rows apart (the iterations, then up to two config keys that differ between rows of
the same budget, or the config hash when the configs cannot be read).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from bench.grid_record import GridRecord
from bench.report.configs import (
    ABSENT,
    HASH_IGNORED_KEYS,
    base_config,
    flatten,
    merged,
    read_run_config,
)
from bench.report.fidelity import budget_note, is_comparable
from bench.report.html import show
from bench.report.measures import GENERALISATION

ROW = "row"  # column added to the runs and evals tables: the row key within its experiment
SHOWN_KEYS = 2  # config keys named in a row's key; the rest are counted


@dataclass
class Row:
    """One verdict row: the runs of one variant under one config in one experiment."""

    experiment: str
    variant: str
    config_hash: str  # "" when the runs do not say
    key: str = ""
    iterations: float = math.nan  # train.iterations of the config (the budget)
    rule: tuple[float, int] | None = None  # (eval.converged_accuracy, eval.converged_evals)
    raw_config: dict[str, Any] | None = None  # the resolved config, when readable
    config_source: str | None = None  # "run folder" or "grid record"
    in_grid: bool | None = None  # in the latest asked grid; None: no grid recorded
    asked_seeds: list[int] = field(default_factory=list)  # the asked grid's seeds of this row
    seeds: list[int] = field(default_factory=list)  # seeds with a run folder
    details: list[str] = field(default_factory=list)  # config keys in its key, if any
    # The published reference its numbers are set against (bench.variants.Reference) and where
    # it was read (bench.report.fidelity.resolve_references).
    reference: Any = None
    reference_origin: str = ""

    @property
    def budget(self) -> str:
        it = self.iterations
        return f"{it:,.0f} iterations" if it == it else "iterations unknown"

    @property
    def comparable(self) -> bool:
        """Trained long enough for its numbers to be set against the published ones
        (bench.report.fidelity.budget_rule)."""
        return is_comparable(self.iterations, self._budget_source)

    @property
    def budget_note(self) -> str:
        """Why the published figures are not set against this row (empty when they are)."""
        return budget_note(self.iterations, self._budget_source)

    @property
    def _budget_source(self) -> Any:
        """The reference whose training length applies: on a generalisation test the figures
        are the paper's, whose training length is not the variant's source's."""
        return None if self.experiment in GENERALISATION else self.reference


def _hash(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _first_rule(group: pd.DataFrame) -> tuple[float, int] | None:
    both = group[["converged_accuracy", "converged_evals"]].dropna()
    if both.empty:
        return None
    acc, n = both.iloc[0]
    return float(acc), int(n)


def _flat(raw: Mapping[str, Any] | None, base: Mapping[str, Any]) -> dict[str, Any] | None:
    if raw is None:
        return None
    flat = flatten(merged(base, raw))
    return {k: v for k, v in flat.items() if k not in HASH_IGNORED_KEYS}


def build_rows(runs: pd.DataFrame, grid: GridRecord | None = None) -> list[Row]:
    """Every row of every experiment, from the runs on disk and the asked grid (or None)."""
    asked: dict[tuple[str, str, str], list[int]] = {}
    asked_iterations: dict[tuple[str, str, str], int | None] = {}
    for r in grid.runs if grid is not None else []:
        ident = (r.experiment, r.variant, r.config_hash)
        asked.setdefault(ident, []).append(r.seed)
        asked_iterations[ident] = r.iterations
    on_disk: dict[tuple[str, str, str], pd.DataFrame] = {}
    if len(runs):
        hashes = runs["config_hash"].map(_hash)
        for ident, group in runs.groupby([runs["experiment"], runs["variant"], hashes]):
            on_disk[tuple(str(x) for x in ident)] = group  # type: ignore[assignment]
    base = base_config(grid.defaults if grid is not None else None)
    rows = []
    for ident in sorted(set(on_disk) | set(asked)):
        experiment, variant, digest = ident
        group = on_disk.get(ident)
        row = Row(experiment, variant, digest, asked_seeds=sorted(asked.get(ident, [])))
        row.in_grid = None if grid is None else ident in asked
        if group is not None:
            row.seeds = sorted(int(s) for s in group["seed"])
            targets = group["target_iterations"].dropna()
            row.iterations = float(targets.iloc[0]) if len(targets) else math.nan
            row.rule = _first_rule(group)
            for run_dir in group["run_dir"]:
                if (cfg := read_run_config(run_dir)) is not None:
                    row.raw_config, row.config_source = cfg, "run folder"
                    break
        if row.raw_config is None and grid is not None:
            cfg = grid.config(experiment, variant, digest)
            if cfg is not None:
                row.raw_config, row.config_source = cfg, "grid record"
        flat = _flat(row.raw_config, base)
        if row.iterations != row.iterations:
            it = asked_iterations.get(ident) or (flat or {}).get("train.iterations")
            row.iterations = float(it) if isinstance(it, int | float) else math.nan
        if row.rule is None and flat is not None:
            acc, n = flat.get("eval.converged_accuracy"), flat.get("eval.converged_evals")
            if isinstance(acc, int | float) and isinstance(n, int):
                row.rule = (float(acc), n)
        rows.append(row)
    _name_rows(rows, base)
    return sorted(rows, key=sort_key)


def sort_key(row: Row) -> tuple:
    """Asked-grid rows first; within a variant the longest budget first."""
    it = row.iterations if row.iterations == row.iterations else -1.0
    return (row.experiment, row.in_grid is False, row.variant, -it, row.config_hash)


def _name_rows(rows: list[Row], base: Mapping[str, Any]) -> None:
    """Give every row its key: the variant's name, plus what tells its rows apart."""
    by_variant: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        by_variant.setdefault((row.experiment, row.variant), []).append(row)
    for (_, variant), group in by_variant.items():
        if len(group) == 1:
            group[0].key = variant
            continue
        parts: dict[int, list[str]] = {id(r): [] for r in group}
        budgets = {r.iterations if r.iterations == r.iterations else None for r in group}
        if len(budgets) > 1:
            for r in group:
                parts[id(r)].append(f"{r.iterations:,.0f} it." if r.iterations == r.iterations
                                    else "? it.")  # fmt: skip
        same_budget: dict[Any, list[Row]] = {}
        for r in group:
            same_budget.setdefault(r.iterations if r.iterations == r.iterations else None,
                                   []).append(r)  # fmt: skip
        for members in same_budget.values():
            if len(members) > 1:
                _distinguish(members, parts, base)
        for r in group:
            if not parts[id(r)]:
                parts[id(r)].append(f"config {r.config_hash or '?'}")
            r.key = f"{variant} \u00b7 " + ", ".join(parts[id(r)])
            r.details = [p for p in parts[id(r)] if not p.endswith(" it.")]
        seen: dict[str, int] = {}
        for r in group:
            seen[r.key] = seen.get(r.key, 0) + 1
        for r in group:  # still alike (e.g. unreadable configs): the hash tells them apart
            if seen[r.key] > 1:
                r.key += f" ({r.config_hash or '?'})"


def _distinguish(members: list[Row], parts: dict[int, list[str]], base: Mapping) -> None:
    """Name up to SHOWN_KEYS config keys in which rows of the same budget differ."""
    flats = {id(r): _flat(r.raw_config, base) for r in members}
    known = [f for f in flats.values() if f is not None]
    every_key: set[str] = set().union(*known) if known else set()
    keys = sorted(
        k
        for k in every_key
        if k != "train.iterations" and len({repr(f.get(k, ABSENT)) for f in known}) > 1
    )
    for r in members:
        flat = flats[id(r)]
        if flat is None:
            parts[id(r)].append(f"config {r.config_hash or '?'}")
            continue
        parts[id(r)] += [f"{k}={show(flat.get(k, ABSENT))}" for k in keys[:SHOWN_KEYS]]
        if len(keys) > SHOWN_KEYS:
            parts[id(r)].append(f"+{len(keys) - SHOWN_KEYS} more")


def label_tables(
    runs: pd.DataFrame, evals: pd.DataFrame, rows: Iterable[Row]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Copies of the two tables with the ROW column: each run's and evaluation's row key.

    An evaluation without a config hash (tables from elsewhere) goes to its variant's row when
    the variant has only one in that experiment, and is left out (ROW empty) otherwise.
    """
    keys = {(r.experiment, r.variant, r.config_hash): r.key for r in rows}
    only: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        only.setdefault((r.experiment, r.variant), []).append(r.key)

    def key(experiment: str, variant: str, digest: Any) -> str:
        found = keys.get((experiment, variant, _hash(digest)))
        if found is None and len(only.get((experiment, variant), [])) == 1:
            found = only[(experiment, variant)][0]
        return found or ""

    out = []
    for table in (runs, evals):
        table = table.copy()
        table[ROW] = [
            key(e, v, h)
            for e, v, h in zip(table["experiment"], table["variant"], table["config_hash"],
                               strict=True)
        ]  # fmt: skip
        out.append(table)
    return out[0], out[1]


def by_row(table: pd.DataFrame) -> pd.DataFrame:
    """The table with each row key in the `variant` column: the figures and per-variant helpers
    then draw and count one group per verdict row."""
    table = table[table[ROW] != ""].copy()
    table["variant"] = table[ROW]
    return table


# What "count accuracy" means in the convergence rule (bench/trainer.py, `finish`).
ACCURACY_MEANS = (
    "The accuracy it watches is the sampled count accuracy on the test images whose counts the "
    "run trains on (in the count experiment, all of them), so a generalisation run can converge "
    "without counting the unseen count; runs of older code (no metrics_version) were judged on "
    "the mode-based accuracy of every test image."
)


def rule_text(rule: tuple[float, int] | None, short: bool = False) -> str:
    """A convergence rule in words; `short` for a table cell."""
    if rule is None:
        return "rule unknown"
    acc, n = rule
    if short:
        last = "the last evaluation" if n == 1 else f"each of the last {n} evaluations"
        return f"\u2265 {acc:g} in {last}"
    last = "the last periodic evaluation" if n == 1 else (
        f"each of the last {n} periodic evaluations"
    )  # fmt: skip
    return f"count accuracy >= {acc:g} in {last}"


def convergence_sentence(rows: Sequence[Row]) -> tuple[str, bool]:
    """One sentence for the page: what "converged" means here; True when it differs by row
    (then every row shows its own rule)."""
    rules = {r.rule for r in rows if r.rule is not None}
    keys = "(eval.converged_accuracy, eval.converged_evals)"
    if not rules:  # no run and no config: the rule is each run config's own
        return f"Converged means count accuracy >= the config's target in its last periodic "\
            f"evaluations {keys}. {ACCURACY_MEANS}", False  # fmt: skip
    if len(rules) == 1:
        return f"Converged means {rule_text(next(iter(rules)))} {keys}. {ACCURACY_MEANS}", False
    accs = sorted({a for a, _ in rules})
    evals = sorted({n for _, n in rules})
    acc = f"{accs[0]:g}" if len(accs) == 1 else "the row's target (" + " or ".join(
        f"{a:g}" for a in accs) + " here)"  # fmt: skip
    last = (
        ("the last periodic evaluation" if evals[0] == 1
         else f"each of the last {evals[0]} periodic evaluations")
        if len(evals) == 1
        else "each of the row's last N periodic evaluations (N = "
        + " or ".join(str(n) for n in evals) + " here)"
    )  # fmt: skip
    return (
        f"Converged means count accuracy >= {acc} in {last} {keys}; the rule differs between "
        f"rows' configs, so each row states its own under its k/n. {ACCURACY_MEANS}",
        True,
    )
