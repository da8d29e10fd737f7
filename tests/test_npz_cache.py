"""The generated-set cache: the file format and the one load-or-build policy around it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from bench.data.npz_cache import load_or_build, read_arrays, write_arrays

LOGGER = "tests.npz_cache_caller"  # the caller's logger, not the helper's module
NAMES = ("a", "b")
META = {"key": "k1"}


class _Calls:
    """build / read / write callbacks over one small pair of arrays, counting the builds."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.arrays = {"a": rng.integers(0, 255, (3, 4), dtype=np.uint8), "b": rng.random(5)}
        self.builds = 0

    def build(self) -> dict[str, np.ndarray]:
        self.builds += 1
        return {k: v.copy() for k, v in self.arrays.items()}

    def read(self, path: Path) -> dict[str, np.ndarray]:
        return read_arrays(path, NAMES, META)

    def write(self, path: Path, arrays: dict[str, np.ndarray]) -> None:
        write_arrays(path, arrays, NAMES, META)

    def load(self, path: Path) -> dict[str, np.ndarray]:
        return load_or_build(
            path, self.read, self.build, self.write, logging.getLogger(LOGGER), "the test set"
        )


def _messages(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    out = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= level]
    caplog.clear()
    return out


def _assert_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_builds_once_then_loads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    calls, path = _Calls(), tmp_path / "sub" / "set.npz"
    first = calls.load(path)
    msgs = _messages(caplog)
    assert msgs[0] == "generating the test set ..." and msgs[1].startswith("generated the test set")
    assert msgs[2] == f"saved the test set to cache {path}" and calls.builds == 1
    second = calls.load(path)
    assert _messages(caplog) == [f"loaded the test set from cache {path}"] and calls.builds == 1
    _assert_equal(first, second)
    _assert_equal(second, calls.arrays)


@pytest.mark.parametrize("damage", ["garbage", "other_meta", "changed_array"])
def test_bad_file_is_rebuilt_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    calls, path = _Calls(), tmp_path / "set.npz"
    calls.load(path)
    if damage == "garbage":
        path.write_bytes(b"not a cache file")
    elif damage == "other_meta":
        write_arrays(path, calls.arrays, NAMES, {"key": "k2"})
    else:  # well formed, but the arrays no longer match their stored checksum
        with np.load(path) as npz:
            arrays = dict(npz)
        arrays["b"] = arrays["b"] + 1
        np.savez_compressed(path, **arrays)
    caplog.set_level(logging.INFO, logger=LOGGER)
    rebuilt = calls.load(path)
    (warning,) = _messages(caplog, logging.WARNING)
    assert warning.startswith(f"cache file {path} is unreadable or corrupt (")
    assert warning.endswith("); rebuilding it") and calls.builds == 2
    _assert_equal(rebuilt, calls.arrays)
    calls.load(path)  # the rebuilt file is valid again
    assert _messages(caplog) == [f"loaded the test set from cache {path}"] and calls.builds == 2


def test_unwritable_cache_costs_a_rebuild_not_the_set(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    calls = _Calls()
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    path = blocker / "set.npz"
    caplog.set_level(logging.INFO, logger=LOGGER)
    _assert_equal(calls.load(path), calls.arrays)
    (warning,) = _messages(caplog, logging.WARNING)
    assert warning.startswith(f"could not write cache file {path}: ")
    calls.load(path)
    assert calls.builds == 2


def test_build_errors_propagate_and_write_nothing(tmp_path: Path) -> None:
    def failing() -> dict[str, np.ndarray]:
        raise RuntimeError("MNIST missing")

    calls, path = _Calls(), tmp_path / "set.npz"
    with pytest.raises(RuntimeError, match="MNIST missing"):
        load_or_build(path, calls.read, failing, calls.write, logging.getLogger(LOGGER), "x")
    assert list(tmp_path.iterdir()) == []
