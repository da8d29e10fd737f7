"""Tests for bench.data.multi_mnist: the spec, the generator and the disk cache."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest

from bench.data import multi_mnist
from bench.data.multi_mnist import MultiMnist, MultiMnistSpec, generate, load_or_generate

LOGGER = "bench.data.multi_mnist"


def _ink_box(digit: np.ndarray) -> tuple[int, int, int, int]:
    """Tight (x0, y0, x1, y1) box, exclusive ends, of a 2-D array's nonzero pixels."""
    ys, xs = np.nonzero(digit)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _check_consistent(data: MultiMnist, mnist_labels: np.ndarray) -> None:
    """Invariants every generated data set must satisfy."""
    spec = data.spec
    n, c, maxc = spec.n_images, spec.canvas, spec.max_count
    assert data.images.shape == (n, c, c) and data.images.dtype == np.uint8
    assert data.counts.shape == (n,) and data.counts.dtype == np.int64
    assert data.boxes.shape == (n, maxc, 4) and data.boxes.dtype == np.float32
    assert data.labels.shape == (n, maxc) and data.labels.dtype == np.int64
    assert data.source_index.shape == (n, maxc) and data.source_index.dtype == np.int64
    assert set(np.unique(data.counts)) <= set(spec.counts)

    active = np.arange(maxc)[None, :] < data.counts[:, None]
    assert np.isnan(data.boxes[~active]).all()
    assert (data.labels[~active] == -1).all() and (data.source_index[~active] == -1).all()
    assert not np.isnan(data.boxes[active]).any()
    src = data.source_index[active]
    assert ((src >= 0) & (src < len(mnist_labels))).all()
    np.testing.assert_array_equal(data.labels[active], mnist_labels[src])

    boxes = data.boxes
    x0, y0, x1, y1 = (boxes[..., i] for i in range(4))
    valid = active
    assert (x0[valid] >= 0).all() and (y0[valid] >= 0).all()
    assert (x1[valid] <= c).all() and (y1[valid] <= c).all()
    assert (x0[valid] < x1[valid]).all() and (y0[valid] < y1[valid]).all()
    assert (boxes[valid] == np.round(boxes[valid])).all()  # whole pixels

    for i in range(n):
        covered = np.zeros((c, c), dtype=bool)
        for k in range(data.counts[i]):
            bx0, by0, bx1, by1 = boxes[i, k].astype(int)
            for j in range(k):
                ox0, oy0, ox1, oy1 = boxes[i, j].astype(int)
                overlap = bx0 < ox1 and ox0 < bx1 and by0 < oy1 and oy0 < by1
                assert not overlap, f"image {i}: boxes {k} and {j} intersect"
            covered[by0:by1, bx0:bx1] = True
            # Tight: the box is exactly the extent of the ink inside it.
            assert _ink_box(data.images[i, by0:by1, bx0:bx1]) == (0, 0, bx1 - bx0, by1 - by0)
        # Ink matches the boxes: nothing outside them.
        assert not data.images[i][~covered].any(), f"image {i} has ink outside its boxes"
    assert not data.images[data.counts == 0].any()


# --- spec ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_images": 0}, "n_images"),
        ({"n_images": 2.5}, "n_images"),
        ({"split": "val"}, "split"),
        ({"counts": ()}, "counts must not be empty"),
        ({"counts": (1, 6)}, "between 0 and 5"),
        ({"counts": (-1,)}, "between 0 and 5"),
        ({"counts": (1, 1)}, "repeat"),
        ({"counts": "12"}, "counts"),
        ({"seed": -1}, "seed"),
        ({"canvas": 20}, "canvas"),
        ({"scale_mean": 0.0}, "scale_mean"),
        ({"scale_sd": -0.1}, "scale_sd"),
        ({"scale_mean": 0.5}, "larger than the canvas"),
    ],
)
def test_spec_validation(kwargs: dict, match: str) -> None:
    args = {"n_images": 10, "split": "train", **kwargs}
    with pytest.raises(ValueError, match=match):
        MultiMnistSpec(**args)


def test_spec_key_stable_and_sensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    base = MultiMnistSpec(100, "train")
    assert base.key() == MultiMnistSpec(100, "train", counts=[0, 1, 2]).key()
    assert len(base.key()) == 16
    changes = [
        {"n_images": 101},
        {"split": "test"},
        {"counts": (0, 1)},
        {"seed": 1},
        {"canvas": 60},
        {"rescale": False},
        {"scale_mean": 1.4},
        {"scale_sd": 0.2},
    ]
    keys = {MultiMnistSpec(**{**base.to_dict(), **c}).key() for c in changes}
    assert len(keys) == len(changes) and base.key() not in keys
    old = base.key()
    monkeypatch.setattr(multi_mnist, "GENERATOR_VERSION", multi_mnist.GENERATOR_VERSION + 1)
    assert base.key() != old


