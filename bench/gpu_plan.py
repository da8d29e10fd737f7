"""Sizing a grid for one GPU: seeds per group from free memory, and the expected wall time.

`group_size: 0` in a profile (or `--group-size 0`) asks the launcher to choose: as many seeds of
one config per job as the device's free memory holds at `SEED_GB` each, at most all of them.
Before anything starts the plan also prints the grid's expected wall time, from the newest
end-to-end measurement of this device (`python -m bench.perf --end-to-end`, which writes
`<results>/perf/perf_e2e.json`); without one it says how to get one rather than guess.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: GPU memory one seed of a group may need, in GB: NVIL AIR at batch 64 peaked at 10.8 GB for
#: 64 seeds on an H200 (~0.17 GB per seed, ../shared/docs/GPU_NOTES.md); VIMCO's K=5 samples
#: take ~5 times that. 1 GB covers every variant with room for the allocator's slack.
SEED_GB = 1.0
#: Share of the free memory a group may take (the rest: CUDA context, evaluation batches).
USABLE = 0.8
AUTO = 0


def free_gpu_gb(device: str) -> float | None:
    """Free memory of the CUDA device `device` in GB; None when it is not CUDA or absent."""
    if not device.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return free / 1e9


def auto_group_size(
    seeds_per_config: int, device: str, free_gb: float | None = None
) -> tuple[int, str]:
    """(group size, why) for `group_size: 0`: one run per job off the GPU, else as many seeds of
    a config as fit in the free memory (`free_gb`: measured when None)."""
    free = free_gpu_gb(device) if free_gb is None else free_gb
    if free is None:
        return 1, f"group_size 0 (auto): {device} is not a usable CUDA device, one run per job"
    fits = max(1, math.floor(free * USABLE / SEED_GB))
    size = max(1, min(seeds_per_config, fits))
    return size, (
        f"group_size 0 (auto): {free:.0f} GB free on {device}, ~{SEED_GB:g} GB per seed: "
        f"groups of up to {size} seeds"
    )


def measured_rate(results: Path, device_label: str) -> dict[str, Any] | None:
    """The newest end-to-end measurement (perf_e2e.json) of this device, if any."""
    path = Path(results) / "perf" / "perf_e2e.json"
    try:
        row = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(row, dict) or row.get("device") != device_label:
        return None
    rate = row.get("seed_iterations_per_s")
    if not isinstance(rate, int | float) or rate <= 0:
        return None
    return {**row, "path": str(path)}


def expected_wall_line(iterations: Sequence[int], results: Path, device_label: str) -> str:
    """One line for the plan: the seed-iterations to train and how long they should take here."""
    total = int(sum(iterations))
    found = measured_rate(results, device_label)
    if not total:
        return "expected wall time: nothing to train"
    if found is None:
        return (
            f"expected wall time: unknown ({total:,} seed-iterations to train; no end-to-end "
            f"measurement of {device_label} under {Path(results) / 'perf'}: "
            "python -m bench.perf --end-to-end -d <device> --out <results>/perf gives one)"
        )
    rate = float(found["seed_iterations_per_s"])
    minutes = total / rate / 60
    return (
        f"expected wall time: ~{minutes:.0f} min ({total:,} seed-iterations at {rate:,.0f}/s, "
        f"measured end to end on this device by `{found.get('command', 'bench.perf')}`; the "
        "rate of other variants and group sizes differs)"
    )
