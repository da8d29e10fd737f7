"""Tests for bench.data.protocols and bench.data.reference_sets: the references' test images.

The reference sets are checked against what the references published: Pyro's pixel checksums
(2017 script: 884438093; 2019 script with Pillow < 7: 883114919), the first 32 test images of
addtt's README figure, and the test images of aakhundov's README figure.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest

from bench.config import ConfigError, DataConfig, config_hash, load_config
from bench.data import protocols
from bench.data.multi_mnist import MultiMnistSpec, generate
from bench.data.protocols import (
    PROTOCOLS,
    REFERENCE_PROTOCOLS,
    ReferenceSet,
    load_reference_set,
    reference_test_set,
)
from bench.data.reference_sets import aakhundov_set, pyro_set

Image = pytest.importorskip("PIL.Image")

LOGGER = "bench.data.protocols"
pytestmark = pytest.mark.slow  # the reference sets take ~25 s to generate, once per session


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("protocol_cache")


@pytest.fixture(scope="module")
def sets(mnist_train: tuple[np.ndarray, np.ndarray], cache: Path) -> dict[str, ReferenceSet]:
    """Every reference protocol's test set, generated once (which checks the checksums)."""
    return {p: load_reference_set(p, cache_dir=cache) for p in REFERENCE_PROTOCOLS}


def _active(data) -> np.ndarray:
    return np.arange(data.boxes.shape[1])[None, :] < data.counts[:, None]


# --- registry and API ------------------------------------------------------------------------


def test_registry() -> None:
    assert list(PROTOCOLS) == ["heldout", "pyro", "addtt", "aakhundov"]
    assert REFERENCE_PROTOCOLS == ("pyro", "addtt", "aakhundov")
    assert PROTOCOLS["heldout"].mnist_split == "test"
    assert {PROTOCOLS[p].mnist_split for p in REFERENCE_PROTOCOLS} == {"train"}
    assert [PROTOCOLS[p].size for p in REFERENCE_PROTOCOLS] == [60000, 10000, 1000]
    keys = {protocols._key(PROTOCOLS[p]) for p in REFERENCE_PROTOCOLS}
    assert len(keys) == 3


