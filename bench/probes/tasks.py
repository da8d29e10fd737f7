"""The downstream tasks and their targets, from the data set's ground truth.

- `sum`: the sum of the digit labels of an image. Every image takes part: an empty image sums
  to 0 and a one-digit image to its digit, so with up to K digits there are 9K + 1 classes
  (0-18 for the count experiment's 0-2 digits).
- `order`: are the digits in ascending order, left to right? Only images with exactly two
  digits take part (0- and 1-digit images have no order and are left out, both from the
  labelled training images and from the test images). Left and right are by the centre of each
  digit's ink box; equal digits count as ascending (non-strict order), so the classes are
  ~55 % ascending and ~45 % not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.data.registry import ObjectImages

TASKS = ("sum", "order")


@dataclass
class Targets:
    """One task's targets over a split: `index` are the images that take part."""

    task: str
    index: np.ndarray  # (M,) int: rows of the split that take part
    y: np.ndarray  # (M,) int64 class of each
    classes: int  # number of classes


def targets(data: ObjectImages, task: str, max_count: int) -> Targets:
    """The targets of `task` on `data`; `max_count` fixes the classes of `sum` (9K + 1), so a
    split that lacks the largest sums still has the same output layer."""
    labels = np.asarray(data.labels)
    counts = np.asarray(data.counts)
    if task == "sum":
        y = np.where(labels >= 0, labels, 0).sum(1).astype(np.int64)
        return Targets(task, np.arange(len(counts)), y, 9 * max_count + 1)
    if task == "order":
        index = np.flatnonzero(counts == 2)
        if len(index) == 0:
            return Targets(task, index, np.zeros(0, np.int64), 2)
        boxes = np.asarray(data.boxes)[index]
        lab = labels[index]
        present = lab >= 0  # the two digits' slots (the generator may pad anywhere)
        slots = np.argsort(~present, axis=1, kind="stable")[:, :2]  # the two present slots
        rows = np.arange(len(index))[:, None]
        centre_x = (boxes[rows, slots, 0] + boxes[rows, slots, 2]) / 2
        two = lab[rows, slots]
        left_first = centre_x[:, 0] <= centre_x[:, 1]
        left = np.where(left_first, two[:, 0], two[:, 1])
        right = np.where(left_first, two[:, 1], two[:, 0])
        return Targets(task, index, (left <= right).astype(np.int64), 2)
    raise ValueError(f"probe task must be one of {list(TASKS)}, got {task!r}")
