"""Look up estimators by name and build them from config."""

from __future__ import annotations

import difflib
from typing import Any

from implementations.core.estimators import ESTIMATORS, Estimator
from implementations.core.model import AIR


def build_estimator(est_cfg: Any, model: AIR) -> Estimator:
    """The estimator named by `est_cfg.name`, with its `params` validated by the estimator."""
    name = est_cfg.name
    if name not in ESTIMATORS:
        guess = difflib.get_close_matches(name, list(ESTIMATORS), n=1)
        hint = f"; did you mean {guess[0]!r}?" if guess else ""
        raise ValueError(
            f"estimator.name: unknown estimator {name!r}{hint} (registered: {sorted(ESTIMATORS)})"
        )
    cls = ESTIMATORS[name]
    return cls(model, cls.parse_params(dict(est_cfg.params)))
