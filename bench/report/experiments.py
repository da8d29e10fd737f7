"""What the report knows of each experiment: the count it is judged on and the paper's figure.

Both come from the experiment's YAML (`configs/experiments/<name>.yaml`: `headline_count`,
`paper`, `paper_source`) as the grid record stored it when the grid was launched
(bench/grid_record.py `experiments_info`), never from today's files: a report of last month's
results keeps last month's headline. An experiment that no record describes (results launched
before records carried it) is judged on the one count its runs test but never train on, read
from a run's config.yaml, with no paper figure; without such a count, on overall accuracy.

`use(records, configs)` is called once at the start of each report build (`build_all`); the
tables below are what the rest of bench/report reads. They are module tables, filled in place,
because every page and figure of one build reads the same ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["HEADLINE", "LABEL", "PAPER", "PAPER_SOURCE", "headline_column", "headline_label", "use"]

#: Generalisation experiments -> the count never seen in training that they are judged on.
HEADLINE: dict[str, int] = {}
#: Experiment -> the paper's headline figure per model family ("AIR", "DAIR"), fractions.
PAPER: dict[str, dict[str, float]] = {}
#: Experiment -> where its `PAPER` figures come from.
PAPER_SOURCE: dict[str, str] = {}
#: Experiment -> the headline in words, as recorded ("count accuracy on 3-digit images").
LABEL: dict[str, str] = {}


def use(records: Iterable[Any], configs: Mapping[str, Mapping[str, Any] | None]) -> None:
    """Fill the tables from the grid records (oldest first: the newest word wins), then from
    `configs` (experiment -> one of its runs' config.yaml as a dict) for the experiments no
    record describes."""
    for table in (HEADLINE, PAPER, PAPER_SOURCE, LABEL):
        table.clear()
    described: set[str] = set()
    for record in records:
        for name, info in (getattr(record, "experiments_info", None) or {}).items():
            described.add(name)
            HEADLINE.pop(name, None)
            if info.get("headline_count") is not None:
                HEADLINE[name] = int(info["headline_count"])
            PAPER[name] = {str(k): float(v) for k, v in (info.get("paper") or {}).items()}
            PAPER_SOURCE[name] = str(info.get("paper_source") or "")
            if info.get("headline_label"):
                LABEL[name] = str(info["headline_label"])
    for name, config in configs.items():
        if name in described or not config:
            continue
        unseen = _unseen_count(config)
        if unseen is not None:
            HEADLINE[name] = unseen


def _unseen_count(config: Mapping[str, Any]) -> int | None:
    data = config.get("data") or {}
    train, test = data.get("train_counts") or [], data.get("test_counts") or []
    unseen = sorted(set(test) - set(train))
    return int(unseen[0]) if len(unseen) == 1 else None


def headline_column(experiment: str) -> str:
    """The accuracy a variant is judged by: overall, or on the unseen count."""
    k = HEADLINE.get(experiment)
    return "final_count_accuracy" if k is None else f"final_count_accuracy_{k}"


def headline_label(experiment: str) -> str:
    """The headline in words."""
    if experiment in LABEL:
        return LABEL[experiment]
    k = HEADLINE.get(experiment)
    return "final count accuracy" if k is None else f"count accuracy on {k}-digit images"
