"""Our figures against the published ones, like with like.

Each published figure of a variant (its `reference:`, bench.variants.Reference) is set beside
our figure computed the way the source computed it:

- count accuracy: the source's count definition (`reference.count_definition`: one posterior
  sample, `count_accuracy`; or the mode, `count_accuracy_mode`);
- ELBO, IW bound, log p(x) bound: the same estimator (addtt's "log p(x) >=" is the log-mean-exp
  of K single-sample ELBOs, our `lme_elbo_bound`, not the IW bound), scored at presence prior
  0.01 as every published bound is (`*_at_0.01`: equal to the plain keys for fixed-0.01 runs),
  and only on the same likelihood scale (Gaussian sd 0.3 nats and Bernoulli nats never compare);
- on the published row's test images (`reference.protocol`: the run's `final_<protocol>_*`
  results) when the runs have them, with our held-out figure beside: the headline stays held-out.

A figure is "like with like" when all of that holds; otherwise the page says what differs, and
lists the settings in which the source still differs (`reference.differences`) under the row.
Success rate and iterations to target come from the periodic evaluations on held-out images,
so they are never like with like with a source measured on its own test images.

Budget: the published figures are at convergence, which the references reach in 25-35k
iterations, so a row is set against them when it trained at least
min(reference.budget_iterations, MIN_COMPARABLE_ITERATIONS) iterations (25,000 when the source
does not say). Rows below that still show the published figures, marked not comparable.

Where the reference comes from: the grid records under <results>/.grids/ (the newest one that
asked for the row's config, else the newest that names the variant) keep each variant's
`reference:` as it was when the grid was asked. Only results without such a record fall back
on the variant folder as it is now, and the page says so.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bench.report.measures import (
    AT,
    GENERALISATION,
    METRICS_VERSION,
    column,
    generalisation_rule,
    scale_of,
    versions,
)

if TYPE_CHECKING:
    from bench.grid_record import GridRecord
    from bench.report.configs import VariantInfo
    from bench.report.rows import Row

MIN_COMPARABLE_ITERATIONS = 25_000
FOLDER_ORIGIN = "variant folder"  # a reference read from implementations/ now, not recorded


# ---------------------------------------------------------------------------------- budget
def budget_threshold(ref: Any) -> int:
    """Iterations a row needs before the published figures are set against it."""
    budget = getattr(ref, "budget_iterations", None)
    return min(int(budget), MIN_COMPARABLE_ITERATIONS) if budget else MIN_COMPARABLE_ITERATIONS


def budget_rule() -> str:
    """The comparability rule, in words, for the page."""
    return (
        "a row is set against the published figures when it trained at least "
        f"min(the source's training length, {MIN_COMPARABLE_ITERATIONS:,}) iterations "
        f"({MIN_COMPARABLE_ITERATIONS:,} when the source does not say): the published figures "
        "are at convergence, which the references reach in 25,000-35,000 iterations"
    )


def is_comparable(iterations: float, ref: Any) -> bool:
    return iterations == iterations and iterations >= budget_threshold(ref)


def budget_note(iterations: float, ref: Any) -> str:
    """Why the published figures are not set against a row (empty when they are)."""
    if is_comparable(iterations, ref):
        return ""
    shown = f"{iterations:,.0f} iterations" if iterations == iterations else "iterations unknown"
    budget = getattr(ref, "budget_iterations", None)
    source = f"; the source trained {budget:,}" if budget else ""
    return f"budget {shown} < {budget_threshold(ref):,}{source}: not comparable"


# ---------------------------------------------------------------------------------- references
def reference_from_dict(data: Mapping[str, Any]) -> Any:
    """A bench.variants.Reference from its recorded dict (unknown keys from newer code left
    out; per-count keys back to integers). ValueError if it cannot be one."""
    from bench.reference import Reference

    known = {f.name for f in dataclasses.fields(Reference)}
    values = {k: v for k, v in data.items() if k in known}
    by_count = values.get("count_accuracy_by_count") or {}
    try:
        values["count_accuracy_by_count"] = {int(k): float(v) for k, v in by_count.items()}
        return Reference(**values)
    except (TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"recorded reference is not a Reference: {err}") from err


def recorded_variants(records: Sequence[GridRecord]) -> dict[str, tuple[dict[str, Any], str]]:
    """variant -> (its newest recorded {description, reference}, where it was recorded)."""
    out: dict[str, tuple[dict[str, Any], str]] = {}
    for record in records:  # oldest first: newer records replace older ones
        for name, info in record.variants_info.items():
            out[name] = (info, f"grid record {record.grid_id}")
    return out


def apply_recorded(infos: dict[str, VariantInfo], records: Sequence[GridRecord]) -> list[str]:
    """Set each variant's description and reference to what the newest grid record keeps (what
    its runs were launched against) instead of its folder now; returns unreadable ones."""
    from bench.report.configs import VariantInfo

    problems = []
    for name, (data, origin) in recorded_variants(records).items():
        info = infos.setdefault(name, VariantInfo(name=name))
        try:
            ref = data.get("reference")
            info.reference = None if ref is None else reference_from_dict(ref)
        except ValueError as err:
            problems.append(f"{origin}: {name}: {err}")
            continue
        info.description = str(data.get("description") or info.description)
        info.reference_origin = origin
    return problems


def resolve_references(
    rows: Iterable[Row], records: Sequence[GridRecord], infos: Mapping[str, VariantInfo]
) -> list[str]:
    """Set each row's `reference` and `reference_origin`; returns problems (unreadable ones).

    The newest grid record that asked for the row's (experiment, variant, config) wins, then the
    newest that names the variant; no record, no reference (the variant folder as it is now is
    never read: a report shows what its runs were launched against).
    """
    problems: list[str] = []
    asked = [
        (record, {(r.experiment, r.variant, r.config_hash) for r in record.runs})
        for record in reversed(records)
    ]  # fmt: skip
    for row in rows:
        ident = (row.experiment, row.variant, row.config_hash)
        found = next((rec for rec, idents in asked if ident in idents
                      and row.variant in rec.variants_info), None)  # fmt: skip
        if found is None:
            found = next((rec for rec, _ in asked if row.variant in rec.variants_info), None)
        if found is not None:
            data = found.variants_info[row.variant].get("reference")
            row.reference_origin = f"grid record {found.grid_id}"
            try:
                row.reference = None if data is None else reference_from_dict(data)
            except ValueError as err:
                problems.append(f"{found.path or found.grid_id}: {row.variant}: {err}")
                row.reference = None
    return problems


# ---------------------------------------------------------------------------------- comparison
def _median(values: pd.Series) -> tuple[float, int]:
    a = values.to_numpy(dtype=float)
    a = a[np.isfinite(a)]
    return (float(np.median(a)) if len(a) else math.nan), len(a)


def _item(label: str, published: float, digits: int) -> dict[str, Any]:
    return {"label": label, "published": float(published), "digits": digits, "ours": math.nan,
            "where": "", "heldout": math.nan, "n": 0, "why": [], "delta": math.nan,
            "like": False}  # fmt: skip


class _Measure:
    """Our figure of one final-metric key, on the published row's images when we have them."""

    def __init__(self, new: pd.DataFrame, old: pd.DataFrame, ref: Any, experiment: str) -> None:
        self.new, self.old, self.ref = new, old, ref
        gen = experiment in GENERALISATION
        self.protocol = None if gen or ref.protocol == "heldout" else ref.protocol
        self.images_note = (
            "the paper's test images are not public: ours on held-out images" if gen
            else "the source's test images have no rebuilt protocol: ours on held-out images"
            if ref.protocol == "heldout" else ""
        )  # fmt: skip

    def fill(self, item: dict[str, Any], key: str, old_key: str | None = None,
             old_why: str = "") -> None:  # fmt: skip
        """Ours for `key` (version-2 runs); `old_key` of older runs when no version-2 run has
        the figure, marked not like with like (`old_why`)."""
        heldout, n_held = _median(column(self.new, f"final_{key}"))
        item["heldout"] = heldout
        if self.protocol is not None:
            ours, n = _median(column(self.new, f"final_{self.protocol}_{key}"))
            if n:
                item.update(ours=ours, n=n, where=f"{self.protocol} test images")
                return
            item["why"].append(f"no {self.protocol} test-image results in these runs: ours on "
                               "held-out images")  # fmt: skip
        elif self.images_note:
            item["why"].append(self.images_note)
        if n_held:
            item.update(ours=heldout, n=n_held, where="held-out")
        elif old_key is not None:
            ours, n = _median(column(self.old, f"final_{old_key}"))
            if n:
                item.update(ours=ours, n=n, where="held-out, older runs")
                item["why"].append(old_why)
        item["heldout"] = math.nan  # ours is already the held-out figure