# --- generator -------------------------------------------------------------------------------


def test_counts_equally_frequent(mnist_train: tuple[np.ndarray, np.ndarray]) -> None:
    data = generate(MultiMnistSpec(3000, "train"), *mnist_train)
    freq = np.bincount(data.counts, minlength=3)
    assert freq.sum() == 3000 and freq.size == 3
    # Expected 1000 each, sd ~26: a 4.6-sd band.
    assert (np.abs(freq - 1000) < 120).all(), freq
    _check_consistent(data, mnist_train[1])
    assert len(data) == 3000


@pytest.mark.parametrize("counts", [(0, 1, 3), (3,), (5,), (0,), (2,)])
def test_other_counts(mnist_test: tuple[np.ndarray, np.ndarray], counts: tuple[int, ...]) -> None:
    data = generate(MultiMnistSpec(200, "test", counts=counts, seed=5), *mnist_test)
    assert set(np.unique(data.counts)) == set(counts)
    assert data.boxes.shape[1] == max(counts)
    _check_consistent(data, mnist_test[1])


def test_not_rescaled(mnist_test: tuple[np.ndarray, np.ndarray]) -> None:
    data = generate(MultiMnistSpec(200, "test", rescale=False, counts=(1, 2)), *mnist_test)
    _check_consistent(data, mnist_test[1])


def test_float_images(mnist_test: tuple[np.ndarray, np.ndarray]) -> None:
    data = generate(MultiMnistSpec(50, "test"), *mnist_test)
    f = data.float_images()
    assert f.dtype == np.float32 and f.shape == data.images.shape
    assert f.min() >= 0.0 and f.max() <= 1.0
    np.testing.assert_allclose(f * 255, data.images, atol=1e-3)


def test_deterministic(mnist_test: tuple[np.ndarray, np.ndarray]) -> None:
    spec = MultiMnistSpec(300, "test", counts=(0, 1, 2, 3), seed=7)
    a, b = generate(spec, *mnist_test), generate(spec, *mnist_test)
    for name in ("images", "counts", "boxes", "labels", "source_index"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    c = generate(MultiMnistSpec(300, "test", counts=(0, 1, 2, 3), seed=8), *mnist_test)
    assert not np.array_equal(a.images, c.images)
    assert not np.array_equal(a.source_index, c.source_index)


@pytest.mark.parametrize("split", ["train", "test"])
def test_digits_come_from_their_split(
    split: str,
    mnist_train: tuple[np.ndarray, np.ndarray],
    mnist_test: tuple[np.ndarray, np.ndarray],
) -> None:
    """No train/test leakage: each rendered digit is pixel-identical to its source digit."""
    images, labels = mnist_train if split == "train" else mnist_test
    data = generate(
        MultiMnistSpec(300, split, counts=(1, 2), rescale=False, seed=11), images, labels
    )
    _check_consistent(data, labels)
    for i in range(len(data)):
        for k in range(data.counts[i]):
            x0, y0, x1, y1 = data.boxes[i, k].astype(int)
            digit = images[data.source_index[i, k]]
            sx0, sy0, sx1, sy1 = _ink_box(digit)
            np.testing.assert_array_equal(data.images[i, y0:y1, x0:x1], digit[sy0:sy1, sx0:sx1])


@pytest.mark.parametrize("scale_mean", [1.3, 1.6])
def test_rescaled_size(mnist_test: tuple[np.ndarray, np.ndarray], scale_mean: float) -> None:
    images, labels = mnist_test
    data = generate(MultiMnistSpec(1000, "test", counts=(1,), scale_mean=scale_mean), *mnist_test)
    height = data.boxes[:, 0, 3] - data.boxes[:, 0, 1]
    source_height = np.array(
        [_ink_box(images[s])[3] - _ink_box(images[s])[1] for s in data.source_index[:, 0]]
    )
    # Bilinear resampling bleeds about one pixel of faint ink, hence the -1.
    ratio = np.mean((height - 1) / source_height)
    assert ratio == pytest.approx(1 / scale_mean, rel=0.04)


def test_impossible_spec_fails_cleanly(mnist_test: tuple[np.ndarray, np.ndarray]) -> None:
    spec = MultiMnistSpec(3, "test", counts=(4,), canvas=28, rescale=False)
    with pytest.raises(RuntimeError, match="could not place"):
        generate(spec, *mnist_test)


def test_generate_checks_inputs() -> None:
    spec = MultiMnistSpec(3, "test")
    with pytest.raises(ValueError, match="28, 28"):
        generate(spec, np.zeros((4, 20, 20), np.uint8), np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="mnist_labels"):
        generate(spec, np.zeros((4, 28, 28), np.uint8), np.zeros(3, np.int64))


# --- cache -----------------------------------------------------------------------------------


def _messages(caplog: pytest.LogCaptureFixture) -> str:
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == LOGGER)
    caplog.clear()
    return text


