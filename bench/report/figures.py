"""The report's statistical figures (seaborn on matplotlib), each returned as a PNG data URI.

The experiment pages show every figure registered with `@figure(name, title, order, caption)`
(bench.report.registry; the registrations are at the end of this file): adding a figure to the
pages is one decorated function here, taking a `FigureContext` and returning a data URI.

Figures are built on `matplotlib.figure.Figure` directly, never through pyplot: no global figure
registry to leak memory into, no backend to switch, and nothing to close. Styles are applied in a
context so that building a report leaves the caller's matplotlib settings as they were. Math-text
parsing is off, so a variant called `$x$` is drawn as typed instead of failing the figure.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from bench.report import representation, stats
from bench.report.configs import VariantInfo
from bench.report.measures import qualifies
from bench.report.registry import FigureContext, figure, page_figures  # noqa: F401  (re-exported)
from bench.report.summary import (
    FINISHED,
    GENERALISATION,
    PAPER_GENERALISATION,
    confusion_sum,
    headline_column,
    headline_label,
)

DPI = 96
FAMILY_COLOURS = {"AIR": "#1f77b4", "DAIR": "#ff7f0e", "?": "#7f7f7f"}


@contextmanager
def figure_style() -> Iterator[None]:
    """The report's look (seaborn whitegrid, paper context), undone on leaving the block."""
    rc = {"text.parse_math": False, "figure.dpi": DPI, "savefig.dpi": DPI, "font.size": 9}
    with (
        sns.axes_style("whitegrid"),
        sns.plotting_context("paper", font_scale=1.1),
        mpl.rc_context(rc),
    ):
        yield


def palette(variants: Sequence[str]) -> dict[str, Any]:
    """One colour per variant, fixed by the sorted list of every variant in the results."""
    names = sorted(set(variants))
    colours = sns.color_palette("colorblind" if len(names) <= 10 else "husl", len(names))
    return dict(zip(names, colours, strict=True))


