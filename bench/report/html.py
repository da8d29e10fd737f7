"""Rendering: jinja2 templates with autoescaping, number formatting, atomic page writes.

Autoescaping is on for every template, so any text that comes from a config, a folder name or a
traceback is HTML-escaped where it is printed; nothing is marked safe except the base64 figure
URIs, which are generated here. The pages also carry a Content-Security-Policy that allows no
script and no network at all: a page is a document, and a variant named `<script>` stays text.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import jinja2

from bench.storage import atomic_write_text

TEMPLATES = Path(__file__).resolve().parent / "templates"
CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'none'; "
    "connect-src 'none'; font-src 'none'; form-action 'none'; base-uri 'none'"
)


def _missing(x: Any) -> bool:
    if x is None:
        return True
    try:
        return math.isnan(float(x))
    except (TypeError, ValueError):
        return False


def num(x: Any, digits: int = 3) -> str:
    """A number with fixed decimals (thousands separators when digits == 0); a dash if absent."""
    if _missing(x):
        return "\u2013"
    return f"{float(x):,.{digits}f}"


def signed(x: Any, digits: int = 3) -> str:
    """A difference with its sign always shown: +0.012, -1.5."""
    if _missing(x):
        return "\u2013"
    return f"{float(x):+,.{digits}f}"


def interval(lo: Any, hi: Any, digits: int = 2) -> str:
    """ "[lo, hi]"; a dash if absent."""
    if _missing(lo) or _missing(hi):
        return "\u2013"
    return f"[{num(lo, digits)}, {num(hi, digits)}]"


def pvalue(p: Any) -> str:
    if _missing(p):
        return "\u2013"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def duration(seconds: Any) -> str:
    """Seconds as "45 s", "12 min" or "3 h 05 min"."""
    if _missing(seconds):
        return "\u2013"
    s = float(seconds)
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def show(value: Any) -> str:
    """A config value as YAML-ish text (None -> null, lists kept)."""
    if value is None:
        return "null"  # an explicit null; a key that is not there at all prints "(not set)"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def page_name(experiment: str) -> str:
    """A file name for an experiment's page that is safe whatever the folder is called."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment).strip("._") or "experiment"
    if slug != experiment or slug == "index":  # keep distinct names distinct after cleaning
        import hashlib

        slug += "-" + hashlib.sha256(experiment.encode()).hexdigest()[:8]
    return f"{slug}.html"


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,  # every template, whatever its file name
        undefined=jinja2.StrictUndefined,  # a typo in a template fails the tests, not silently
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        num=num, signed=signed, pvalue=pvalue, duration=duration, show=show, interval=interval
    )
    env.globals.update(csp=CSP, page_name=page_name)
    return env


def render(template: str, path: Path, **context: Any) -> Path:
    """Render `template` with `context` and write it atomically to `path`."""
    html = environment().get_template(template).render(**context)
    atomic_write_text(path, html)
    path.chmod(0o644)  # the atomic writer's temporary file is private; a report is for readers
    return path
