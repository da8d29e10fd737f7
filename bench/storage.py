"""Atomic, crash-safe file writes and tolerant reads.

Every file a run leaves behind is written to a temporary file in the same folder and then
renamed over the target (`os.replace` is atomic on POSIX), so a killed process leaves either the
old file or the new one, never half of one.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    import torch  # here only: the report writes files with this module and imports no torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def json_line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, default=_json_default)


def read_json_lines(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; a torn last line (a killed writer) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                break  # torn write at the end: the run resumes from its checkpoint anyway
            raise ValueError(f"{path}: line {i + 1} is not valid JSON: {err}") from err
    return records


def write_json_lines(path: str | Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json_line(r) + "\n" for r in records))


def append_json_line(path: str | Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json_line(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
