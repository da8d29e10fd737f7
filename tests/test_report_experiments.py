"""The report's headline and paper figures come from the grid records, not from its own copies."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from bench.report import experiments
from bench.report.measures import GENERALISATION
from bench.report.summary import PAPER_GENERALISATION, experiment_order, headline_column


@pytest.fixture(autouse=True)
def _cleared() -> Iterator[None]:
    yield
    experiments.use([], {})  # leave no tables behind (a report build fills its own anyway)


def _record(info: dict) -> SimpleNamespace:
    return SimpleNamespace(experiments_info=info)


def test_records_give_headline_label_and_paper_newest_last() -> None:
    old = _record({"extrapolation": {"headline_count": 3, "paper": {"AIR": 0.0}}})
    new = _record({
        "extrapolation": {"headline_count": 3, "paper": {"AIR": 0.1, "DAIR": 0.8},
                          "paper_source": "a source", "headline_label": "on 3 squares"},
        "count": {"headline_count": None, "paper": {}},
    })  # fmt: skip
    experiments.use([old, new], {})
    assert GENERALISATION == {"extrapolation": 3}  # the tables the report reads, filled in place
    assert PAPER_GENERALISATION["extrapolation"] == {"AIR": 0.1, "DAIR": 0.8}
    assert experiments.PAPER_SOURCE["extrapolation"] == "a source"
    assert experiments.headline_label("extrapolation") == "on 3 squares"
    assert headline_column("extrapolation") == "final_count_accuracy_3"
    assert headline_column("count") == "final_count_accuracy"


def test_unrecorded_experiments_judged_on_the_count_their_runs_never_train_on() -> None:
    configs = {
        "interp_old": {"data": {"train_counts": [0, 1, 3], "test_counts": [0, 1, 2, 3]}},
        "plain": {"data": {"train_counts": [0, 1, 2], "test_counts": [0, 1, 2]}},
        "two_new": {"data": {"train_counts": [0], "test_counts": [0, 1, 2]}},
        "unreadable": None,
    }
    experiments.use([], configs)
    assert GENERALISATION == {"interp_old": 2}
    assert experiments.PAPER == {}  # no paper figure without a record that gives one
    assert experiments.headline_label("interp_old") == "count accuracy on 2-digit images"
    # A recorded experiment keeps its record's word even when its configs say otherwise.
    experiments.use([_record({"interp_old": {"headline_count": None}})], configs)
    assert GENERALISATION == {}


def test_reading_order_puts_generalisation_last_by_unseen_count() -> None:
    experiments.use(
        [_record({"extrapolation": {"headline_count": 3}, "interpolation": {"headline_count": 2}})],
        {},
    )
    order = experiment_order(["extrapolation", "representation", "interpolation", "count"])
    assert order == ["count", "representation", "interpolation", "extrapolation"]
