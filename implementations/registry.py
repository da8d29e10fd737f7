"""Look up estimators by name and build them from config.

Names are those of `implementations.core.estimators.ESTIMATORS`: the core's bare (`nvil`), a
variant folder's qualified by the folder (`air_vimco:vimco`; see `bench/variants.py`, which
imports a folder's code and registers its estimators under those names).
"""

from __future__ import annotations

import difflib
from typing import Any

from implementations.core.estimators import ESTIMATORS, Estimator
from implementations.core.model import AIR


def build_estimator(est_cfg: Any, model: AIR) -> Estimator:
    """The estimator named by `est_cfg.name`, with its `params` validated by the estimator."""
    name = est_cfg.name
    if name not in ESTIMATORS:
        raise ValueError(f"estimator.name: unknown estimator {name!r}{_hint(name)}")
    cls = ESTIMATORS[name]
    return cls(model, cls.parse_params(dict(est_cfg.params)))


def _hint(name: str) -> str:
    """A suggestion and what is registered, for an unknown name."""
    bare = name.partition(":")[2] or name
    qualified = sorted(k for k in ESTIMATORS if k.endswith(f":{bare}") and k != name)
    guess = qualified or difflib.get_close_matches(name, list(ESTIMATORS), n=1)
    hint = f"; did you mean {guess[0]!r}?" if guess else ""
    return (
        f"{hint} (registered: {sorted(ESTIMATORS)}; a variant folder's estimator is named "
        f"'<folder>:<name>')"
    )
