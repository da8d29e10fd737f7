"""Tests for bench.data.mnist: locating, parsing, verifying and downloading MNIST."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bench.data import mnist
from bench.data.mnist import (
    FILES,
    MnistCorruptError,
    MnistNotFoundError,
    load_mnist,
    resolve_mnist_dir,
)

ALL_FILES = [name for pair in FILES.values() for name in pair]


def _real_mnist_dir() -> Path:
    folder = resolve_mnist_dir(None)
    missing = [n for n in ALL_FILES if not (folder / n).is_file()]
    if missing:
        pytest.skip(f"real MNIST not available in {folder} (missing {missing}); set AIR_DATA_DIR")
    return folder


@pytest.fixture(scope="module")
def real_dir() -> Path:
    return _real_mnist_dir()


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    # A private $HOME keeps the user cache fallback (~/.cache/air-repro/mnist) out of the tests,
    # and clearing the in-process cache keeps tests independent.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    mnist.clear_cache()
    yield
    mnist.clear_cache()


# --- small fake IDX files --------------------------------------------------------------------


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _fake_split(n: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray, bytes, bytes]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    return images, labels, _idx_bytes(images, 0x803), _idx_bytes(labels, 0x801)


def _write_fake_test_split(folder: Path, monkeypatch: pytest.MonkeyPatch, seed: int = 0):
    """Write gz copies of a fake test split into ``folder`` and make them the expected sums."""
    images, labels, img_raw, lab_raw = _fake_split(seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    img_name, lab_name = FILES["test"]
    (folder / img_name).write_bytes(gzip.compress(img_raw))
    (folder / lab_name).write_bytes(gzip.compress(lab_raw))
    sums = dict(mnist.SHA256)
    sums[img_name] = hashlib.sha256(img_raw).hexdigest()
    sums[lab_name] = hashlib.sha256(lab_raw).hexdigest()
    monkeypatch.setattr(mnist, "SHA256", sums)
    return images, labels


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local HTTP server on 127.0.0.1 serving files from a temporary folder."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(root))
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", root
    finally:
        httpd.shutdown()
        httpd.server_close()


def _closed_port_url() -> str:
    # Bind and release a port: connecting to it afterwards is refused at once.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


# --- resolving the folder --------------------------------------------------------------------


def test_resolve_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    monkeypatch.setattr(mnist, "SHARED_MNIST_DIR", shared)
    monkeypatch.delenv("AIR_DATA_DIR", raising=False)
    home_cache = tmp_path / "home" / ".cache" / "air-repro" / "mnist"
    assert resolve_mnist_dir(None) == home_cache  # shared copy absent
    shared.mkdir()
    assert resolve_mnist_dir(None) == shared
    assert resolve_mnist_dir("") == shared  # empty counts as not configured
    monkeypatch.setenv("AIR_DATA_DIR", str(tmp_path / "env"))
    assert resolve_mnist_dir(None) == tmp_path / "env"
    assert resolve_mnist_dir(tmp_path / "explicit") == tmp_path / "explicit"


def test_default_is_shared_copy_relative_to_project_root() -> None:
    root = Path(__file__).resolve().parents[1]
    assert (root / "pyproject.toml").is_file()
    expected = root.parent / "shared" / "data" / "mnist"
    assert expected == mnist.SHARED_MNIST_DIR


# --- the real files --------------------------------------------------------------------------


@pytest.mark.parametrize(("split", "n"), [("train", 60000), ("test", 10000)])
def test_real_mnist_shapes_and_dtypes(real_dir: Path, split: str, n: int) -> None:
    images, labels = load_mnist(split, real_dir, download=False)
    assert images.shape == (n, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.int64
    assert set(np.unique(labels)) == set(range(10))
    assert images.max() == 255 and images.min() == 0
    # Cached in-process and protected against accidental edits by callers.
    again = load_mnist(split, real_dir, download=False)
    assert again[0] is images and again[1] is labels
    assert not images.flags.writeable


def test_real_mnist_checksums(real_dir: Path) -> None:
    for name in ALL_FILES:
        raw = gzip.decompress((real_dir / name).read_bytes())
        assert hashlib.sha256(raw).hexdigest() == mnist.SHA256[name]


def test_env_var_is_used(real_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIR_DATA_DIR", str(real_dir))
    images, _ = load_mnist("test")
    assert images.shape == (10000, 28, 28)


def test_bad_split() -> None:
    with pytest.raises(ValueError, match=r"split must be one of \['train', 'test'\].*'val'"):
        load_mnist("val")


# --- broken files ----------------------------------------------------------------------------


def _copy_real_test(real_dir: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in FILES["test"]:
        shutil.copy(real_dir / name, dest / name)
    return dest


def test_truncated_gzip(real_dir: Path, tmp_path: Path) -> None:
    folder = _copy_real_test(real_dir, tmp_path / "data")
    path = folder / FILES["test"][0]
    path.write_bytes(path.read_bytes()[:50000])
    with pytest.raises(MnistCorruptError, match=r"t10k-images-idx3-ubyte\.gz.*gzip"):
        load_mnist("test", folder, download=False)


def test_not_gzip(real_dir: Path, tmp_path: Path) -> None:
    folder = _copy_real_test(real_dir, tmp_path / "data")
    (folder / FILES["test"][1]).write_bytes(b"this is not gzip data at all")
    with pytest.raises(MnistCorruptError, match=r"t10k-labels-idx1-ubyte\.gz.*gzip"):
        load_mnist("test", folder, download=False)


def test_truncated_payload(real_dir: Path, tmp_path: Path) -> None:
    folder = _copy_real_test(real_dir, tmp_path / "data")
    path = folder / FILES["test"][1]
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-10]))  # valid gzip, short IDX payload
    with pytest.raises(MnistCorruptError, match=r"t10k-labels.*10000 bytes.*holds 9990"):
        load_mnist("test", folder, download=False)


def test_bad_magic(real_dir: Path, tmp_path: Path) -> None:
    folder = _copy_real_test(real_dir, tmp_path / "data")
    path = folder / FILES["test"][0]
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x07" + raw[4:]))
    with pytest.raises(MnistCorruptError, match=r"t10k-images.*magic number 0x00000807"):
        load_mnist("test", folder, download=False)


def test_checksum_mismatch(real_dir: Path, tmp_path: Path) -> None:
    folder = _copy_real_test(real_dir, tmp_path / "data")
    path = folder / FILES["test"][1]
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[100] = (raw[100] + 1) % 10  # still a well-formed label file
    path.write_bytes(gzip.compress(bytes(raw)))
    actual = hashlib.sha256(raw).hexdigest()
    expected = mnist.SHA256[FILES["test"][1]]
    with pytest.raises(MnistCorruptError) as info:
        load_mnist("test", folder, download=False)
    message = str(info.value)
    assert "t10k-labels-idx1-ubyte.gz" in message
    assert expected in message and actual in message


# --- missing files and downloads -------------------------------------------------------------


def test_missing_without_download(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    with pytest.raises(MnistNotFoundError) as info:
        load_mnist("train", folder, download=False)
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    for name in FILES["train"]:
        assert name in message
    assert str(folder) in message and "AIR_DATA_DIR" in message


def test_missing_offline_download_fails(tmp_path: Path) -> None:
    empty_mirror = tmp_path / "mirror"
    empty_mirror.mkdir()
    folder = tmp_path / "data"
    mirrors = [_closed_port_url(), empty_mirror.as_uri() + "/"]
    with pytest.raises(MnistNotFoundError) as info:
        load_mnist("test", folder, download=True, mirrors=mirrors)
    message = str(info.value)
    assert "t10k-images-idx3-ubyte.gz" in message and "AIR_DATA_DIR" in message
    assert mirrors[0] in message and "mirror" in message
    assert list(folder.iterdir()) == []  # no half-written temp files left behind


def test_module_level_mirrors_are_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mnist, "MIRRORS", [_closed_port_url()])
    with pytest.raises(MnistNotFoundError, match="127.0.0.1"):
        load_mnist("test", tmp_path / "data")


def test_download_from_local_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: tuple[str, Path]
) -> None:
    url, root = server
    images, labels = _write_fake_test_split(root, monkeypatch)
    folder = tmp_path / "data"
    # The first mirror is down, so the loader must move on to the second.
    got_images, got_labels = load_mnist(
        "test", folder, download=True, mirrors=[_closed_port_url(), url]
    )
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES["test"])
    # Now on disk: no download needed any more.
    mnist.clear_cache()
    again, _ = load_mnist("test", folder, download=False)
    np.testing.assert_array_equal(again, images)


def test_download_from_file_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = tmp_path / "mirror"
    images, _ = _write_fake_test_split(mirror, monkeypatch)
    got, _ = load_mnist("test", tmp_path / "data", mirrors=[mirror.as_uri()])
    np.testing.assert_array_equal(got, images)


def test_download_wrong_bytes_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: tuple[str, Path]
) -> None:
    url, root = server
    _write_fake_test_split(root, monkeypatch)
    # Serve different (but well-formed) files than the expected checksums describe.
    _, _, img_raw, lab_raw = _fake_split(seed=1)
    img_name, lab_name = FILES["test"]
    (root / img_name).write_bytes(gzip.compress(img_raw))
    (root / lab_name).write_bytes(gzip.compress(lab_raw))
    folder = tmp_path / "data"
    with pytest.raises(MnistNotFoundError, match="checksum mismatch"):
        load_mnist("test", folder, mirrors=[url])
    assert list(folder.iterdir()) == []  # the wrong file never got the real name


def test_read_only_target_falls_back_to_user_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mirror = tmp_path / "mirror"
    images, _ = _write_fake_test_split(mirror, monkeypatch)
    # Running as root defeats chmod, so simulate the read-only folder.
    monkeypatch.setattr(mnist, "_is_writable", lambda folder: False)
    folder = tmp_path / "readonly"
    got, _ = load_mnist("test", folder, mirrors=[mirror.as_uri()])
    np.testing.assert_array_equal(got, images)
    cache = tmp_path / "home" / ".cache" / "air-repro" / "mnist"
    assert sorted(p.name for p in cache.iterdir()) == sorted(FILES["test"])
    # The next call finds the copy in the user cache without downloading.
    mnist.clear_cache()
    got, _ = load_mnist("test", folder, download=False)
    np.testing.assert_array_equal(got, images)
