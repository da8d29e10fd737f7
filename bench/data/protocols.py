"""Test protocols: on which images a count accuracy is measured.

Our headline test set (``heldout``) is built by :mod:`bench.data.multi_mnist` from MNIST *test*
digits with disjoint ink boxes. The published AIR figures were measured on other images, built
from MNIST *training* digits; each is rebuilt here exactly (:mod:`bench.data.reference_sets`), so
that a variant's published row can be set beside our number on its own protocol, while the
held-out number stays the headline:

=============  =========================================================  ======  ============
protocol       images                                                     count   published
=============  =========================================================  ======  ============
``heldout``    ours: MNIST test digits, rescaled, disjoint ink boxes      n_test  (headline)
``pyro``       Pyro's generated training set (2017 script, seed 681307)   60,000  rows 10-11
``addtt``      last 10k of Pyro's set as addtt trained on (seed 681307,   10,000  rows 1-4
               nearest-neighbour resize of Pillow < 7): its test split
``aakhundov``  aakhundov's test file: cropped unscaled digits, no ink on   1,000  rows 6-9
               ink, first 1,000 of its shuffled 60,000 (seed 0)
=============  =========================================================  ======  ============

(Rows of ``../shared/docs/REFERENCE.md``.) Pyro measures count accuracy on the very images it
trains on; addtt trains on the first 50,000 canvases of the same kind of set and tests on the
last 10,000; aakhundov tests on 1,000 canvases whose digits its training canvases do not use
(except where its digit permutation wraps round). None of them is held out at the level of
MNIST digits, which is why ``heldout`` stays the headline.

Every protocol has a fixed seed, so every variant and seed sees the same images; each set is
generated once and cached like the generator's own (``$AIR_CACHE_DIR``), checked by sha256 when
read and, where the reference published one, against its checksum when generated.

Use :func:`reference_test_set`::

    from bench.data.protocols import reference_test_set

    test = reference_test_set(cfg.data, "addtt", n=10000)  # a MultiMnist (uint8 images ...)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.data import reference_sets
from bench.data.mnist import load_mnist
from bench.data.multi_mnist import MultiMnist, MultiMnistSpec, cache_folder, load_or_generate
from bench.data.npz_cache import load_or_build, read_arrays, write_arrays

if TYPE_CHECKING:
    from bench.config import DataConfig

__all__ = [
    "PROTOCOLS",
    "REFERENCE_PROTOCOLS",
    "Protocol",
    "ReferenceSet",
    "load_reference_set",
    "reference_test_set",
]

logger = logging.getLogger(__name__)

#: Part of every cache key; bump when a reference set's bytes would change.
PROTOCOLS_VERSION = 1
_ARRAYS = ("images", "counts", "boxes", "frame_boxes", "labels", "source_index", "set_index")


@dataclass(frozen=True)
class Protocol:
    """One test protocol.

    Attributes:
        name: the protocol's id.
        summary: one line: which images.
        source: the reference code that builds them.
        mnist_split: the MNIST split its digits come from.
        size: images in its test set (``heldout``: ``data.n_test``).
        offset: position of its first test image in the generated set.
        generator: ``"heldout"``, ``"pyro"`` or ``"aakhundov"`` (functions of
            :mod:`bench.data.reference_sets`).
        params: the generator's arguments.
        generated: canvases the generator makes to reach the test images.
        checksum: the reference's published sum of all pixels of the generated set, if any.
    """

    name: str
    summary: str
    source: str
    mnist_split: str
    size: int | None
    offset: int = 0
    generator: str = "heldout"
    params: tuple[tuple[str, Any], ...] = ()
    generated: int = 0
    checksum: int | None = None


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in [
        Protocol(
            "heldout",
            "ours: MNIST test digits, rescaled by 1/s, disjoint ink boxes (the headline)",
            "bench/data/multi_mnist.py",
            "test",
            None,
        ),
        Protocol(
            "pyro",
            "Pyro's training set, on which it measures count accuracy",
            "pyro-ppl/pyro examples/air/multi_mnist.py (2017; scipy imresize, bilinear)",
            "train",
            60000,
            generator="pyro",
            params=(("seed", 681307), ("resample", "bilinear"), ("size_rule", "scipy")),
            generated=60000,
            checksum=884438093,
        ),
        Protocol(
            "addtt",
            "addtt's test split: canvases 50,000-59,999 of Pyro's generated set",
            "addtt/attend-infer-repeat-pytorch datasets.py on pyro/contrib/examples/"
            "multi_mnist.py (Pillow < 7: nearest-neighbour resize)",
            "train",
            10000,
            offset=50000,
            generator="pyro",
            params=(("seed", 681307), ("resample", "nearest"), ("size_rule", "int")),
            generated=60000,
            checksum=883114919,
        ),
        Protocol(
            "aakhundov",
            "aakhundov's test file: cropped unscaled digits, no ink on ink, 1,000 canvases",
            "aakhundov/tf-attend-infer-repeat multi_mnist.py (Oct 2017, pixel non-overlap)",
            "train",
            1000,
            generator="aakhundov",
            params=(("seed", 0), ("images_per_count", 20000), ("test_size", 1000)),
            generated=60000,
        ),
    ]
}
#: The protocols that rebuild a reference's images (all but the headline).
REFERENCE_PROTOCOLS: tuple[str, ...] = tuple(p for p in PROTOCOLS if p != "heldout")
#: Digit counts and canvas side of every reference set.
_REFERENCE_COUNTS = (0, 1, 2)
_REFERENCE_CANVAS = reference_sets.CANVAS


@dataclass(eq=False)
class ReferenceSet(MultiMnist):
    """A reference protocol's test images, with the arrays of :class:`MultiMnist`.

    ``spec`` names only the split, counts, seed and canvas (``key()`` is not this set's key).

    Attributes:
        protocol: the protocol's name.
        set_index: int64 ``(N,)`` each image's position in the set the reference generated
            (addtt: 50000-59999; aakhundov: in its unshuffled order, 0-digit canvases first).
    """

    protocol: str = ""
    set_index: np.ndarray | None = None


def reference_mismatch(data: DataConfig, canvas: int) -> str | None:
    """Why the reference protocols cannot test a run of `data` on `canvas` (None if they can):
    their images hold 0-2 digits on 50x50 canvases, so they measure the count experiment only."""
    if sorted(data.test_counts) == list(_REFERENCE_COUNTS) and canvas == _REFERENCE_CANVAS:
        return None
    return (
        f"the reference test sets hold 0-2 digits on 50x50 canvases; this run tests "
        f"data.test_counts={list(data.test_counts)} on model.canvas={canvas}"
    )


def reference_test_set(
    data: DataConfig,
    protocol: str,
    n: int | None = None,
    *,
    canvas: int = 50,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> MultiMnist:
    """The first ``n`` test images of ``protocol`` (all of them when ``n`` is None).

    ``heldout`` is exactly the run's own test set (the trainer's spec from ``data`` and
    ``canvas``, the same cache file, the same bytes), cut to ``n``. A reference protocol ignores
    ``data``'s seed, sizes and ``rescale`` (its images are fixed), has at most
    ``PROTOCOLS[protocol].size`` images (``n`` beyond that gives them all) and holds 0-2 digits
    on 50x50 canvases: ``data.test_counts`` must be ``[0, 1, 2]`` and ``canvas`` 50.
    ``data_dir`` / ``cache_dir`` default to ``data.data_dir`` / ``data.cache_dir``.

    Raises:
        ValueError: unknown protocol, ``n`` < 1, or a run whose test counts or canvas the
            reference set does not have.
        RuntimeError: a generated reference set differs from the reference's published checksum.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown test protocol {protocol!r}; known: {list(PROTOCOLS)}")
    if n is not None and (not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1):
        raise ValueError(f"n must be a positive int or None, got {n!r}")
    data_dir = data.data_dir if data_dir is None else data_dir
    cache_dir = data.cache_dir if cache_dir is None else cache_dir
    if protocol == "heldout":
        spec = MultiMnistSpec(
            n_images=data.n_test,
            split="test",
            counts=tuple(data.test_counts),
            seed=data.seed,
            canvas=canvas,
            rescale=data.rescale,
        )
        return _head(load_or_generate(spec, data_dir=data_dir, cache_dir=cache_dir), n)
    mismatch = reference_mismatch(data, canvas)
    if mismatch is not None:
        raise ValueError(f"test protocol {protocol!r}: {mismatch}")
    return _head(load_reference_set(protocol, data_dir=data_dir, cache_dir=cache_dir), n)