def to_uri(fig: Figure) -> str:
    """The figure as a base64 PNG data URI (self-contained: no file, no network)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _grid(n: int, ncols: int = 3, size: tuple[float, float] = (4.2, 2.9)) -> tuple[Figure, list]:
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _short(name: str, width: int = 36) -> str:
    return name if len(name) <= width else name[: width - 1] + "\u2026"


# ---------------------------------------------------------------------------------- ECDF
def ecdf_figure(
    runs: pd.DataFrame,
    colours: Mapping[str, Any],
    infos: Mapping[str, VariantInfo],
    experiment: str = "",
) -> str | None:
    """Fraction of finished seeds that converged by iteration x, per variant.

    The curve counts only converged runs but divides by every finished run, so it ends at the
    convergence rate; a published iterations-to-target is marked as a dotted vertical line
    (not on the generalisation tests, whose training data differ from the published setting).
    """
    finished = runs[runs["status"].isin(FINISHED)]
    if finished.empty:
        return None
    with figure_style():
        fig = Figure(figsize=(7.5, 3.8), layout="constrained")
        ax = fig.subplots()
        right = np.nanmax([finished["target_iterations"].max(), finished["iterations"].max(), 1.0])
        for variant, g in finished.groupby("variant"):
            conv = g[(g["status"] == "complete") & (g["outcome"] == "converged")]
            x, y = stats.ecdf(conv["iterations_to_target"].to_numpy(dtype=float), len(g))
            xs = np.concatenate([[0.0], x, [right]])
            ys = np.concatenate([[0.0], y, [y[-1] if len(y) else 0.0]])
            colour = colours[variant]
            ax.step(xs, ys, where="post", color=colour, lw=2, label=_short(variant))
            ref = infos.get(variant) if experiment not in GENERALISATION else None
            if ref and ref.reference and ref.reference.iterations_to_target:
                ax.axvline(ref.reference.iterations_to_target, color=colour, ls=":", lw=1.5)
        ax.set(xlim=(0, right), ylim=(-0.02, 1.02), xlabel="training iteration",
               ylabel="fraction of finished seeds converged")  # fmt: skip
        ax.legend(loc="upper left", fontsize=8, frameon=True)
        return to_uri(fig)


# ---------------------------------------------------------------------------------- curves
def learning_curves(
    evals: pd.DataFrame,
    colours: Mapping[str, Any],
    metric: str = "count_accuracy",
    target: float | None = None,
) -> str | None:
    """Per variant: one thin line per seed, the median over seeds and its IQR band."""
    data = evals.dropna(subset=["iteration", metric])
    if data.empty:
        return None
    variants = sorted(data["variant"].unique())
    with figure_style():
        fig, axes = _grid(len(variants))
        low = None
        if metric != "count_accuracy":  # early ELBOs are far below the rest: clip the view
            low = float(np.nanpercentile(data[metric], 5))
        for ax, variant in zip(axes, variants, strict=True):
            g = data[data["variant"] == variant]
            colour = colours[variant]
            for _, seed in g.groupby("seed"):
                seed = seed.sort_values("iteration")
                ax.plot(seed["iteration"], seed[metric], color=colour, lw=0.7, alpha=0.35)
            q = g.groupby("iteration")[metric].quantile([0.25, 0.5, 0.75]).unstack()
            ax.fill_between(q.index, q[0.25], q[0.75], color=colour, alpha=0.25, lw=0)
            ax.plot(q.index, q[0.5], color=colour, lw=2.2)
            if target is not None:
                ax.axhline(target, color="0.3", ls="--", lw=1)
            ax.set_title(_short(variant, 40), fontsize=10)
            ax.set_xlabel("iteration")
            ax.set_ylabel(metric.replace("_", " "))
            if metric == "count_accuracy":
                ax.set_ylim(-0.02, 1.02)
            elif low is not None:
                high = float(np.nanmax(data[metric]))
                ax.set_ylim(low, high + 0.05 * (high - low + 1e-9))
        return to_uri(fig)


# ---------------------------------------------------------------------------------- finals
def final_accuracy_figure(
    runs: pd.DataFrame,
    experiment: str,
    colours: Mapping[str, Any],
    infos: Mapping[str, VariantInfo],
    target: float | None,
) -> str | None:
    """Each seed's final (headline) accuracy; filled dots converged, hollow ones did not."""
    column = headline_column(experiment)
    data = runs[(runs["status"] == "complete")].dropna(subset=[column])
    if data.empty:
        return None
    variants = sorted(data["variant"].unique())
    with figure_style():
        fig = Figure(figsize=(max(5.0, 1.5 * len(variants) + 2), 4.0), layout="constrained")
        ax = fig.subplots()
        rng = np.random.default_rng(0)  # fixed jitter: the same results give the same picture
        for i, variant in enumerate(variants):
            g = data[data["variant"] == variant]
            x = i + rng.uniform(-0.18, 0.18, len(g))
            ok = (g["outcome"] == "converged").to_numpy()
            colour = colours[variant]
            values = g[column].to_numpy(dtype=float)
            # Generalisation: runs that do not count the training counts are crosses, left out
            # of the median (bench.report.measures, the headline rule).
            counted = qualifies(g).to_numpy() if experiment in GENERALISATION else ok | ~ok
            ax.scatter(x[ok & counted], values[ok & counted], color=colour, s=30, zorder=3)
            ax.scatter(x[~ok & counted], values[~ok & counted], facecolor="white",
                       edgecolor=colour, s=30, zorder=3)  # fmt: skip
            ax.scatter(x[~counted], values[~counted], marker="x", color="0.5", s=30, zorder=3)
            if counted.any():
                ax.hlines(np.median(values[counted]), i - 0.3, i + 0.3, color="black", lw=2,
                          zorder=4)  # fmt: skip
            published = _published_accuracy(infos.get(variant), experiment)
            if published is not None:
                ax.scatter([i + 0.36], [published], marker="<", color="black", s=50, zorder=4)
        if target is not None and experiment not in GENERALISATION:
            ax.axhline(target, color="0.3", ls="--", lw=1)
        ax.set_xticks(range(len(variants)), [_short(v) for v in variants], rotation=20,
                      ha="right")  # fmt: skip
        ax.set(ylabel=headline_label(experiment), ylim=(-0.02, 1.02))
        ax.set_xlim(-0.6, len(variants) - 0.4)
        return to_uri(fig)


def _published_accuracy(info: VariantInfo | None, experiment: str) -> float | None:
    ref = info.reference if info else None
    if ref is None:
        return None
    if experiment in GENERALISATION:
        return getattr(ref, f"{experiment}_accuracy", None)
    return ref.count_accuracy


