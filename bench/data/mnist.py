"""Reading the original MNIST digits from the standard gzipped IDX files.

The four files are looked up in a data folder (see :func:`resolve_mnist_dir`), parsed with a
strict IDX reader and checked against the sha256 of their *decompressed* bytes. The checksum is
taken over the decompressed bytes because re-gzipped copies (such as the offline copy that
development machines share) differ from the official ``.gz`` files only in their gzip wrapping.

If a file is missing, it can be downloaded from a list of public mirrors (:data:`MIRRORS`); the
list is module level so that tests can point it at a local server or at ``file://`` folders.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import http.client
import logging
import os
import tempfile
import urllib.request
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

__all__ = [
    "FILES",
    "MIRRORS",
    "SHA256",
    "MnistCorruptError",
    "MnistNotFoundError",
    "clear_cache",
    "find_mnist_files",
    "load_mnist",
    "resolve_mnist_dir",
]

logger = logging.getLogger(__name__)

#: The folder holding pyproject.toml (this file is ``<root>/bench/data/mnist.py``).
PROJECT_ROOT = Path(__file__).resolve().parents[2]
#: Read-only offline copy shared by development machines; never written to.
SHARED_MNIST_DIR = PROJECT_ROOT.parent / "shared" / "data" / "mnist"
#: Environment variable that overrides the data folder.
ENV_VAR = "AIR_DATA_DIR"

#: (images file, labels file) for each split.
FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

#: sha256 of the decompressed contents of each file.
SHA256: dict[str, str] = {
    "train-images-idx3-ubyte.gz": (
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"
    ),
    "train-labels-idx1-ubyte.gz": (
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"
    ),
    "t10k-images-idx3-ubyte.gz": (
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"
    ),
}

#: Download mirrors, tried in order; each is a folder URL that holds the four files.
MIRRORS: list[str] = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
]
#: Seconds to wait for a mirror; short so that an offline machine fails fast.
DOWNLOAD_TIMEOUT = 10.0

# IDX magic numbers: two zero bytes, the element type (0x08 = unsigned byte), the number of dims.
_IMAGES_MAGIC = 0x00000803
_LABELS_MAGIC = 0x00000801
_SPLITS = tuple(FILES)


class MnistNotFoundError(FileNotFoundError):
    """The MNIST files are not on disk and could not be downloaded."""


class MnistCorruptError(ValueError):
    """An MNIST file exists but is truncated, not valid IDX, or fails its checksum."""


def resolve_mnist_dir(configured: str | os.PathLike[str] | None = None) -> Path:
    """Return the folder where the MNIST files are expected.

    Precedence: ``configured`` (when not None/empty) > ``$AIR_DATA_DIR`` > the shared offline
    copy ``<project root>/../shared/data/mnist`` if it exists > ``~/.cache/air-repro/mnist``.
    The folder returned need not exist.
    """
    if configured is not None and str(configured) != "":
        return Path(configured).expanduser()
    env = os.environ.get(ENV_VAR, "")
    if env:
        return Path(env).expanduser()
    if SHARED_MNIST_DIR.is_dir():
        return SHARED_MNIST_DIR
    return _user_cache_dir()


def load_mnist(
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    *,
    mirrors: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Load one MNIST split.

    Args:
        split: ``"train"`` (60,000 digits) or ``"test"`` (10,000 digits).
        data_dir: folder with the gz IDX files; ``None`` uses :func:`resolve_mnist_dir`.
        download: fetch missing files from the mirrors; otherwise raise at once.
        mirrors: folder URLs to try instead of :data:`MIRRORS`.

    Returns:
        ``(images, labels)``: uint8 ``(N, 28, 28)`` and int64 ``(N,)``. The arrays are cached
        in-process and shared between callers, so they are marked read-only.

    Raises:
        ValueError: unknown split.
        MnistNotFoundError: files missing and not downloadable.
        MnistCorruptError: a file is truncated, malformed, or fails its checksum.
    """
    if split not in FILES:
        raise ValueError(f"split must be one of {list(_SPLITS)}, got {split!r}")
    paths = _locate(split, data_dir, download, MIRRORS if mirrors is None else list(mirrors))
    # Keying the in-process cache on size and mtime as well as the path means a file replaced on
    # disk (e.g. by a test, or a fresh download) is re-read rather than served stale.
    stamps = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    return _load_files(stamps)


def find_mnist_files(
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    *,
    mirrors: Sequence[str] | None = None,
) -> list[Path]:
    """Paths of the four MNIST files, downloading missing ones when allowed; nothing is parsed.

    For a check before many processes need the data (the launcher): a missing file raises
    :class:`MnistNotFoundError`, whose message says where to put the files or which
    environment variable to set.
    """
    urls = MIRRORS if mirrors is None else list(mirrors)
    return [path for split in FILES for path in _locate(split, data_dir, download, urls)]


def clear_cache() -> None:
    """Forget the arrays cached in-process by :func:`load_mnist`."""
    _load_files.cache_clear()


# ---------------------------------------------------------------------------------------------
# Locating and downloading


def _user_cache_dir() -> Path:
    # Computed on each call (not at import) so that a changed $HOME, e.g. in tests, is honoured.
    return Path.home() / ".cache" / "air-repro" / "mnist"


