"""Why a run did not converge: one class per failed run, from what the run left on disk.

The rules, applied in this order to every finished run that did not converge:

1. crashed         status "error" or "timeout": the run stopped before finishing.
2. diverged        outcome "diverged": the loss or the gradient became NaN or infinite.
3. unknown         complete, but no final metrics to judge by (an old or damaged result file).
4. not sustained   the final evaluation reached the target accuracy, but the periodic
                   evaluations did not hold it over the last `converged_evals` ones: a near miss
                   or an oscillating run, not a counting failure.
5. blank objects   counts are mostly right (final count accuracy >= BLANK_MIN_ACCURACY) but the
                   inferred boxes do not sit on the digits (matched box IoU < BLANK_MAX_IOU): the
                   steps that are on draw blank or smeared objects while one step explains
                   several digits. Box IoU pairs every true digit with at most one inferred box,
                   so a blank step leaves a digit unmatched or badly matched.
6. over-counting   most miscounted test images (final confusion matrix, above the diagonal) got
                   more objects than they have: the failure the published NVIL runs show.
7. under-counting  most miscounted images got fewer objects (below the diagonal), e.g. a
                   presence prior so strong that steps switch off, or one step per two digits.
   When the two are equal, the mean inferred count against the true mean breaks the tie.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

CRASHED = "crashed"
DIVERGED = "diverged"
UNKNOWN = "unknown"
NOT_SUSTAINED = "not sustained"
BLANK = "blank objects"
OVER = "over-counting"
UNDER = "under-counting"
KINDS = (OVER, UNDER, BLANK, NOT_SUSTAINED, DIVERGED, CRASHED, UNKNOWN)  # table column order

BLANK_MIN_ACCURACY = 0.5  # "counts mostly right" ...
BLANK_MAX_IOU = 0.3  # ... "but the boxes are not on the digits"
TRACEBACK_LINES = 12  # lines of a crash's traceback shown on the page


@dataclass
class Failure:
    kind: str  # one of KINDS
    evidence: str  # one line of numbers that justify the class


def parse_confusion(value: Any) -> np.ndarray | None:
    """A confusion matrix from a JSON string or nested lists; None when absent or malformed."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    try:
        m = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.size == 0:
        return None
    return m


def _num(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def classify(row: dict[str, Any] | Any) -> Failure:
    """The failure class of one finished, not converged run (a `runs` row or a dict)."""
    get = row.get
    status, outcome = get("status"), get("outcome")
    if status in ("error", "timeout"):
        return Failure(CRASHED, f"status {status}")
    if outcome == "diverged":
        at = _num(get("diverged_at"))
        return Failure(
            DIVERGED, "non-finite loss" + (f" at iteration {at:,.0f}" if at == at else "")
        )
    acc = _num(get("final_count_accuracy"))
    iou = _num(get("final_box_iou"))
    mean_count = _num(get("final_mean_count"))
    target = _num(get("converged_accuracy"))
    confusion = parse_confusion(get("final_confusion"))
    if confusion is None and math.isnan(acc):
        return Failure(UNKNOWN, "no final metrics in result.json")
    if not math.isnan(acc) and not math.isnan(target) and acc >= target:
        return Failure(NOT_SUSTAINED, f"final accuracy {acc:.3f} >= {target:.2f}, not sustained")
    if acc >= BLANK_MIN_ACCURACY and iou < BLANK_MAX_IOU:  # False when either is NaN
        return Failure(BLANK, f"count accuracy {acc:.3f} but box IoU {iou:.2f}")
    if confusion is None:
        return Failure(UNKNOWN, f"no confusion matrix; final accuracy {acc:.3f}")
    rows, cols = np.indices(confusion.shape)
    over = float(confusion[cols > rows].sum())
    under = float(confusion[cols < rows].sum())
    wrong = over + under
    if wrong == 0:
        return Failure(NOT_SUSTAINED, "no miscounted image in the final evaluation")
    true_mean = float((confusion.sum(axis=1) * np.arange(len(confusion))).sum() / confusion.sum())
    if over > under or (over == under and mean_count > true_mean):
        kind, share = OVER, over / wrong
    else:
        kind, share = UNDER, under / wrong
    evidence = f"{share:.0%} of {wrong:,.0f} miscounted images"
    if not math.isnan(mean_count):
        evidence += f"; mean count {mean_count:.2f} vs {true_mean:.2f} true"
    return Failure(kind, evidence)


def traceback_excerpt(text: Any, lines: int = TRACEBACK_LINES) -> str:
    """The last `lines` non-empty lines of a traceback (where it failed and why)."""
    if not isinstance(text, str) or not text.strip():
        return ""
    kept = [line for line in text.rstrip().splitlines() if line.strip()]
    cut = kept[-lines:]
    return ("...\n" if len(kept) > lines else "") + "\n".join(cut)