def published_comparison(
    complete: pd.DataFrame,
    experiment: str,
    row: Row,
    measured: Mapping[str, Any],
) -> dict[str, Any]:
    """The published figures of `row`'s reference, each beside ours computed the same way.

    `complete` holds the row's complete runs; `measured` its verdict numbers (rate, iterations,
    bench.report.measures.row_measures). Returns {"items", "like", "n_like", "differences",
    "protocol", "count_definition", "scale", "origin", "comparable", "budget_note"}.
    """
    ref = row.reference
    if ref is None:
        return {"items": []}
    v = versions(complete)
    new, old = complete[v >= METRICS_VERSION], complete[v < METRICS_VERSION]
    measure = _Measure(new, old, ref, experiment)
    sampled = ref.count_definition == "sampled"
    count_key = "count_accuracy" if sampled else "count_accuracy_mode"
    old_counts = "ours: mode counts (older runs, no sampled counts)" if sampled else ""
    items: list[dict[str, Any]] = []
    if experiment in GENERALISATION:
        published = getattr(ref, f"{experiment}_accuracy", None)
        if published is not None:
            gen = measured["generalisation"]
            item = _item(f"count accuracy on {gen['count']}-digit images", published, 3)
            item.update(ours=gen["headline"]["median"], n=gen["headline"]["n"],
                        where="held-out, runs that count the training counts")  # fmt: skip
            item["why"].append(measure.images_note)
            if len(old) and not len(new):
                item["why"].append("older runs only: mode counts, no in-distribution accuracy")
            elif not gen["headline"]["n"]:
                item["why"].append("no run counts its training counts (" + generalisation_rule()
                                   + ")")  # fmt: skip
            items.append(item)
    else:
        periodic = measure.images_note or (
            f"ours from the periodic held-out evaluations, not on {measure.protocol} test images"
        )
        if len(old):
            periodic += "; older runs converged on mode counts"
        if ref.success_rate is not None:
            item = _item("success rate", ref.success_rate, 2)
            item.update(ours=measured["rate"], n=measured["n"], where="convergence rule")
            item["why"].append(periodic)
            items.append(item)
        if ref.count_accuracy is not None:
            item = _item("count accuracy" + ("" if sampled else " (mode)"), ref.count_accuracy, 3)
            measure.fill(item, count_key, "count_accuracy", old_counts)
            items.append(item)
        if ref.iterations_to_target is not None:
            item = _item("iterations to target", ref.iterations_to_target, 0)
            item.update(ours=measured["iters"]["median"], n=measured["iters"]["n"],
                        where="held-out periodic evaluations")  # fmt: skip
            item["why"].append(periodic)
            items.append(item)
        lme = "log p(x) \u2265 (LME)"
        for label, key in (("ELBO", "elbo"), ("IW bound", "iw_bound"), (lme, "lme_elbo_bound")):
            published = getattr(ref, key, None)
            if published is None:
                continue
            item = _item(label, published, 1)
            measure.fill(item, key + AT)
            if item["n"] == 0 and len(old) and key != "lme_elbo_bound":
                ours, n = _median(column(old, f"final_{key}"))
                item.update(ours=ours, n=n, where="held-out, older runs")
                item["why"].append("older runs: scored at the run's own prior (Concrete runs: the "
                                   "relaxed objective, which bounds nothing)")  # fmt: skip
            _check_scale(item, measured.get("scale", ""), ref)
            items.append(item)
        for c, published in sorted((ref.count_accuracy_by_count or {}).items()):
            item = _item(f"accuracy, {c} digits", published, 3)
            key = f"{count_key}_{c}"
            measure.fill(item, key, f"count_accuracy_{c}", old_counts)
            items.append(item)
    comparable = row.comparable
    for item in items:
        item["why"] = [w for w in item["why"] if w]
        item["like"] = not item["why"]
        scale_bad = item.pop("scale_bad", False)
        if comparable and not scale_bad and item["ours"] == item["ours"]:
            item["delta"] = item["ours"] - item["published"]
    return {
        "items": items,
        "n_like": sum(i["like"] for i in items),
        "like": bool(items) and all(i["like"] for i in items),
        "differences": list(ref.differences),
        "protocol": (
            f"{measure.protocol} (rebuilt: bench/data/protocols.py)"
            if measure.protocol
            else "the source's own, not rebuilt (ours: held-out)"
        ),
        "count_definition": ref.count_definition,
        "scale": ""
        if experiment in GENERALISATION
        else scale_of(ref.likelihood, ref.likelihood_sd),
        "origin": row.reference_origin,
        "comparable": comparable,
        "budget_note": row.budget_note,
    }


def _check_scale(item: dict[str, Any], ours: str, ref: Any) -> None:
    """Nats on different likelihood scales never compare: no difference is computed."""
    theirs = scale_of(ref.likelihood, ref.likelihood_sd)
    if not ours or not theirs:
        item["why"].append(f"scale unknown (ours: {ours or '?'}, published: {theirs or '?'})")
        item["scale_bad"] = True
    elif ours != theirs:
        item["why"].append(f"different scales: ours {ours} nats, published {theirs} nats")
        item["scale_bad"] = True