def _locate(
    split: str, data_dir: str | os.PathLike[str] | None, download: bool, mirrors: list[str]
) -> tuple[Path, Path]:
    """Return the paths of the split's two files, downloading missing ones when allowed."""
    primary = resolve_mnist_dir(data_dir)
    fallback = _user_cache_dir()
    # A file downloaded earlier into the user cache (because the data folder was read-only)
    # is found there on the next call instead of being fetched again.
    search = [primary] if fallback == primary else [primary, fallback]
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in FILES[split]:
        hit = next((d / name for d in search if (d / name).is_file()), None)
        if hit is None:
            missing.append(name)
        else:
            found[name] = hit
    if missing:
        if not download:
            raise MnistNotFoundError(_not_found_message(missing, primary, None))
        target = primary if primary != SHARED_MNIST_DIR and _is_writable(primary) else fallback
        errors: list[str] = []
        for name in missing:
            path = _download(name, target, mirrors, errors)
            if path is None:
                raise MnistNotFoundError(_not_found_message(missing, primary, errors))
            found[name] = path
    images_name, labels_name = FILES[split]
    return found[images_name], found[labels_name]


def _is_writable(folder: Path) -> bool:
    """Whether files can be created in ``folder`` (created if needed)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # os.access() is not enough: it ignores read-only mounts for root in some setups, so
        # actually try to create a file.
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def _not_found_message(missing: list[str], folder: Path, errors: list[str] | None) -> str:
    lines = [
        f"MNIST file(s) not found: {', '.join(missing)}",
        f"searched folder: {folder}",
        f"Put the four MNIST files ({', '.join(SHA256)}) in that folder, "
        f"or set {ENV_VAR} to a folder that holds them.",
    ]
    if errors is None:
        lines.append("(downloading was disabled)")
    else:
        lines.append("downloading failed from every mirror:")
        lines.extend(f"  {e}" for e in errors)
    return "\n".join(lines)


def _download(name: str, target: Path, mirrors: list[str], errors: list[str]) -> Path | None:
    """Fetch ``name`` into ``target`` from the first mirror that serves the right bytes.

    Failures are appended to ``errors``; returns None when every mirror failed.
    """
    target.mkdir(parents=True, exist_ok=True)
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + name
        fd, tmp_name = tempfile.mkstemp(dir=target, prefix=f".{name}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                _fetch(url, out, name)
            actual = hashlib.sha256(_decompress(tmp)).hexdigest()
            if actual != SHA256[name]:
                raise MnistCorruptError(
                    f"checksum mismatch (expected {SHA256[name]}, got {actual})"
                )
            # Renamed only once verified, so a half-written or wrong file never has the real name.
            dest = target / name
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; data files are meant to be shared
            os.replace(tmp, dest)
            logger.info("downloaded %s from %s", name, url)
            return dest
        # URLError, HTTPError and timeouts are OSErrors; IncompleteRead is an HTTPException.
        except (OSError, ValueError, http.client.HTTPException) as exc:
            errors.append(f"{url}: {exc}")
            logger.warning("could not download %s: %s", url, exc)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return None


def _fetch(url: str, out, name: str) -> None:
    """Stream ``url`` into the binary file object ``out`` with a progress bar."""
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        # disable=None hides the bar when stderr is not a terminal (CI logs, pytest).
        with tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=None) as bar:
            while chunk := response.read(1 << 16):
                out.write(chunk)
                bar.update(len(chunk))


# ---------------------------------------------------------------------------------------------
# Parsing


@functools.lru_cache(maxsize=8)
def _load_files(stamps: tuple[tuple[str, int, int], ...]) -> tuple[np.ndarray, np.ndarray]:
    images_path, labels_path = (Path(s[0]) for s in stamps)
    images = _read_idx(images_path, _IMAGES_MAGIC, 3)
    labels = _read_idx(labels_path, _LABELS_MAGIC, 1).astype(np.int64)
    if images.shape[1:] != (28, 28):
        raise MnistCorruptError(
            f"{images_path}: expected 28x28 images, got {images.shape[1]}x{images.shape[2]}"
        )
    if len(images) != len(labels):
        raise MnistCorruptError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise MnistCorruptError(f"{labels_path}: labels outside 0..9")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _decompress(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return gzip.decompress(f.read())
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise MnistCorruptError(
            f"{path}: not a valid gzip file (corrupt or truncated): {exc}"
        ) from exc


def _read_idx(path: Path, expected_magic: int, ndim: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file, then verify its decompressed sha256."""
    raw = _decompress(path)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise MnistCorruptError(
            f"{path}: only {len(raw)} bytes after decompression, too short for an IDX header"
        )
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise MnistCorruptError(
            f"{path}: bad IDX magic number 0x{magic:08x} (expected 0x{expected_magic:08x})"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(dims, dtype=np.int64))
    if len(raw) != header + size:
        raise MnistCorruptError(
            f"{path}: header says {'x'.join(map(str, dims))} = {size} bytes of data, "
            f"file holds {len(raw) - header} (truncated or corrupt)"
        )
    # Checked after the structural parse so that a malformed file gets the more specific message.
    expected = SHA256.get(path.name)
    if expected is not None:
        actual = hashlib.sha256(raw).hexdigest()
        if actual != expected:
            raise MnistCorruptError(
                f"{path}: sha256 of the decompressed data does not match: "
                f"expected {expected}, got {actual}"
            )
    # Copy so the array owns writable memory rather than viewing the immutable bytes object.
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()
