"""The speed benchmark runs end to end and writes its table (tiny settings)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import perf
from tests.conftest import TINY, needs_mnist


@needs_mnist
def test_perf_writes_table(tmp_path: Path, data_cache: Path) -> None:
    model = [o for o in TINY if o.startswith("model.")]
    overrides = [*model, "train.batch_size=8", "data.n_train=256", f"data.cache_dir={data_cache}"]
    code = perf.main(["-v", "air_nvil_fixed", "-n", "3", "-w", "1", "-g", "1", "2",
                      "-o", str(tmp_path), *overrides])  # fmt: skip
    assert code == 0
    rows = json.loads((tmp_path / "perf.json").read_text())["rows"]
    assert rows[0]["variant"] == "air_nvil_fixed" and rows[0]["median_ms"] > 0
    assert rows[0]["gflop_per_iteration"] > 0 and rows[0]["ratio_to_floor"] > 0
    groups = (tmp_path / "perf_groups.csv").read_text().splitlines()
    assert len(groups) == 3 and groups[0].startswith("variant,seeds")