# ---------------------------------------------------------------------------------- confusion
def confusion_figure(runs: pd.DataFrame) -> str | None:
    """Per variant, final confusion matrices summed over seeds, each row as fractions."""
    mats = {}
    for variant, g in runs.groupby("variant"):
        m = confusion_sum(g)
        if m is not None and m.sum() > 0:
            mats[variant] = m
    if not mats:
        return None
    with figure_style():
        fig, axes = _grid(len(mats), ncols=4, size=(3.2, 2.9))
        for ax, (variant, m) in zip(axes, sorted(mats.items()), strict=True):
            rows = m.sum(axis=1, keepdims=True)
            frac = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
            keep = rows.ravel() > 0  # only true counts that the test set has
            sns.heatmap(
                frac[keep], ax=ax, vmin=0, vmax=1, cmap="Blues", cbar=False, annot=True,
                fmt=".2f", annot_kws={"fontsize": 8}, square=True,
                yticklabels=np.arange(len(m))[keep], xticklabels=np.arange(len(m)),
            )  # fmt: skip
            ax.set(xlabel="inferred count", ylabel="true count")
            ax.set_title(_short(variant, 40), fontsize=10)
        return to_uri(fig)


# ---------------------------------------------------------------------------------- generalisation
def generalisation_figure(
    runs: pd.DataFrame, infos: Mapping[str, VariantInfo], colours: Mapping[str, Any]
) -> str | None:
    """AIR against DAIR on interpolation and extrapolation, with the paper's figures marked.

    One panel per test; each seed is a dot coloured by family, each variant's median a bar, and
    the paper's AIR and DAIR accuracies dashed lines in the family colours.
    """
    tests = [e for e in GENERALISATION if e in set(runs["experiment"])]
    if not tests:
        return None
    most = max(runs.loc[runs["experiment"].isin(tests), "variant"].nunique(), 1)
    with figure_style():
        fig, axes = _grid(len(tests), ncols=2, size=(max(4.0, 0.75 * most + 1.8), 4.2))
        rng = np.random.default_rng(0)
        for ax, experiment in zip(axes, tests, strict=True):
            column = headline_column(experiment)
            data = runs[(runs["experiment"] == experiment) & (runs["status"] == "complete")]
            variants = sorted(data["variant"].unique(), key=lambda v: (_family(infos, v), v))
            for i, variant in enumerate(variants):
                mine = data[data["variant"] == variant]
                counted = qualifies(mine).to_numpy()  # the headline rule: the others are crosses
                colour = FAMILY_COLOURS[_family(infos, variant)]
                every = mine[column].to_numpy(dtype=float)
                jitter = i + rng.uniform(-0.15, 0.15, len(every))
                ax.scatter(jitter[~counted], every[~counted], marker="x", color="0.5", s=24,
                           zorder=3)  # fmt: skip
                values = every[counted & np.isfinite(every)]
                ax.scatter(jitter[counted & np.isfinite(every)], values, color=colour,
                           s=28, alpha=0.8, zorder=3)  # fmt: skip
                if len(values):
                    ax.hlines(np.median(values), i - 0.3, i + 0.3, color="black", lw=2)
                else:  # say so, rather than leave a gap that reads as "0 %"
                    ax.text(i, 0.5, "no run counts\nits training counts", ha="center",
                            rotation=90, fontsize=8, color="0.4")  # fmt: skip
            for family, value in PAPER_GENERALISATION.get(experiment, {}).items():
                ax.axhline(value, color=FAMILY_COLOURS[family], ls="--", lw=1.5)
                ax.annotate(  # outside the axes, right of the line: never over the dots
                    f"paper {family}\n{value:.0%}", (1.0, value), xycoords=("axes fraction",
                    "data"), xytext=(4, 0), textcoords="offset points", ha="left",
                    va="center", fontsize=8, color=FAMILY_COLOURS[family],
                )  # fmt: skip
            labels = [f"{_short(v, 32)} ({_family(infos, v)})" for v in variants]
            ax.set_xticks(range(len(variants)), labels, fontsize=8, rotation=30, ha="right")
            ax.set_xlim(-0.6, max(len(variants), 1) - 0.4)
            ax.set(ylim=(-0.03, 1.05), ylabel=headline_label(experiment), title=experiment)
        return to_uri(fig)