@pytest.mark.parametrize(
    ("protocol", "kwargs", "match"),
    [
        ("hold", {}, "unknown test protocol 'hold'"),
        ("addtt", {"n": 0}, "n must be a positive int"),
        ("addtt", {"n": 2.5}, "n must be a positive int"),
        ("addtt", {"canvas": 60}, "50x50"),
    ],
)
def test_api_rejects_bad_input(protocol: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        reference_test_set(DataConfig(), protocol, **kwargs)


def test_reference_protocol_needs_its_counts() -> None:
    data = DataConfig(test_counts=[0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"0-2 digits.*test_counts=\[0, 1, 2, 3\]"):
        reference_test_set(data, "aakhundov")
    with pytest.raises(ValueError, match="not a reference protocol"):
        load_reference_set("heldout")


def test_config_field() -> None:
    default = load_config()
    assert default.data.reference_protocols == []
    chosen = load_config(overrides=["data.reference_protocols=[addtt,pyro]"])
    assert chosen.data.reference_protocols == ["addtt", "pyro"]
    assert config_hash(chosen) != config_hash(default)
    for bad in ("[heldout]", "[addtt,addtt]", "[adtt]"):
        with pytest.raises(ConfigError, match="data.reference_protocols"):
            load_config(overrides=[f"data.reference_protocols={bad}"])


# --- heldout: today's test set, unchanged ----------------------------------------------------


def test_heldout_is_the_runs_own_test_set(tmp_path: Path, mnist_test: tuple) -> None:
    test_split = mnist_test
    data = DataConfig(n_test=600, seed=3)
    got = reference_test_set(data, "heldout", cache_dir=tmp_path)
    want = generate(MultiMnistSpec(600, "test", seed=3), *test_split)
    assert got.spec == want.spec
    for name in ("images", "counts", "boxes", "labels", "source_index"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    head = reference_test_set(data, "heldout", n=100, cache_dir=tmp_path)
    assert len(head) == 100 and head.spec == want.spec
    np.testing.assert_array_equal(head.images, want.images[:100])
    np.testing.assert_array_equal(head.boxes, want.boxes[:100])
    # Other counts are fine for the run's own set.
    four = reference_test_set(DataConfig(n_test=50, test_counts=[3]), "heldout", cache_dir=tmp_path)
    assert (four.counts == 3).all()


# --- Pyro and addtt --------------------------------------------------------------------------


def test_generation_checks_the_published_checksum(
    mnist_train: tuple[np.ndarray, np.ndarray],
) -> None:
    params = (("seed", 0), ("images_per_count", 300), ("test_size", 100))
    proto = dataclasses.replace(PROTOCOLS["aakhundov"], params=params, size=100)
    small = protocols._generate(proto, *mnist_train)
    total = int(small.images.sum())
    assert len(small) == 100 and total > 0
    # The check compares the whole generated set's pixel sum with the published one.
    assert len(protocols._generate(dataclasses.replace(proto, checksum=total), *mnist_train)) == 100
    with pytest.raises(RuntimeError, match=f"pixel sum is {total}, .* publishes {total + 1}"):
        protocols._generate(dataclasses.replace(proto, checksum=total + 1), *mnist_train)


def test_pyro_sets_are_the_references(sets: dict[str, ReferenceSet]) -> None:
    """Generated without error, so both full sets matched their published checksums."""
    pyro, addtt = sets["pyro"], sets["addtt"]
    assert len(pyro) == 60000 and len(addtt) == 10000
    np.testing.assert_array_equal(pyro.set_index, np.arange(60000))
    np.testing.assert_array_equal(addtt.set_index, np.arange(50000, 60000))
    # Same seed, different resize: the streams part ways once a resize changes a rejection.
    assert not np.array_equal(pyro.images[50000:50100], addtt.images[:100])


def test_addtt_matches_its_readme_figure(sets: dict[str, ReferenceSet]) -> None:
    """addtt's README shows its first 32 test images (test loader unshuffled), 4 per row."""
    figure = [
        [], [8], [8], [1, 2], [], [1, 5], [], [6, 7],
        [], [6], [2, 4], [4, 5], [4, 6], [6, 8], [3], [0, 1],
        [], [1, 8], [8, 9], [0, 7], [], [0], [], [],
        [1], [1], [], [], [5], [0], [], [],
    ]  # fmt: skip
    addtt = sets["addtt"]
    got = [sorted(addtt.labels[i, : addtt.counts[i]].tolist()) for i in range(32)]
    assert got == figure


@pytest.mark.parametrize(("protocol", "resample"), [("pyro", "BILINEAR"), ("addtt", "NEAREST")])
def test_pyro_canvases_follow_the_rules(
    sets: dict[str, ReferenceSet],
    mnist_train: tuple[np.ndarray, np.ndarray],
    protocol: str,
    resample: str,
) -> None:
    images, labels = mnist_train
    data = sets[protocol]
    active = _active(data)
    assert set(np.unique(data.counts)) == {0, 1, 2}
    assert (np.abs(np.bincount(data.counts) / len(data) - 1 / 3) < 0.03).all()
    src = data.source_index[active]
    assert ((src >= 0) & (src < 60000)).all()
    np.testing.assert_array_equal(data.labels[active], labels[src])  # training-split digits
    assert (data.source_index[~active] == -1).all() and np.isnan(data.boxes[~active]).all()

    frame = data.frame_boxes[active]
    side = frame[:, 2] - frame[:, 0]
    np.testing.assert_array_equal(side, frame[:, 3] - frame[:, 1])  # square w x w frames
    assert (frame[:, :2] >= 0).all() and (frame[:, 2:] <= 49).all()  # offset < 50 - w
    # w = int(28 / s) with s ~ N(1.3, 0.1^2): within 5 sd, and the mean scale 1.3.
    assert side.min() >= int(28 / 1.8) and side.max() <= int(28 / 0.8)
    assert np.mean(28 / (side + 0.5)) == pytest.approx(1.3, abs=0.01)
    box = data.boxes[active]
    assert (box[:, :2] >= frame[:, :2]).all() and (box[:, 2:] <= frame[:, 2:]).all()

    # Each canvas is the sum of its resized digits, each whole frame pasted at its offset.
    filt = getattr(Image.Resampling, resample)
    for i in range(300):
        canvas = np.zeros((50, 50), dtype=np.int64)
        for k in range(data.counts[i]):
            x0, y0, x1, _ = data.frame_boxes[i, k].astype(int)
            digit = Image.fromarray(images[data.source_index[i, k]]).resize((x1 - x0,) * 2, filt)
            patch = np.asarray(digit, dtype=np.int64)
            canvas[y0 : y0 + patch.shape[0], x0:x1] += patch
            ys, xs = np.nonzero(patch)
            bx0, by0, bx1, by1 = data.boxes[i, k].astype(int)
            assert (bx0, by0, bx1, by1) == (
                x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1
            )  # fmt: skip
        np.testing.assert_array_equal(canvas, data.images[i])

    # Overlap is allowed (unlike ours): some two-digit canvases have intersecting ink boxes.
    two = data.boxes[data.counts == 2]
    a, b = two[:, 0], two[:, 1]
    hit = (a[:, 0] < b[:, 2]) & (b[:, 0] < a[:, 2]) & (a[:, 1] < b[:, 3]) & (b[:, 1] < a[:, 3])
    assert hit.sum() > 10


def test_pyro_generator_is_deterministic_and_prefix_stable(
    sets: dict[str, ReferenceSet], mnist_train: tuple[np.ndarray, np.ndarray]
) -> None:
    kw = {"seed": 681307, "n_images": 200, "resample": "bilinear", "size_rule": "scipy"}
    a, b = pyro_set(*mnist_train, **kw), pyro_set(*mnist_train, **kw)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
        np.testing.assert_array_equal(a[name], getattr(sets["pyro"], name)[:200])
    c = pyro_set(*mnist_train, **{**kw, "seed": 1})
    assert not np.array_equal(a["images"], c["images"])
    with pytest.raises(ValueError, match="resample"):
        pyro_set(*mnist_train, **{**kw, "resample": "box"})


# --- aakhundov -------------------------------------------------------------------------------


def test_aakhundov_matches_its_readme_figure(sets: dict[str, ReferenceSet]) -> None:
    """Test images shown in aakhundov's README (images/rec_samples.png), by position."""
    shown = {
        1: [4], 6: [7, 7], 8: [3, 7], 11: [1, 7], 13: [2], 18: [5, 5], 27: [4, 5], 29: [3, 3],
        31: [5], 36: [3, 9],
    }  # fmt: skip
    data = sets["aakhundov"]
    assert {i: sorted(data.labels[i, : data.counts[i]].tolist()) for i in shown} == shown
    np.testing.assert_array_equal(data.boxes[1, 0], [22, 5, 38, 25])  # the "4", top middle


def test_aakhundov_canvases_follow_the_rules(
    sets: dict[str, ReferenceSet], mnist_train: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = mnist_train
    data = sets["aakhundov"]
    assert len(data) == 1000 and data.images.dtype == np.uint8
    active = _active(data)
    src = data.source_index[active]
    assert ((src >= 0) & (src < 60000)).all()
    np.testing.assert_array_equal(data.labels[active], labels[src])
    # Strata of 20,000 canvases with 0, 1, 2 digits, shuffled: the position tells the count.
    assert len(np.unique(data.set_index)) == 1000
    np.testing.assert_array_equal(data.counts, data.set_index // 20000)

    for i in range(len(data)):
        owner = np.zeros((50, 50), dtype=np.int64)  # digits whose ink covers each pixel
        for k in range(data.counts[i]):
            x0, y0, x1, y1 = data.boxes[i, k].astype(int)
            digit = images[data.source_index[i, k]]
            ys, xs = np.nonzero(digit)
            crop = digit[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
            assert crop.shape == (y1 - y0, x1 - x0)  # cropped to its ink, not rescaled
            fx0, fy0 = data.frame_boxes[i, k, :2].astype(int)
            assert (fx0 + xs.min(), fy0 + ys.min()) == (x0, y0)  # the 28x28 frame it came from
            ink = crop > 0
            np.testing.assert_array_equal(data.images[i, y0:y1, x0:x1][ink], crop[ink])
            owner[y0:y1, x0:x1] += ink
        assert owner.max() <= 1, f"canvas {i}: two digits put ink on one pixel"
        np.testing.assert_array_equal(owner > 0, data.images[i] > 0)  # no other ink
    # Boxes may overlap (only ink may not): a few two-digit canvases show it.
    two = data.boxes[data.counts == 2]
    a, b = two[:, 0], two[:, 1]
    assert (
        (a[:, 0] < b[:, 2]) & (b[:, 0] < a[:, 2]) & (a[:, 1] < b[:, 3]) & (b[:, 1] < a[:, 3])
    ).any()


def test_aakhundov_generator_is_deterministic(mnist_train: tuple[np.ndarray, np.ndarray]) -> None:
    kw = {"images_per_count": 300, "test_size": 200}
    a, b = aakhundov_set(*mnist_train, **kw), aakhundov_set(*mnist_train, **kw)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    c = aakhundov_set(*mnist_train, seed=1, **kw)
    assert not np.array_equal(a["images"], c["images"])
    with pytest.raises(ValueError, match="test_size"):
        aakhundov_set(*mnist_train, images_per_count=10, test_size=31)


# --- cache -----------------------------------------------------------------------------------


def test_cache_roundtrip_cut_and_rebuild(
    sets: dict[str, ReferenceSet], cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    (path,) = cache.glob("reference-aakhundov-*.npz")
    again = reference_test_set(DataConfig(), "aakhundov", cache_dir=cache)
    assert "loaded test protocol aakhundov from cache" in caplog.text
    assert isinstance(again, ReferenceSet) and again.protocol == "aakhundov"
    for name in protocols._ARRAYS:
        np.testing.assert_array_equal(getattr(again, name), getattr(sets["aakhundov"], name))
    head = reference_test_set(DataConfig(), "aakhundov", n=10, cache_dir=cache)
    assert len(head) == 10 and len(head.set_index) == 10 and len(head.frame_boxes) == 10
    assert len(reference_test_set(DataConfig(), "aakhundov", n=5000, cache_dir=cache)) == 1000

    raw = bytearray(path.read_bytes())
    for pos in range(len(raw) // 3, len(raw) // 3 + 64):
        raw[pos] ^= 0xFF
    path.write_bytes(bytes(raw))
    caplog.clear()
    rebuilt = load_reference_set("aakhundov", cache_dir=cache)
    assert "unreadable or corrupt" in caplog.text and "generating test protocol" in caplog.text
    np.testing.assert_array_equal(rebuilt.images, sets["aakhundov"].images)
    assert not list(cache.glob("*.part"))
