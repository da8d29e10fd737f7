"""`run_all.py --config-help [PREFIX]`: every run-config field with its type, default and doc.

The fields are those of the typed schema (bench.config.RunConfig and its nested dataclasses,
ModelConfig from implementations/core/model_config.py included). The documentation stays where it is
written, once: the `# comment` on a field's line(s) in the source, or, when the line has none,
the comment lines just above it. This module reads it with `inspect` + `tokenize`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FieldHelp:
    """One run-config field as --config-help prints it."""

    key: str  # dotted, e.g. "train.lr"
    type: str
    default: Any
    doc: str


def _comments(cls: type) -> dict[str, str]:
    """field name -> its documentation comment, from the class source."""
    try:
        source, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    text = textwrap.dedent("".join(source))
    by_line: dict[int, list[str]] = {}  # 1-based line in `source` -> comment texts
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            by_line.setdefault(tok.start[0], []).append(tok.string.lstrip("#").strip())
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    tree = ast.parse(text)
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    out: dict[str, str] = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        lines = range(node.lineno, (node.end_lineno or node.lineno) + 1)
        own = [c for n in lines for c in by_line.get(n, [])]
        if not own:  # the comment block right above the field
            above, n = [], node.lineno - 1
            while n in by_line and n not in code_lines:
                above.insert(0, " ".join(by_line[n]))
                n -= 1
            own = above
        out[node.target.id] = " ".join(own)
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def schema_fields(cls: type | None = None, prefix: str = "") -> list[FieldHelp]:
    """Every leaf field of the run-config schema (RunConfig by default), in source order."""
    if cls is None:
        from bench.config import RunConfig

        cls = RunConfig
    hints = typing.get_type_hints(cls)
    docs = _comments(cls)
    out: list[FieldHelp] = []
    for f in dataclasses.fields(cls):
        hint = hints.get(f.name)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            out += schema_fields(hint, f"{prefix}{f.name}.")
            continue
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        out.append(FieldHelp(f"{prefix}{f.name}", kind, _default(f), docs.get(f.name, "")))
    return out


def select(fields: list[FieldHelp], prefix: str) -> list[FieldHelp]:
    """The fields whose key starts with `prefix`; ValueError with the closest key if none."""
    chosen = [f for f in fields if f.key.startswith(prefix)]
    if chosen:
        return chosen
    keys = [f.key for f in fields]
    sections = sorted({k.split(".")[0] + "." for k in keys if "." in k})
    close = difflib.get_close_matches(prefix, keys + sections, n=1, cutoff=0.0)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"--config-help: no run-config field starts with {prefix!r}{hint}")


def render(fields: list[FieldHelp]) -> str:
    """The fields as text: `key: type = default`, the documentation indented below."""
    lines = []
    for f in fields:
        default = "(required)" if f.default is dataclasses.MISSING else repr(f.default)
        lines.append(f"{f.key}: {f.type} = {default}")
        if f.doc:
            lines.append(f"    {f.doc}")
    return "\n".join(lines)


def config_help(prefix: str = "") -> str:
    """The --config-help text for `prefix` ("" : every field); ValueError if none matches."""
    return render(select(schema_fields(), prefix))
