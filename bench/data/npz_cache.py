"""The one format of generated data sets on disk: compressed npz arrays plus a JSON `meta` entry
holding what identifies the set and a sha256 of the arrays. Written atomically. `load_or_build`
is the one policy around it: read the cached file, else build the set and cache it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


def checksum(arrays: Mapping[str, np.ndarray], names: Sequence[str]) -> str:
    """sha256 over the arrays named in `names`, in that order (name, dtype, shape and bytes)."""
    h = hashlib.sha256()
    for name in names:
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.data)
    return h.hexdigest()


def write_arrays(
    path: Path, arrays: Mapping[str, np.ndarray], names: Sequence[str], meta: dict[str, Any]
) -> None:
    """Write `arrays` (those in `names`) and `meta` plus their checksum, atomically."""
    meta = {**meta, "sha256": checksum(arrays, names)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            # Compressed: canvases are mostly zero, so this is ~10x smaller and still fast.
            np.savez_compressed(f, meta=np.array(json.dumps(meta)), **{n: arrays[n] for n in names})
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache may be shared between users
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the whole new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_arrays(
    path: Path, names: Sequence[str], expected: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """The arrays of a file `write_arrays` wrote; ValueError if a `meta` entry differs from
    `expected` or the arrays do not match their stored checksum."""
    with np.load(path, allow_pickle=False) as npz:
        meta = json.loads(str(npz["meta"]))
        arrays = {name: npz[name] for name in names}
    wrong = [k for k, v in expected.items() if meta.get(k) != v]
    if wrong:
        raise ValueError(f"{', '.join(wrong)} in the file does not match")
    if checksum(arrays, names) != meta.get("sha256"):
        raise ValueError("sha256 of the arrays does not match the stored checksum")
    return arrays


def load_or_build(
    path: Path,
    read: Callable[[Path], T],
    build: Callable[[], T],
    write: Callable[[Path, T], None],
    logger: logging.Logger,
    what: str,
) -> T:
    """`read(path)` when that succeeds, else `build()`, saved with `write(path, built)`.

    Any error reading the file (missing arrays, a checksum or `meta` mismatch, a truncated or
    foreign file) is logged as a warning and the set rebuilt, never fatal; so is an OSError
    writing it (a read-only or full disk costs a rebuild next time, not a failed run). Errors
    from `build` propagate. Messages go to the caller's `logger`, naming the set as `what`.
    """
    if path.exists():
        try:
            found = read(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable cache is rebuilt, never fatal
            logger.warning("cache file %s is unreadable or corrupt (%s); rebuilding it", path, exc)
        else:
            logger.info("loaded %s from cache %s", what, path)
            return found
    logger.info("generating %s ...", what)
    start = time.perf_counter()
    built = build()
    logger.info("generated %s in %.1f s", what, time.perf_counter() - start)
    try:
        write(path, built)
    except OSError as exc:
        logger.warning("could not write cache file %s: %s", path, exc)
    else:
        logger.info("saved %s to cache %s", what, path)
    return built
