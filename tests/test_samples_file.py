"""The run's samples file (bench/samples_file.py) and the report's reconstructions drawn from it,
without a model."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from bench.report.samples import variant_samples
from bench.samples_file import N_IMAGES, SAMPLES_FILE, read_samples, write_samples
from implementations.core.model import AIR, ModelConfig


def _test_set(n: int = 30) -> SimpleNamespace:
    rng = np.random.default_rng(0)
    boxes = np.full((n, 3, 4), np.nan, np.float32)
    boxes[:, 0] = [5, 5, 25, 25]
    return SimpleNamespace(images=(rng.random((n, 50, 50)) * 255).astype(np.uint8),
                           counts=np.arange(n) % 3, boxes=boxes)  # fmt: skip


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SimpleNamespace]:
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("run")
    test = _test_set()
    assert write_samples(run, AIR(ModelConfig()), test, 0.01, 7) == run / SAMPLES_FILE
    return run, test


def test_round_trip(written: tuple[Path, SimpleNamespace]) -> None:
    run, test = written
    s = read_samples(run)
    assert s is not None and s.iteration == 7
    assert len(s.index) == N_IMAGES and set(s.true_counts) == {0, 1, 2}  # every count shows
    np.testing.assert_array_equal(s.images, test.images[s.index] / np.float32(255))
    np.testing.assert_array_equal(s.true_counts, test.counts[s.index])
    assert s.reconstructions.shape == (N_IMAGES, 50, 50) and s.boxes.shape == (N_IMAGES, 3, 4)
    np.testing.assert_array_equal(s.counts, s.on.sum(1))  # a count is the steps that are on
    assert [len(b) for b in s.present_boxes()] == list(s.counts)
    assert (run / SAMPLES_FILE).stat().st_size < 300_000


def test_missing_and_damaged(tmp_path: Path) -> None:
    assert read_samples(tmp_path) is None
    (tmp_path / SAMPLES_FILE).write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=SAMPLES_FILE):
        read_samples(tmp_path)


def test_report_draws_from_the_file_only(written: tuple[Path, SimpleNamespace]) -> None:
    run, _ = written
    rows = pd.DataFrame([
        {"variant": "v", "seed": 0, "status": "complete", "outcome": "converged",
         "run_dir": str(run)},
        {"variant": "v", "seed": 1, "status": "complete", "outcome": "not_converged",
         "run_dir": str(run.parent / "old_run_without_samples")},
    ])  # fmt: skip
    drawn = variant_samples(rows)
    assert drawn.uri is not None and drawn.uri.startswith("data:image/png;base64,")
    assert drawn.notes == [
        "failed seed 1: no samples recorded (run finished before runs wrote samples.npz)"
    ]