def _assert_same(a: MultiMnist, b: MultiMnist) -> None:
    assert a.spec == b.spec
    for name in ("images", "counts", "boxes", "labels", "source_index"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_cache_roundtrip_and_spec_change(
    mnist_test: tuple[np.ndarray, np.ndarray], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    spec = MultiMnistSpec(300, "test")
    first = load_or_generate(spec, cache_dir=tmp_path)
    assert "generating 300 multi-MNIST images (test, counts (0, 1, 2))" in _messages(caplog)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1 and spec.key() in files[0].name
    assert not list(tmp_path.glob("*.part"))  # temp file renamed away

    second = load_or_generate(spec, cache_dir=tmp_path)
    loaded = "loaded 300 multi-MNIST images (test, counts (0, 1, 2)) from cache"
    assert f"{loaded} {files[0]}" in _messages(caplog)
    _assert_same(first, second)
    _assert_same(first, generate(spec, *mnist_test))

    changed = MultiMnistSpec(300, "test", seed=1)
    third = load_or_generate(changed, cache_dir=tmp_path)
    assert "generating" in _messages(caplog)
    assert len(list(tmp_path.glob("*.npz"))) == 2
    assert not np.array_equal(third.images, first.images)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_corrupt_cache_is_rebuilt(
    mnist_test: tuple[np.ndarray, np.ndarray],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    spec = MultiMnistSpec(200, "test", seed=3)
    original = load_or_generate(spec, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.npz")
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":
        for pos in range(len(raw) // 3, len(raw) // 3 + 64):
            raw[pos] ^= 0xFF
    else:
        raw = bytearray(b"not a cache file")
    path.write_bytes(bytes(raw))

    caplog.set_level(logging.INFO, logger=LOGGER)
    rebuilt = load_or_generate(spec, cache_dir=tmp_path)
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()
    assert "generating" in _messages(caplog)
    _assert_same(original, rebuilt)
    # The rebuilt file is valid again.
    load_or_generate(spec, cache_dir=tmp_path)
    assert f"loaded 200 multi-MNIST images (test, counts (0, 1, 2)) from cache {path}" in (
        _messages(caplog)
    )


def test_cache_checksum_catches_silent_changes(
    mnist_test: tuple[np.ndarray, np.ndarray], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A well-formed file whose arrays no longer match the stored checksum is rebuilt."""
    spec = MultiMnistSpec(100, "test", seed=4)
    original = load_or_generate(spec, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.npz")
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays["labels"] = arrays["labels"].copy()
    arrays["labels"][0, 0] = (arrays["labels"][0, 0] + 1) % 10
    np.savez_compressed(path, **arrays)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    rebuilt = load_or_generate(spec, cache_dir=tmp_path)
    assert "sha256" in caplog.text and str(path) in caplog.text
    _assert_same(original, rebuilt)


def test_default_cache_dir(
    mnist_test: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("AIR_CACHE_DIR", raising=False)
    root = Path(__file__).resolve().parents[1]
    assert multi_mnist.default_cache_dir() == root / ".cache" / "multi_mnist"
    monkeypatch.setenv("AIR_CACHE_DIR", str(tmp_path))
    assert multi_mnist.default_cache_dir() == tmp_path
    load_or_generate(MultiMnistSpec(20, "test", counts=(1,)))
    assert len(list(tmp_path.glob("multi_mnist-test-20-*.npz"))) == 1


def test_default_test_set_is_pinned(mnist_test: tuple[np.ndarray, np.ndarray]) -> None:
    """The headline test set (protocol heldout: DataConfig's defaults) never changes silently.

    The digest was taken from the generator at commit 66d4080, before the test protocols were
    added; a change of GENERATOR_VERSION for new arrays must leave these five as they are.
    """
    data = generate(MultiMnistSpec(10000, "test", counts=(0, 1, 2), seed=0), *mnist_test)
    h = hashlib.sha256()
    for name in ("images", "counts", "boxes", "labels", "source_index"):
        a = np.ascontiguousarray(getattr(data, name))
        h.update(name.encode() + a.dtype.str.encode() + str(a.shape).encode() + a.tobytes())
    assert h.hexdigest() == "30eb4bc6f67bc970bf2323618f95a2c1618d245847f1e2f46b7856b774ad5d78"