def load_reference_set(
    protocol: str,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ReferenceSet:
    """All test images of a reference protocol, from the cache or generated (then cached).

    The cache file is named after the protocol and a hash of its generator and parameters; an
    unreadable or corrupt file is logged as a warning and rebuilt.
    """
    if protocol not in REFERENCE_PROTOCOLS:
        raise ValueError(
            f"{protocol!r} is not a reference protocol; known: {list(REFERENCE_PROTOCOLS)}"
        )
    proto = PROTOCOLS[protocol]

    def build() -> ReferenceSet:
        return _generate(proto, *load_mnist(proto.mnist_split, data_dir))

    return load_or_build(
        cache_folder(cache_dir) / f"reference-{protocol}-{_key(proto)}.npz",
        read=lambda path: _read(path, proto),
        build=build,
        write=lambda path, found: _write(path, found, proto),
        logger=logger,
        what=f"test protocol {protocol}",
    )


def _generate(proto: Protocol, mnist_images: np.ndarray, mnist_labels: np.ndarray) -> ReferenceSet:
    params = dict(proto.params)
    if proto.generator == "pyro":
        arrays = reference_sets.pyro_set(
            mnist_images, mnist_labels, n_images=proto.generated, **params
        )
        arrays["set_index"] = np.arange(proto.generated, dtype=np.int64)
    elif proto.generator == "aakhundov":
        arrays = reference_sets.aakhundov_set(mnist_images, mnist_labels, **params)
    else:  # pragma: no cover - the registry above names only these
        raise ValueError(f"protocol {proto.name}: unknown generator {proto.generator!r}")
    if proto.checksum is not None:
        total = int(arrays["images"].sum(dtype=np.int64))
        if total != proto.checksum:
            raise RuntimeError(
                f"test protocol {proto.name}: the generated set's pixel sum is {total}, but "
                f"{proto.source} publishes {proto.checksum}; these are not the reference's "
                f"images (Pillow {_pillow_version()} resized them; is MNIST the original?)"
            )
    end = proto.offset + proto.size
    arrays = {name: a[proto.offset : end] for name, a in arrays.items()}
    return _assemble(proto, arrays)


def _assemble(proto: Protocol, arrays: dict[str, np.ndarray]) -> ReferenceSet:
    spec = MultiMnistSpec(
        n_images=len(arrays["images"]),
        split=proto.mnist_split,
        counts=_REFERENCE_COUNTS,
        seed=dict(proto.params)["seed"],
        canvas=_REFERENCE_CANVAS,
        rescale=proto.generator == "pyro",
    )
    return ReferenceSet(spec=spec, protocol=proto.name, **arrays)


def _head(data: MultiMnist, n: int | None) -> MultiMnist:
    """The first ``n`` images (every per-image array cut), or ``data`` itself.

    ``spec`` stays that of the whole set they are cut from.
    """
    if n is None or n >= len(data):
        return data
    cut = {
        f.name: getattr(data, f.name)[:n]
        for f in dataclasses.fields(data)
        if isinstance(getattr(data, f.name), np.ndarray)
    }
    return dataclasses.replace(data, **cut)


# ---------------------------------------------------------------------------------------------
# Disk cache


def _key(proto: Protocol) -> str:
    payload = {
        "version": PROTOCOLS_VERSION,
        "name": proto.name,
        "generator": proto.generator,
        "params": [list(p) for p in proto.params],
        "slice": [proto.offset, proto.size, proto.generated],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _write(path: Path, data: ReferenceSet, proto: Protocol) -> None:
    arrays = {name: getattr(data, name) for name in _ARRAYS}
    write_arrays(path, arrays, _ARRAYS, {"protocol": proto.name, "key": _key(proto)})


def _read(path: Path, proto: Protocol) -> ReferenceSet:
    arrays = read_arrays(path, _ARRAYS, {"protocol": proto.name, "key": _key(proto)})
    return _assemble(proto, arrays)


def _pillow_version() -> str:
    try:
        import PIL
    except ImportError:  # pragma: no cover
        return "(not installed)"
    return PIL.__version__
