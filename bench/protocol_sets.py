"""Which reference protocols a run's final evaluation covers, and their test sets.

A run config names protocols in `data.reference_protocols` (bench/data/protocols.py): each is
evaluated at the end of the run on the protocol's own test images, unless the run's data set has
no such protocol or its images are not the protocols' kind (0-2 digits on 50x50 canvases): then
the result records why it was skipped. `Trainer.finish` and a seed group's vectorised final
evaluation (bench/group_final.py) both read the plan from here, so they skip the same ones.
"""

from __future__ import annotations

from typing import Any

from bench.config import RunConfig
from bench.data.protocols import reference_mismatch, reference_test_set
from bench.data.registry import get_dataset


def protocol_plan(cfg: RunConfig) -> dict[str, str | None]:
    """Per protocol of `data.reference_protocols`, in order: why it is skipped, or None where
    it is evaluated."""
    out: dict[str, str | None] = {}
    for name in cfg.data.reference_protocols:
        if name not in get_dataset(cfg.data.name).protocols:  # asked for by the variant
            out[name] = f"data set {cfg.data.name!r} has no protocol {name!r}"
        else:
            out[name] = reference_mismatch(cfg.data, cfg.model.canvas)
    return out


def protocol_test_set(cfg: RunConfig, name: str) -> Any:
    """The test images of protocol `name` the final evaluation uses (its first
    eval.final_images)."""
    return reference_test_set(cfg.data, name, n=cfg.eval.final_images, canvas=cfg.model.canvas)
