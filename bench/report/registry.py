"""The registry of the experiment pages' figures: `@figure(name, title, order, caption)`.

A figure is one function `draw(ctx: FigureContext) -> str | None` (a PNG data URI, or None when
there is nothing to draw) registered with the decorator; `page_figures(ctx)` gives every
registered figure that applies to a page, in order. The figures themselves are registered in
bench.report.figures, which the report imports, so a new figure touches that one file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from bench.report.configs import VariantInfo
from bench.report.measures import GENERALISATION


@dataclass
class FigureContext:
    """What a page's figure functions may draw from: one experiment's rows, as plain data."""

    experiment: str
    row_runs: pd.DataFrame  # complete runs table, the row key in the "variant" column
    row_evals: pd.DataFrame  # evaluations, likewise
    colours: Mapping[str, Any]  # row key -> colour
    row_infos: Mapping[str, VariantInfo]  # row key -> its variant, with the row's reference
    target: float | None  # the convergence target of the runs, if known
    generalisation: str | None = None  # the AIR-vs-DAIR figure, drawn once for every page

    @property
    def is_generalisation(self) -> bool:
        return self.experiment in GENERALISATION


Text = str | Callable[[FigureContext], str]


@dataclass(frozen=True)
class FigureSpec:
    """A registered figure: `draw(ctx)` returns a PNG data URI (or None: nothing to draw)."""

    name: str
    title: Text
    caption: Text
    order: int
    draw: Callable[[FigureContext], str | None]
    when: Callable[[FigureContext], bool] | None = None  # None: on every experiment's page


REGISTRY: dict[str, FigureSpec] = {}


def figure(
    name: str,
    title: Text,
    order: int,
    caption: Text = "",
    when: Callable[[FigureContext], bool] | None = None,
) -> Callable[[Callable[[FigureContext], str | None]], Callable[[FigureContext], str | None]]:
    """Register a figure of the experiment pages (shown by ascending `order`). Adding a figure
    is one decorated function in this file: the pages list whatever is registered."""

    def register(draw: Callable[[FigureContext], str | None]) -> Callable:
        if name in REGISTRY:
            raise ValueError(f"figure {name!r} is registered twice")
        REGISTRY[name] = FigureSpec(name, title, caption, order, draw, when)
        return draw

    return register


def page_figures(ctx: FigureContext) -> list[dict[str, Any]]:
    """Every registered figure that applies to this page, as {name, title, caption, uri}."""
    out = []
    for spec in sorted(REGISTRY.values(), key=lambda s: (s.order, s.name)):
        if spec.when is not None and not spec.when(ctx):
            continue
        title = spec.title(ctx) if callable(spec.title) else spec.title
        caption = spec.caption(ctx) if callable(spec.caption) else spec.caption
        out.append({"name": spec.name, "title": title, "caption": caption, "uri": spec.draw(ctx)})
    return out