def _family(infos: Mapping[str, VariantInfo], variant: str) -> str:
    info = infos.get(variant)
    if info is None or info.dair is None:
        return "?"
    return "DAIR" if info.dair else "AIR"


# ------------------------------------------------------------------ the pages' figures
# Each is one registered function (bench.report.registry): a new figure is one more here.
@figure(
    "ecdf",
    "Iterations to target (ECDF)",
    order=10,
    caption="Fraction of finished seeds that have converged by each iteration, per row; a "
    "converged run counts from the first evaluation at which it reached the target. Curves end "
    "at the convergence rate. Dotted vertical lines: published iterations to target (main "
    "experiments, rows that meet the budget rule).",
)
def _ecdf(ctx: FigureContext) -> str | None:
    return ecdf_figure(ctx.row_runs, ctx.colours, ctx.row_infos, ctx.experiment)


@figure(
    "curves_accuracy",
    "Learning curves: count accuracy",
    order=20,
    caption="Held-out count accuracy (sampled counts; runs of older code: the mode) at each "
    "periodic evaluation, on every test image: one thin line per seed, the median over seeds "
    "(thick) and its interquartile band, one panel per row. Dashed: the convergence target.",
)
def _curves_accuracy(ctx: FigureContext) -> str | None:
    return learning_curves(ctx.row_evals, ctx.colours, "count_accuracy", ctx.target)


@figure(
    "curves_elbo",
    "Learning curves: ELBO",
    order=30,
    caption="Held-out ELBO (nats per image, one sample) at each evaluation, as above; the view "
    "starts at the 5th percentile so early values do not flatten the rest.",
)
def _curves_elbo(ctx: FigureContext) -> str | None:
    return learning_curves(ctx.row_evals, ctx.colours, "elbo")


def _final_caption(ctx: FigureContext) -> str:
    return (
        "One dot per complete run (filled: converged; hollow: not converged), the median as a "
        "black bar, and the published figure as a black triangle (rows that meet the budget rule "
        "only; it was measured on the source's own test images, the dots on held-out ones). "
        "Sampled counts; runs of older code count by the mode."
        + (
            " Grey crosses: runs that do not count their training counts, left out of the "
            "median (the headline rule)."
            if ctx.is_generalisation
            else " Dashed: the convergence target."
        )
    )


@figure("final_accuracy", lambda ctx: f"Per-seed {headline_label(ctx.experiment)}", order=40,
        caption=_final_caption)  # fmt: skip
def _final_accuracy(ctx: FigureContext) -> str | None:
    return final_accuracy_figure(ctx.row_runs, ctx.experiment, ctx.colours, ctx.row_infos,
                                 ctx.target)  # fmt: skip


@figure(
    "confusion",
    "Count confusion matrices",
    order=50,
    caption="Final evaluation (sampled counts; runs of older code: the mode), summed over the "
    "complete runs of each row; each row of a matrix (true count) as fractions of its images. "
    "Mass right of the diagonal is over-counting, left of it under-counting.",
)
def _confusion(ctx: FigureContext) -> str | None:
    return confusion_figure(ctx.row_runs)


@figure(
    "generalisation",
    "Generalisation: AIR against DAIR",
    order=60,
    caption="Held-out-count accuracy of every seed in this experiment and its companion; blue "
    "AIR, orange DAIR (model.dair), black bars medians of the runs that count their training "
    "counts, grey crosses the runs that do not (left out), dashed lines the paper's figures "
    "(each experiment's `paper`, recorded at launch).",
    when=lambda ctx: ctx.is_generalisation,
)
def _generalisation(ctx: FigureContext) -> str | None:
    return ctx.generalisation


@figure(
    "representation",
    "Downstream accuracy against labelled images",
    order=70,
    caption="Experiment representation (paper 3.1.2): test accuracy of a small network on each "
    "row's frozen latents (one line per row: the mean over its runs, each run a dot, itself the "
    "mean over downstream seeds), and of a CNN on the pixels from the same labelled images "
    "(dashed, black); dotted: the paper's ~95 %; dash-dot: always answering the commonest "
    "class. Table: 'Downstream probes' on this page.",
    when=lambda ctx: representation.has_probes(ctx.row_runs),
)
def _representation(ctx: FigureContext) -> str | None:
    with figure_style():
        fig = representation.draw(ctx.row_runs, ctx.colours)
    return None if fig is None else to_uri(fig)
