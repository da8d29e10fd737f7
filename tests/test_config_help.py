"""`run_all.py --config-help [PREFIX]`: every run-config field with type, default and doc."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from bench.config import RunConfig, to_dict
from bench.config_help import config_help, schema_fields
from bench.report.configs import flatten

ROOT = Path(__file__).resolve().parent.parent


def test_every_schema_field_listed_with_its_default() -> None:
    fields = {f.key: f for f in schema_fields()}
    defaults = flatten(to_dict(RunConfig()))
    # every leaf of the resolved default config is listed (empty dicts flatten to nothing)
    assert set(defaults) <= set(fields)
    for key, value in defaults.items():
        assert fields[key].default == value, key
    assert "model.max_steps" in fields and "train.lr" in fields  # ModelConfig is included


def test_docs_come_from_the_source_comments() -> None:
    fields = {f.key: f for f in schema_fields()}
    assert fields["train.lr"].doc.startswith("Adam learning rate of the model")
    assert fields["train.lr"].type == "float" and fields["train.lr"].default == 1e-4
    assert "at most this many objects per image" in fields["model.max_steps"].doc
    # a field documented by the comment block above it, not on its own line
    assert "registered in bench/data/registry.py" in fields["data.name"].doc
    undocumented = [k for k, f in fields.items() if not f.doc]
    assert len(undocumented) < len(fields) // 4, undocumented


def test_prefix_filters_and_unknown_prefix_suggests() -> None:
    text = config_help("model.")
    keys = [line.split(":")[0] for line in text.splitlines() if not line.startswith(" ")]
    assert keys and all(k.startswith("model.") for k in keys)
    assert config_help("train.lr").splitlines()[0] == "train.lr: float = 0.0001"
    with pytest.raises(ValueError, match="did you mean 'model."):
        config_help("modle.")


@pytest.mark.parametrize(("words", "rc", "want"), [
    (["--config-help", "train.lr"], 0, "train.lr: float = 0.0001"),
    (["--config-help"], 0, "model.canvas: int = 50"),
    (["--config-help", "trian."], 2, "did you mean 'train.'"),
])  # fmt: skip
def test_command_line(words: list[str], rc: int, want: str) -> None:
    out = subprocess.run([sys.executable, "run_all.py", *words], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == rc, out.stderr
    assert want in out.stdout + out.stderr


def test_nested_dataclasses_are_walked() -> None:
    """Every top-level field is listed, a nested dataclass as its leaves only."""
    listed = {f.key.split(".")[0] for f in schema_fields()}
    assert listed == {f.name for f in dataclasses.fields(RunConfig)}
    assert not any(f.key == "model" for f in schema_fields())
