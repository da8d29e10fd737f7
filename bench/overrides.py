"""Command-line `key=value` overrides, checked one by one against a schema before anything runs.

An unknown key or a value of the wrong type is reported once, about the word the user typed,
in one line: `command-line override 'train.batch_size=many': train.batch_size expects an
integer, got 'many'` (not OmegaConf's internals, and not once per experiment x variant pair).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
_PLURALS = {int: "integers", float: "numbers", bool: "true/false values", str: "strings"}


class OverrideError(ValueError):
    """One override that does not fit the schema; the message names the word and the key."""


def check_overrides(
    schema_cls: type, words: list[str], source: str, prefix: str = ""
) -> DictConfig:
    """Merge `words` (key=value) one by one over `schema_cls`'s defaults; OverrideError names
    the first that does not fit (unknown key, with the closest valid one; wrong type). Keys are
    shown with `prefix` (as typed: `profile.` for profile overrides)."""
    merged = OmegaConf.structured(schema_cls)
    for word in words:
        shown = f"{source} {prefix + word!r}"
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([word]))
        except ConfigKeyError as err:
            raise OverrideError(f"{shown}: {unknown_key(schema_cls, err, prefix)}") from err
        except Exception as err:  # omegaconf, and the YAML parser of the value, raise several
            raise OverrideError(f"{shown}: {wrong_value(schema_cls, word, prefix)}") from err
    return merged


def unknown_key(schema_cls: type, err: ConfigKeyError, prefix: str = "") -> str:
    key = err.full_key or ""
    guess = difflib.get_close_matches(key, all_keys(schema_cls), n=1)
    hint = f"; did you mean {prefix + guess[0]!r}?" if guess else ""
    return f"unknown key {prefix + key!r}{hint}"


def wrong_value(schema_cls: type, word: str, prefix: str = "") -> str:
    """'<key> expects <type>, got <value>' for an override whose value does not fit."""
    key, _, value = word.partition("=")
    key = key.strip()
    expected = field_type(schema_cls, key)
    if expected is None:
        return f"bad value {value!r} for {prefix}{key}"
    return f"{prefix}{key} expects {describe_type(expected)}, got {value!r}"


def field_type(schema_cls: type, key: str) -> Any:
    """The annotated type of a dotted key of a dataclass schema (None if it has none)."""
    node: Any = schema_cls
    for part in re.sub(r"\[\d+\]$", "", key).split("."):
        node = _strip_optional(node)
        if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
            return None
        hints = typing.get_type_hints(node)
        if part not in hints:
            return None
        node = hints[part]
    return node


def _strip_optional(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if _is_union(tp) and len(args) == 1:
        return args[0]
    return tp


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def describe_type(tp: Any) -> str:
    """'an integer', 'a number or null', 'a list of integers, e.g. [0,1,2]', ..."""
    if _is_union(tp):
        args = typing.get_args(tp)
        parts = [describe_type(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (item, *_) = typing.get_args(tp) or (Any,)
        return f"a list of {_PLURALS.get(item, 'values')}, e.g. [0,1,2]"
    if origin is dict or tp is dict:
        return "a mapping, e.g. {a: 1}"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return f"a group of settings (set its fields one by one: {tp.__name__})"
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def all_keys(schema_cls: type) -> list[str]:
    """Dotted names of every key of a dataclass schema, for suggestions."""
    return _keys(OmegaConf.structured(schema_cls))


def _keys(node: Any, prefix: str = "") -> list[str]:
    out = []
    if isinstance(node, DictConfig):
        for key in node:
            out.append(f"{prefix}{key}")
            try:
                child = node._get_node(key)
            except OmegaConfBaseException:
                continue
            out += _keys(child, f"{prefix}{key}.")
    return out
