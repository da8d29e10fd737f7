"""Where the asked grid stands: the status box at the top of every page.

The grid is the latest one recorded under `<results>/.grids/` (bench.grid_record): its runs are
counted by what their folders say (complete, failed, running, queued, interrupted) or as missing
when they have no folder at all. Run folders outside that grid are counted apart and never make
it look more complete. Without a record (results from before grids were recorded, or tables
given directly) the box says so and counts only what is on disk: a run that never started
cannot be known, so such a report never calls itself complete.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

from bench.grid_record import GridRecord, seed_ranges, utc
from bench.report.rows import ROW, Row

# Run status (bench.gather) -> what the status box calls it.
CATEGORY = {
    "complete": "complete",
    "error": "failed",
    "timeout": "failed",
    "running": "running",
    "queued": "queued",
    "partial": "interrupted",  # no result, nothing holds it (gather)
    "interrupted": "interrupted",  # stopped by Ctrl-C or a kill, checkpointed (worker)
}
ORDER = ("complete", "failed", "running", "queued", "interrupted", "missing")
ALWAYS_SHOWN = ("complete", "running", "failed", "missing")
EXPLAIN = {
    "complete": "trained to the end",
    "failed": "crashed or ran out of time",
    "running": "training now",
    "queued": "waiting in the SLURM queue",
    "interrupted": "started, no result and nothing training it: the same command resumes it",
    "missing": "no run folder",
}


def describe_grid(grid: GridRecord | None, n_recorded: int) -> dict[str, Any] | None:
    """The asked grid, as the page names it."""
    if grid is None:
        return None
    return {
        "id": grid.grid_id,
        "command": grid.command,
        "profile": grid.profile,
        "cluster": grid.cluster,
        "experiments": grid.experiments,
        "variants": grid.variants,
        "seeds": seed_ranges(grid.seeds),
        "overrides": grid.overrides,
        "broken": sorted(grid.broken.items()),
        "asked_at": grid.asked_at,
        "first_asked_at": utc(grid.first_asked_at),
        "budgets": sorted({r.iterations for r in grid.runs if r.iterations is not None}),
        "n_runs": len(grid.runs) + _broken_runs(grid, None),
        "n_recorded": n_recorded,
    }


def _broken_runs(grid: GridRecord, experiment: str | None) -> int:
    experiments = [e for e in grid.experiments if experiment in (None, e)]
    return len(grid.broken) * len(experiments) * len(grid.seeds)


def _progress(group: pd.DataFrame, status: str) -> list[str]:
    if status == "queued":  # nothing to show but which seeds
        seeds = list(group["seed"])
        return [f"seed{'s' if len(seeds) > 1 else ''} {seed_ranges(seeds).replace(',', ', ')}"]
    return [
        f"seed {s}: {d:,.0f}/{t:,.0f} iterations" if d == d and t == t else f"seed {s}"
        for s, d, t in zip(group["seed"], group["iterations"], group["target_iterations"],
                           strict=True)
    ]  # fmt: skip


def status(
    runs: pd.DataFrame,
    rows: Iterable[Row],
    grid: GridRecord | None,
    experiment: str | None = None,
) -> dict[str, Any]:
    """The asked grid's runs (of one experiment, or all) by state; runs outside it apart.

    `runs` is the runs table with the ROW column (bench.report.rows.label_tables).
    """
    rows = [r for r in rows if experiment in (None, r.experiment)]
    if experiment is not None:
        runs = runs[runs["experiment"] == experiment]
    key_of = {(r.experiment, r.variant, r.config_hash): r.key for r in rows}
    hashes = runs["config_hash"].map(lambda h: h if isinstance(h, str) else "")
    idents = list(zip(runs["experiment"], runs["variant"], hashes, runs["seed"], strict=True))
    if grid is not None:
        asked = {r.key for r in grid.runs if experiment in (None, r.experiment)}
        mine = pd.Series([i in asked for i in idents], index=runs.index, dtype=bool)
    else:
        asked = set()
        mine = pd.Series(True, index=runs.index, dtype=bool)
    counted, outside = runs[mine], runs[~mine]
    counts = Counter(CATEGORY.get(s, "interrupted") for s in counted["status"])
    pending = []
    waiting = counted[counted["status"].map(lambda x: CATEGORY.get(x, "interrupted")).isin(
        ("running", "queued", "interrupted"))]  # fmt: skip
    for (row_key, state), group in waiting.groupby([ROW, "status"], sort=True):
        pending.append({"label": row_key or group["variant"].iloc[0],
                        "experiment": group["experiment"].iloc[0],
                        "status": CATEGORY.get(state, "interrupted"),
                        "runs": _progress(group, state)})  # fmt: skip
    missing = []
    if grid is not None:
        lost: dict[tuple[str, str, str], list[int]] = {}
        present = set(idents)
        for r in grid.runs:
            if experiment in (None, r.experiment) and r.key not in present:
                lost.setdefault((r.experiment, r.variant, r.config_hash), []).append(r.seed)
        for ident, seeds in sorted(lost.items()):
            missing.append({"label": key_of.get(ident, ident[1]), "experiment": ident[0],
                            "seeds": seed_ranges(seeds).replace(",", ", "),
                            "count": len(seeds), "why": "no run folder"})  # fmt: skip
        for name, reason in sorted(grid.broken.items()):
            for exp in grid.experiments:
                if experiment in (None, exp):
                    missing.append({"label": name, "experiment": exp,
                                    "seeds": seed_ranges(grid.seeds).replace(",", ", "),
                                    "count": len(grid.seeds),
                                    "why": f"variant broken, not run: {reason}"})  # fmt: skip
    counts["missing"] = sum(m["count"] for m in missing)
    total = sum(counts.values())
    outside_rows = sorted({k for k in outside[ROW] if k})
    return {
        "experiment": experiment,
        "grid": grid is not None,
        "total": total,
        "finished": counts["complete"] + counts["failed"],
        "counts": [(c, counts[c]) for c in ORDER if counts[c] or c in ALWAYS_SHOWN],
        "n": {c: counts[c] for c in ORDER},
        "explain": EXPLAIN,
        "state": _state(counts, total, grid is not None),
        "pending": pending,
        "missing": missing,
        "outside_runs": len(outside),
        "outside_rows": outside_rows,
    }


def _state(counts: Mapping[str, int], total: int, planned: bool) -> str:
    """complete | finished (every run ended, some failed) | running | incomplete | empty |
    unknown (no grid recorded: nothing can be called complete)."""
    if total == 0:
        return "empty"
    if counts["running"] or counts["queued"]:
        return "running"
    if counts["interrupted"] or counts["missing"]:
        return "incomplete"
    if not planned:
        return "unknown"
    return "complete" if counts["failed"] == 0 else "finished"
