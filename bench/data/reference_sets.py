"""The multi-MNIST sets the published AIR implementations generated, rebuilt digit for digit.

Each function here replays one reference generator's random stream (numpy's legacy
``RandomState``, which numpy keeps bit-stable) on the MNIST *training* digits, in the same order
of draws, so that the result is the reference's own data set, not a look-alike. Where the
reference published a checksum, :mod:`bench.data.protocols` checks it on every generation.

- **Pyro** (``pyro-ppl/pyro``): ``examples/air/multi_mnist.py`` (Oct 2017) and its successor
  ``pyro/contrib/examples/multi_mnist.py`` (May 2019 on). 60,000 canvases of 50x50; per canvas
  ``randint(3)`` digits; per digit a uniformly drawn training digit, a scale ``s = 0.1 N(0, 1) +
  1.3``, the digit resized with Pillow to a square of side ``w = int(28 / s)`` and its whole
  ``w x w`` frame put at a uniform offset in ``[0, 50 - w)`` (the last row and column are never
  used). Digits are *added*; overlap is allowed unless a summed pixel exceeds 255, in which case
  every digit of that canvas is drawn again. The 2017 script resized with ``scipy.misc.imresize``
  (bilinear; seed 681307, checksum of all pixels 884438093); the 2019 one with
  ``PIL.Image.resize``'s default, which was nearest-neighbour before Pillow 7 (checksum
  883114919, left in its source as a comment) and is bicubic since.
- **aakhundov** (``aakhundov/tf-attend-infer-repeat``, ``multi_mnist.py`` as of Oct 2017, the
  version behind its README's results): seed 0; the training digits are taken in the order of a
  random permutation (re-permuted when used up), each cropped to its ink and never rescaled;
  20,000 canvases with 0, with 1 and with 2 digits; each digit gets up to 100 uniform positions
  with the crop on the canvas, accepted when no ink pixel falls on an ink pixel already there
  (boxes may overlap), else the canvas starts over with the next digits. The 60,000 canvases are
  shuffled and the first 1,000 are its test set.

Ground truth is derived here, the references store only counts and labels: ``boxes`` is each
digit's tight ink box, ``frame_boxes`` the square frame it was drawn in (Pyro: the resized
``w x w`` frame; aakhundov: the digit's original 28x28 frame, of which only the crop is pasted).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["aakhundov_set", "pyro_set"]

#: Side of the canvases every reference uses.
CANVAS = 50
#: Side of the MNIST digits.
DIGIT = 28
#: Most digits on a reference canvas.
MAX_DIGITS = 2
#: aakhundov: position draws per digit before the canvas starts over.
_POSITION_TRIES = 100
#: aakhundov: fresh starts of one canvas before giving up (the reference loops for ever).
_MAX_RESTARTS = 1000
#: Pyro resize filters by name (Pillow's constants).
_FILTERS = ("bilinear", "nearest", "bicubic")


def pyro_set(
    mnist_images: np.ndarray,
    mnist_labels: np.ndarray,
    *,
    seed: int,
    n_images: int,
    resample: str,
    size_rule: str,
) -> dict[str, np.ndarray]:
    """The first ``n_images`` canvases of Pyro's generator (see the module docstring).

    ``resample`` is ``"bilinear"`` (``scipy.misc.imresize``, 2017), ``"nearest"`` or
    ``"bicubic"`` (``PIL.Image.resize``'s default before / since Pillow 7). ``size_rule`` is how
    the side was computed: ``"scipy"`` (``int(28 * (1 / s))``, float64 as ``imresize`` did) or
    ``"int"`` (``int(28 / s)``). The canvases do not depend on ``n_images`` beyond their number:
    a shorter run is a prefix of a longer one.

    Returns arrays ``images`` (uint8 ``(n, 50, 50)``), ``counts``, ``labels``, ``source_index``
    (index in the training split, -1 where absent), ``boxes`` and ``frame_boxes`` (float32
    ``(n, 2, 4)``, ``x0, y0, x1, y1`` with exclusive ends, NaN where absent).
    """
    _check_mnist(mnist_images, mnist_labels)
    if resample not in _FILTERS:
        raise ValueError(f"resample must be one of {list(_FILTERS)}, got {resample!r}")
    if size_rule not in ("scipy", "int"):
        raise ValueError(f"size_rule must be 'scipy' or 'int', got {size_rule!r}")
    image_module = _pillow()
    filt = {
        "bilinear": image_module.Resampling.BILINEAR,
        "nearest": image_module.Resampling.NEAREST,
        "bicubic": image_module.Resampling.BICUBIC,
    }[resample]

    rs = np.random.RandomState(seed)
    out = _empty(n_images)
    k_digits = len(mnist_images)
    for j in range(n_images):
        count = rs.randint(MAX_DIGITS + 1)
        while True:
            canvas = np.zeros((CANVAS, CANVAS))  # float64 sum, as the reference checks it
            drawn: list[tuple[int, int, int, int, np.ndarray]] = []
            for _ in range(count):
                index = rs.randint(k_digits)
                s = 0.1 * rs.randn() + 1.3
                w = int(DIGIT * (1.0 / s)) if size_rule == "scipy" else int(DIGIT / s)
                if not 0 < w < CANVAS:
                    raise RuntimeError(f"scale {s} gives a {w}px digit: not placeable on 50px")
                digit = image_module.fromarray(mnist_images[index]).resize((w, w), resample=filt)
                patch = np.asarray(digit, dtype=np.uint8)
                y = rs.randint(0, CANVAS - w)  # rows first: the reference pads axis 0 first
                x = rs.randint(0, CANVAS - w)
                canvas[y : y + w, x : x + w] += patch
                drawn.append((index, x, y, w, patch))
            if canvas.max() <= 255:
                break
        out["images"][j] = canvas.astype(np.uint8)
        out["counts"][j] = count
        for k, (index, x, y, w, patch) in enumerate(drawn):
            _record(out, j, k, index, mnist_labels, _ink_box(patch, x, y), (x, y, x + w, y + w))
    return out


def aakhundov_set(
    mnist_images: np.ndarray,
    mnist_labels: np.ndarray,
    *,
    seed: int = 0,
    images_per_count: int = 20000,
    test_size: int = 1000,
) -> dict[str, np.ndarray]:
    """aakhundov's test set: the first ``test_size`` of its shuffled canvases (module docstring).

    Arrays as :func:`pyro_set` returns, plus ``set_index`` (int64 ``(test_size,)``): each
    canvas's position in the unshuffled set (0-digit canvases first, then 1, then 2).
    """
    _check_mnist(mnist_images, mnist_labels)
    if not 0 < test_size <= 3 * images_per_count:
        raise ValueError(
            f"test_size must be in 1..{3 * images_per_count} (3 x images_per_count), "
            f"got {test_size}"
        )
    crops = [_crop(d) for d in mnist_images]  # (x0, y0, ink patch) per training digit
    rs = np.random.RandomState(seed)
    digits = _DigitStream(rs, len(mnist_images))

    canvases: list[list[tuple[int, int, int]]] = []  # (digit, x, y) per digit, per canvas
    for count in range(MAX_DIGITS + 1):
        for _ in range(images_per_count):
            canvases.append(_aakhundov_canvas(count, crops, rs, digits) if count else [])
    perm = rs.permutation(len(canvases))[:test_size]

    out = _empty(test_size)
    out["set_index"] = perm.astype(np.int64)
    for j, c in enumerate(perm):
        out["counts"][j] = len(canvases[c])
        for k, (index, x, y) in enumerate(canvases[c]):
            x0, y0, ink = crops[index]
            h, w = ink.shape
            window = out["images"][j, y : y + h, x : x + w]
            # Ink is disjoint, so the maximum is the reference's sum.
            np.maximum(window, ink, out=window)
            frame = (x - x0, y - y0, x - x0 + DIGIT, y - y0 + DIGIT)
            _record(out, j, k, index, mnist_labels, (x, y, x + w, y + h), frame)
    return out


class _DigitStream:
    """The training digits in the order of a random permutation, re-permuted when used up."""

    def __init__(self, rs: np.random.RandomState, n: int) -> None:
        self.rs = rs
        self.order = rs.permutation(n)
        self.next = 0

    def take(self) -> int:
        index = int(self.order[self.next])
        self.next += 1
        if self.next >= len(self.order):  # re-permuted at once, before this digit's own draws
            self.order = self.rs.permutation(self.order)
            self.next = 0
        return index


def _aakhundov_canvas(
    count: int,
    crops: list[tuple[int, int, np.ndarray]],
    rs: np.random.RandomState,
    digits: _DigitStream,
) -> list[tuple[int, int, int]]:
    """Place ``count`` digits as the reference does; start over with new digits on failure."""
    for _ in range(_MAX_RESTARTS):
        ink_mask = np.zeros((CANVAS, CANVAS), dtype=bool)
        placed: list[tuple[int, int, int]] = []
        for i in range(count):
            index = digits.take()
            ink = crops[index][2]
            h, w = ink.shape
            mask = ink > 0
            found = False
            for _ in range(_POSITION_TRIES):
                x = rs.randint(0, CANVAS - w + 1)
                y = rs.randint(0, CANVAS - h + 1)
                # The first digit goes anywhere; later ones must not put ink on ink.
                if i == 0 or not (ink_mask[y : y + h, x : x + w] & mask).any():
                    found = True
                    break
            if not found:
                break
            ink_mask[y : y + h, x : x + w] |= mask
            placed.append((index, x, y))
        if len(placed) == count:
            return placed
    raise RuntimeError(f"could not place {count} digits in {_MAX_RESTARTS} attempts")


def _crop(digit: np.ndarray) -> tuple[int, int, np.ndarray]:
    """``(x0, y0, patch)``: the digit cut to the rows and columns that hold ink."""
    cols = np.flatnonzero(digit.any(axis=0))
    rows = np.flatnonzero(digit.any(axis=1))
    if cols.size == 0:
        raise ValueError("an MNIST digit has no ink")
    return int(cols[0]), int(rows[0]), digit[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _ink_box(patch: np.ndarray, x: int, y: int) -> tuple[int, int, int, int]:
    """Tight ink box of ``patch`` placed with its top-left corner at ``(x, y)``."""
    x0, y0, ink = _crop(patch)
    h, w = ink.shape
    return x + x0, y + y0, x + x0 + w, y + y0 + h


def _empty(n: int) -> dict[str, np.ndarray]:
    return {
        "images": np.zeros((n, CANVAS, CANVAS), dtype=np.uint8),
        "counts": np.zeros(n, dtype=np.int64),
        "boxes": np.full((n, MAX_DIGITS, 4), np.nan, dtype=np.float32),
        "frame_boxes": np.full((n, MAX_DIGITS, 4), np.nan, dtype=np.float32),
        "labels": np.full((n, MAX_DIGITS), -1, dtype=np.int64),
        "source_index": np.full((n, MAX_DIGITS), -1, dtype=np.int64),
    }


def _record(
    out: dict[str, np.ndarray],
    j: int,
    k: int,
    index: int,
    mnist_labels: np.ndarray,
    box: tuple[int, int, int, int],
    frame: tuple[int, int, int, int],
) -> None:
    out["source_index"][j, k] = index
    out["labels"][j, k] = int(mnist_labels[index])
    out["boxes"][j, k] = box
    out["frame_boxes"][j, k] = frame


def _check_mnist(images: np.ndarray, labels: np.ndarray) -> None:
    if images.ndim != 3 or images.shape[1:] != (DIGIT, DIGIT) or images.dtype != np.uint8:
        raise ValueError(
            f"MNIST images must be uint8 (K, 28, 28), got {images.dtype} {images.shape}"
        )
    if labels.shape != images.shape[:1]:
        raise ValueError(f"MNIST labels must be ({len(images)},), got {labels.shape}")


def _pillow() -> Any:
    """``PIL.Image``, which Pyro's generators resized with (Pillow comes with matplotlib)."""
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - matplotlib, a dependency, requires Pillow
        raise ImportError(
            "the pyro and addtt test protocols resize digits with Pillow, as Pyro did: "
            "pip install pillow"
        ) from err
    return Image
