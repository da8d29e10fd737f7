"""Multi-MNIST: canvases holding a few non-overlapping, randomly scaled MNIST digits.

This is the data set of the AIR paper as built by Pyro's AIR example: each digit is shrunk by
``1/s`` with ``s ~ N(1.3, 0.1^2)`` and put at a random position on a 50x50 canvas. Unlike
Pyro's version, digits by default never overlap: the tight bounding boxes of their ink are
disjoint, which makes the ground-truth boxes and counts unambiguous for evaluation. Where a digit
may go is the spec's ``placement`` (its ink box on the canvas, or Pyro's rule: its whole frame)
and ``overlap`` (Pyro's independent placement).

Generation is vectorised (see :func:`generate`): each (digit, scale) pair is rendered once into
a small patch to find its exact ink box (bench/data/digit_render.py), placement is
rejection-sampled for all images at once in numpy, and the patches are rendered again and pasted
at their integer offsets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.data.digit_render import DIGIT, ink_boxes, paste
from bench.data.digit_render import MARGIN as _MARGIN
from bench.data.mnist import PROJECT_ROOT, load_mnist
from bench.data.npz_cache import load_or_build, read_arrays, write_arrays

__all__ = [
    "GENERATOR_VERSION",
    "MultiMnist",
    "MultiMnistSpec",
    "cache_file",
    "cache_folder",
    "default_cache_dir",
    "generate",
    "load_or_generate",
]

logger = logging.getLogger(__name__)

#: Part of every cache key; bump whenever the algorithm's output for a given spec changes.
#: 2: adds ``frame_boxes`` (images, counts and ink boxes are unchanged from 1).
GENERATOR_VERSION = 2
#: Most digits a canvas may hold.
MAX_COUNT = 5
#: Position draws per digit before the whole image is redrawn with new digits and scales.
MAX_POSITION_TRIES = 100
#: Whole-image redraws before giving up (the spec is then practically infeasible).
MAX_ROUNDS = 50
_SPLITS = ("train", "test")
#: Where a digit may go: its ink box on the canvas, or its whole rescaled frame (Pyro's rule).
PLACEMENTS = ("ink", "frame")
#: Spec fields added after GENERATOR_VERSION 2, with the default that reproduces version 2.
_LATER_FIELDS = {"placement": "ink", "overlap": False}
_ARRAYS = ("images", "counts", "boxes", "labels", "source_index", "frame_boxes")


@dataclass(frozen=True)
class MultiMnistSpec:
    """Everything that determines a multi-MNIST data set.

    Attributes:
        n_images: number of canvases.
        split: ``"train"`` draws only MNIST training digits, ``"test"`` only test digits.
        counts: allowed numbers of digits per canvas, each equally likely.
        seed: seed of the numpy Generator; the data set is a pure function of the spec.
        canvas: side of the square canvas in pixels.
        rescale: shrink each digit by ``1/s``, ``s ~ N(scale_mean, scale_sd^2)``; when False
            digits keep their 28x28 size.
        scale_mean: mean of ``s``.
        scale_sd: standard deviation of ``s``.
        placement: ``"ink"`` draws each digit's offset uniformly among the positions that keep
            its ink box on the canvas (digits may touch the edges); ``"frame"`` among those that
            keep its whole rescaled 28x28 frame on the canvas, as Pyro's generator does (digits
            sit further from the edges).
        overlap: when False the ink boxes of an image are disjoint; when True offsets are drawn
            independently (as in Pyro's generator) and overlapping ink is merged by the
            per-pixel maximum.
    """

    n_images: int
    split: str
    counts: tuple[int, ...] = (0, 1, 2)
    seed: int = 0
    canvas: int = 50
    rescale: bool = True
    scale_mean: float = 1.3
    scale_sd: float = 0.1
    placement: str = "ink"
    overlap: bool = False

    def __post_init__(self) -> None:
        # Accept any sequence for counts but store a tuple, so the spec stays hashable.
        if isinstance(self.counts, (str, bytes)) or not hasattr(self.counts, "__iter__"):
            raise ValueError(f"counts must be a sequence of ints, got {self.counts!r}")
        object.__setattr__(self, "counts", tuple(self.counts))
        if not _is_int(self.n_images) or self.n_images <= 0:
            raise ValueError(f"n_images must be a positive int, got {self.n_images!r}")
        if self.split not in _SPLITS:
            raise ValueError(f"split must be one of {list(_SPLITS)}, got {self.split!r}")
        if not self.counts:
            raise ValueError("counts must not be empty")
        for c in self.counts:
            if not _is_int(c) or not 0 <= c <= MAX_COUNT:
                raise ValueError(
                    f"counts must hold ints between 0 and {MAX_COUNT}, got {self.counts!r}"
                )
        if len(set(self.counts)) != len(self.counts):
            # A repeated count would silently make it more likely than the others.
            raise ValueError(f"counts must not repeat values, got {self.counts!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if not _is_int(self.canvas) or self.canvas < DIGIT:
            raise ValueError(f"canvas must be an int >= {DIGIT}, got {self.canvas!r}")
        if not isinstance(self.rescale, bool):
            raise ValueError(f"rescale must be a bool, got {self.rescale!r}")
        if not math.isfinite(self.scale_mean) or self.scale_mean <= 0:
            raise ValueError(f"scale_mean must be a positive number, got {self.scale_mean!r}")
        if not math.isfinite(self.scale_sd) or self.scale_sd < 0:
            raise ValueError(f"scale_sd must be a non-negative number, got {self.scale_sd!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {list(PLACEMENTS)}, got {self.placement!r}")
        if not isinstance(self.overlap, bool):
            raise ValueError(f"overlap must be a bool, got {self.overlap!r}")
        if self.rescale and DIGIT / self.scale_mean > self.canvas:
            raise ValueError(
                f"scale_mean={self.scale_mean} makes the mean digit "
                f"{DIGIT / self.scale_mean:.1f} px wide, larger than the canvas ({self.canvas})"
            )

    def key(self) -> str:
        """Short stable hash of all fields and :data:`GENERATOR_VERSION`."""
        fields = self.to_dict()
        # Fields added after version 2 enter the key only when they differ from their default,
        # so the data sets (and caches) of earlier specs keep their keys.
        for name, default in _LATER_FIELDS.items():
            if fields[name] == default:
                del fields[name]
        payload = json.dumps({"version": GENERATOR_VERSION, **fields}, sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:16]

    def to_dict(self) -> dict:
        """Fields as plain JSON types (counts as a list)."""
        d = dataclasses.asdict(self)
        d["counts"] = list(self.counts)
        return d

    @property
    def max_count(self) -> int:
        """Largest allowed count: the width of the per-digit arrays."""
        return max(self.counts)


@dataclass(eq=False)
class MultiMnist:
    """A generated data set. Per-digit arrays have one row per slot, ``max_count`` wide.

    Attributes:
        images: uint8 ``(N, canvas, canvas)``.
        counts: int64 ``(N,)`` digits on each canvas.
        boxes: float32 ``(N, max_count, 4)`` tight ink box ``(x0, y0, x1, y1)`` of each digit in
            pixel-edge coordinates: the digit's ink covers pixel columns ``x0 <= x < x1`` and
            rows ``y0 <= y < y1``. NaN rows for absent digits.
        labels: int64 ``(N, max_count)`` digit classes, -1 for absent digits.
        source_index: int64 ``(N, max_count)`` index of the MNIST digit within its split, -1 for
            absent digits.
        spec: the spec it was generated from.
        frame_boxes: float32 ``(N, max_count, 4)`` box ``(x0, y0, x1, y1)`` of each digit's whole
            rescaled 28x28 frame as pasted on the canvas (a square of side ``28 / s``, in the same
            pixel-edge coordinates as ``boxes``; it may extend past the canvas edge). NaN rows
            for absent digits. An attention window is a square, so this is the box it can match.
    """

    images: np.ndarray
    counts: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    source_index: np.ndarray
    spec: MultiMnistSpec
    frame_boxes: np.ndarray

    def __len__(self) -> int:
        return len(self.images)

    def float_images(self) -> np.ndarray:
        """Images as float32 in [0, 1]."""
        return self.images.astype(np.float32) / np.float32(255.0)


# ---------------------------------------------------------------------------------------------
# Generation


def generate(
    spec: MultiMnistSpec, mnist_images: np.ndarray, mnist_labels: np.ndarray
) -> MultiMnist:
    """Build the data set described by ``spec`` from one MNIST split.

    ``mnist_images`` (uint8 ``(K, 28, 28)``) and ``mnist_labels`` (``(K,)``) must be the split
    named by ``spec.split``; :func:`load_or_generate` takes care of that. The result depends only
    on ``spec`` and the MNIST arrays.

    Raises:
        ValueError: malformed MNIST arrays.
        RuntimeError: the digits cannot be placed without overlap (canvas too small for the
            requested counts), detected after a bounded number of attempts.
    """
    mnist_images = np.asarray(mnist_images)
    mnist_labels = np.asarray(mnist_labels)
    if mnist_images.ndim != 3 or mnist_images.shape[1:] != (DIGIT, DIGIT):
        raise ValueError(f"mnist_images must be (K, 28, 28), got {mnist_images.shape}")
    if mnist_labels.shape != mnist_images.shape[:1] or len(mnist_images) == 0:
        raise ValueError(
            f"mnist_labels must be (K,) with K = {len(mnist_images)} > 0, got {mnist_labels.shape}"
        )
    if mnist_images.dtype != np.uint8:
        raise ValueError(f"mnist_images must be uint8, got {mnist_images.dtype}")

    rng = np.random.default_rng(spec.seed)
    n, maxc, size = spec.n_images, spec.max_count, spec.canvas
    counts = rng.choice(np.asarray(spec.counts, dtype=np.int64), size=n)
    active = np.arange(maxc)[None, :] < counts[:, None]  # (n, maxc) slot holds a digit

    source = np.full((n, maxc), -1, dtype=np.int64)
    ratio = np.ones((n, maxc))  # rendered size / 28 = 1/s
    local = np.zeros((n, maxc, 4), dtype=np.int64)  # ink box inside the rendered patch
    placed = np.zeros((n, maxc, 4), dtype=np.int64)  # ink box on the canvas

    pending = np.flatnonzero(counts > 0)
    for _round in range(MAX_ROUNDS):
        if pending.size == 0:
            break
        # (Re)draw digits and scales for every slot of the pending images, not just the slot that
        # failed: an unlucky early digit can leave no room for the later ones.
        slots = active[pending]
        img = np.repeat(pending, slots.sum(1))
        pos = np.nonzero(slots)[1]
        source[img, pos] = rng.integers(0, len(mnist_images), size=img.size)
        ratio[img, pos] = _draw_ratios(rng, spec, img.size)
        local[img, pos] = ink_boxes(mnist_images, source[img, pos], ratio[img, pos])
        pending = _place(rng, pending, counts, local, placed, spec, ratio)
    else:
        if pending.size:
            raise RuntimeError(
                f"could not place {spec.counts} non-overlapping digits on a {size}x{size} "
                f"canvas for {pending.size} image(s) after {MAX_ROUNDS} redraws; "
                "use a larger canvas or smaller counts"
            )

    images = paste(mnist_images, source, ratio, local, placed, active, size, spec.overlap)
    boxes = placed.astype(np.float32)
    boxes[~active] = np.nan
    labels = np.where(active, mnist_labels[np.maximum(source, 0)].astype(np.int64), -1)
    # The scaled frame starts _MARGIN pixels into its patch (see _render); the patch origin on
    # the canvas is the placed ink box minus the ink box inside the patch.
    corner = placed[..., :2] - local[..., :2] + _MARGIN
    side = DIGIT * ratio[..., None]
    frame_boxes = np.concatenate([corner, corner + side], axis=-1).astype(np.float32)
    frame_boxes[~active] = np.nan
    return MultiMnist(images, counts, boxes, labels, source, spec, frame_boxes)


def _draw_ratios(rng: np.random.Generator, spec: MultiMnistSpec, m: int) -> np.ndarray:
    """Draw ``m`` size ratios ``1/s``.

    Scales whose 28x28 frame would not fit the canvas (or are not positive) are redrawn; with
    the default N(1.3, 0.1^2) on a 50 px canvas that needs s < 0.56, which never happens.
    """
    if not spec.rescale:
        return np.ones(m)
    s = rng.normal(spec.scale_mean, spec.scale_sd, size=m)
    min_scale = DIGIT / spec.canvas
    for _ in range(100):
        bad = np.flatnonzero(s < min_scale)
        if bad.size == 0:
            return 1.0 / s
        s[bad] = rng.normal(spec.scale_mean, spec.scale_sd, size=bad.size)
    raise RuntimeError(
        f"could not draw scales >= {min_scale:.3f} from N({spec.scale_mean}, {spec.scale_sd}^2)"
    )


def _place(
    rng: np.random.Generator,
    pending: np.ndarray,
    counts: np.ndarray,
    local: np.ndarray,
    placed: np.ndarray,
    spec: MultiMnistSpec,
    ratio: np.ndarray,
) -> np.ndarray:
    """Rejection-sample integer offsets for the digits of ``pending`` images, in place.

    Slot k of every pending image is placed at once; each try draws a uniform offset that keeps
    the ink box (``spec.placement == "frame"``: also the whole frame) on the canvas and accepts
    it if the box is disjoint from slots 0..k-1 (always, with ``spec.overlap``). Returns the
    images that ran out of tries (their slots are to be redrawn).
    """
    size = spec.canvas
    failed = np.zeros(pending.size, dtype=bool)
    for k in range(int(counts[pending].max(initial=0))):
        todo = np.flatnonzero((counts[pending] > k) & ~failed)
        for _ in range(MAX_POSITION_TRIES):
            if todo.size == 0:
                break
            img = pending[todo]
            box = local[img, k]
            # Offsets (patch origins) range over every position with the whole ink box on the
            # canvas; with "frame", also the whole frame, which starts _MARGIN into its patch.
            lo_x, hi_x = -box[:, 0], size - box[:, 2]
            lo_y, hi_y = -box[:, 1], size - box[:, 3]
            if spec.placement == "frame":
                side = np.ceil(DIGIT * ratio[img, k] - 1e-6).astype(np.int64)
                lo_x, lo_y = np.maximum(lo_x, -_MARGIN), np.maximum(lo_y, -_MARGIN)
                hi_x = np.minimum(hi_x, size - _MARGIN - side)
                hi_y = np.minimum(hi_y, size - _MARGIN - side)
            dx = rng.integers(lo_x, hi_x, endpoint=True)
            dy = rng.integers(lo_y, hi_y, endpoint=True)
            cand = box + np.stack([dx, dy, dx, dy], axis=1)
            prev = placed[img, :k]  # (m, k, 4)
            # Half-open boxes intersect iff they overlap on both axes.
            hit = (
                (cand[:, None, 0] < prev[..., 2])
                & (prev[..., 0] < cand[:, None, 2])
                & (cand[:, None, 1] < prev[..., 3])
                & (prev[..., 1] < cand[:, None, 3])
            ).any(axis=1) & (not spec.overlap)
            placed[img[~hit], k] = cand[~hit]
            todo = todo[hit]
        failed[todo] = True
    return pending[failed]


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


# ---------------------------------------------------------------------------------------------
# Disk cache


def default_cache_dir() -> Path:
    """``$AIR_CACHE_DIR`` if set, else ``<project root>/.cache/multi_mnist``."""
    env = os.environ.get("AIR_CACHE_DIR", "")
    return Path(env).expanduser() if env else PROJECT_ROOT / ".cache" / "multi_mnist"


def cache_folder(cache_dir: str | os.PathLike[str] | None) -> Path:
    """The folder of generated sets: ``cache_dir`` if given, else :func:`default_cache_dir`."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def cache_file(spec: MultiMnistSpec, cache_dir: str | os.PathLike[str] | None) -> Path:
    """Where :func:`load_or_generate` caches the set of ``spec``."""
    return cache_folder(cache_dir) / f"multi_mnist-{spec.split}-{spec.n_images}-{spec.key()}.npz"


def load_or_generate(
    spec: MultiMnistSpec,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> MultiMnist:
    """Return the data set for ``spec``, from the disk cache when a valid copy is there.

    The cache file is named after :meth:`MultiMnistSpec.key`, so any change to the spec (or to
    :data:`GENERATOR_VERSION`) generates anew. The file embeds a sha256 of its arrays; a
    truncated or corrupt file is logged as a warning and rebuilt. MNIST (from ``data_dir``, see
    :func:`bench.data.mnist.load_mnist`) is read only when generating.
    """

    def build() -> MultiMnist:
        return generate(spec, *load_mnist(spec.split, data_dir))

    return load_or_build(
        cache_file(spec, cache_dir),
        read=lambda path: _read_cache(path, spec),
        build=build,
        write=_write_cache,
        logger=logger,
        what=f"{spec.n_images} multi-MNIST images ({spec.split}, counts {spec.counts})",
    )


def _cache_meta(spec: MultiMnistSpec) -> dict:
    return {"version": GENERATOR_VERSION, "spec": spec.to_dict()}


def _write_cache(path: Path, data: MultiMnist) -> None:
    arrays = {name: getattr(data, name) for name in _ARRAYS}
    write_arrays(path, arrays, _ARRAYS, _cache_meta(data.spec))


def _read_cache(path: Path, spec: MultiMnistSpec) -> MultiMnist:
    return MultiMnist(spec=spec, **read_arrays(path, _ARRAYS, _cache_meta(spec)))
