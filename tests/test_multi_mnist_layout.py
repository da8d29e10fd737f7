"""The layout options of multi-MNIST: `placement` (ink / frame) and `overlap`.

`placement: frame` is Pyro's rule (the whole rescaled 28x28 frame on the canvas); with it our
NVIL learns to count at Pyro's speed (docs/pyro_parity.md), so the experiments use it. These
tests pin what each option means, that the default layout keeps the data (and cache keys) of
earlier versions, and that the data-set plugin passes the options to both splits.
"""

from __future__ import annotations

import numpy as np
import pytest

from bench.config import DataConfig
from bench.data import digit_render
from bench.data.datasets.multi_mnist import spec_of
from bench.data.multi_mnist import MultiMnist, MultiMnistSpec, generate
from bench.data.registry import DatasetError, get_dataset
from tests.test_multi_mnist import _check_consistent


def _active(data: MultiMnist) -> np.ndarray:
    return np.arange(data.spec.max_count)[None, :] < data.counts[:, None]


def test_default_layout_keeps_earlier_keys() -> None:
    # Keys taken from the generator before the layout options existed (commit 2955f0f): the
    # default layout must leave every earlier data set, and its cache file, where it was.
    assert MultiMnistSpec(10, "train").key() == "2d6c9be6cb14615e"
    assert MultiMnistSpec(100, "train", placement="ink", overlap=False).key() == (
        MultiMnistSpec(100, "train").key()
    )
    keys = {
        MultiMnistSpec(100, "train", placement=p, overlap=o).key()
        for p in ("ink", "frame")
        for o in (False, True)
    }
    assert len(keys) == 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"placement": "edge"}, "placement must be one of"), ({"overlap": 1}, "overlap must be")],
)
def test_layout_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MultiMnistSpec(10, "train", **kwargs)


def test_frame_placement_keeps_whole_frames_on_the_canvas(
    mnist_test: tuple[np.ndarray, np.ndarray],
) -> None:
    frame = generate(MultiMnistSpec(600, "test", placement="frame"), *mnist_test)
    _check_consistent(frame, mnist_test[1])  # ink boxes still tight and disjoint
    boxes = frame.frame_boxes[_active(frame)]
    assert boxes[:, :2].min() >= 0 and boxes[:, 2:].max() <= frame.spec.canvas
    # The default ("ink") lets frames hang over the edges, which is what "frame" forbids.
    ink = generate(MultiMnistSpec(600, "test"), *mnist_test)
    outside = ink.frame_boxes[_active(ink)]
    assert (outside[:, :2] < 0).any() and (outside[:, 2:] > ink.spec.canvas).any()

    # Digits sit further from the edges: a narrower spread of ink-box centres.
    def centre_sd(d: MultiMnist) -> float:
        b = d.boxes[_active(d)]
        return float(((b[:, 0] + b[:, 2]) / 2).std())

    assert centre_sd(frame) < centre_sd(ink) - 1.0


def test_overlap_merges_ink_by_maximum(mnist_test: tuple[np.ndarray, np.ndarray]) -> None:
    images, _ = mnist_test
    data = generate(
        MultiMnistSpec(400, "test", counts=(2,), placement="frame", overlap=True), *mnist_test
    )
    b = data.boxes
    hit = (
        (b[:, 0, 0] < b[:, 1, 2])
        & (b[:, 1, 0] < b[:, 0, 2])
        & (b[:, 0, 1] < b[:, 1, 3])
        & (b[:, 1, 1] < b[:, 0, 3])
    )
    assert hit.sum() > 20, "independent placement should overlap some pairs of digits"
    # Rebuild each image digit by digit: every image is the pixelwise max of its two digits.
    src = data.source_index.reshape(-1)
    ratio = ((data.frame_boxes[..., 2] - data.frame_boxes[..., 0]) / digit_render.DIGIT).reshape(-1)
    local = digit_render.ink_boxes(images, src, ratio.astype(np.float64))
    origin = b.reshape(-1, 4)[:, :2].astype(np.int64) - local[:, :2]
    c = data.spec.canvas
    layers = np.zeros((len(src), c, c), dtype=np.uint8)
    for idx, patch in digit_render.rendered(images, src, ratio.astype(np.float64)):
        for j, i in enumerate(idx):
            p = patch[j]
            r, q = np.nonzero(p)
            layers[i, origin[i, 1] + r, origin[i, 0] + q] = p[r, q]
    # The scale comes back from the float32 frame box, not bit-exact: a rendered pixel may then
    # differ by one intensity level; a sum instead of a max differs by far more.
    per_digit = layers.reshape(len(data), 2, c, c).astype(np.int16)
    got = data.images.astype(np.int16)
    assert np.abs(got - per_digit.max(axis=1)).max() <= 1
    assert np.abs(got - per_digit.sum(axis=1).clip(0, 255)).max() > 50


def test_plugin_passes_the_layout_to_both_splits() -> None:
    cfg = DataConfig(params={"placement": "frame", "overlap": True})
    for split in ("train", "test"):
        spec = spec_of(cfg, 50, split)
        assert (spec.placement, spec.overlap) == ("frame", True)
    assert spec_of(DataConfig(), 50, "train").placement == "ink"
    dataset = get_dataset("multi_mnist")
    with pytest.raises(DatasetError, match=r"data.params.placment.*did you mean 'placement'"):
        dataset.validate(DataConfig(params={"placment": "frame"}), 50)
    with pytest.raises(DatasetError, match=r"data.params.overlap: expected a bool"):
        dataset.validate(DataConfig(params={"overlap": "yes"}), 50)
