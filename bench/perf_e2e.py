"""`python -m bench.perf --end-to-end`: a short real grid through run_all.py, timed whole.

    python -m bench.perf --end-to-end -v air_nvil_fixed --seeds 0-3 --group-size 4
    python -m bench.perf --end-to-end --profile cpu -v air_nvil_fixed train.iterations=300

It runs run_all.py's own `main` in this process (`--cluster debug`: one job after another, as
`run_all.py --cluster debug` does) on a fresh results folder under `--out`, and reports the
grid's seed-iterations per second over the whole wall time (start-up, data, training, periodic
and final evaluations, checkpoints, result files and the report), with the time spent in
evaluations (from each run's result.json: `evaluation_s` periodic, `final_evaluation_s` final,
summed over the runs; a seed group's vectorised evaluations are shared among its seeds, so the
sum is the time spent), in checkpoints and in the training loops (`RunLoop.run`,
`GroupLoop.run`: the periodic evaluations and checkpoints are inside them), each as a share of
the wall time. Writes `perf_e2e.json` beside perf.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from bench.group_loop import GroupLoop
from bench.provenance import device_name
from bench.run_folder import RESULT, TIME_FIELDS, read_result
from bench.storage import atomic_write_json
from bench.train_loop import RunLoop
from bench.trainer import Trainer

TIMED: dict[str, list[tuple[type, str]]] = {
    "checkpoint_s": [(Trainer, "save_checkpoint")],
    "training_loop_s": [(RunLoop, "run"), (GroupLoop, "run")],
}


@contextmanager
def _clocks(totals: dict[str, float]) -> Iterator[None]:
    """Adds the seconds spent in each method of TIMED to `totals` (outermost calls only)."""
    saved: list[tuple[type, str, Callable]] = []
    for key, methods in TIMED.items():
        totals[key] = 0.0
        depth = [0]
        for cls, name in methods:
            real = getattr(cls, name)
            saved.append((cls, name, real))
            setattr(cls, name, _timed(real, key, totals, depth))
    try:
        yield
    finally:
        for cls, name, real in saved:
            setattr(cls, name, real)


def _timed(real: Callable, key: str, totals: dict[str, float], depth: list[int]) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        depth[0] += 1
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                totals[key] += time.perf_counter() - start

    return wrapper


def evaluation_seconds(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds in periodic and final evaluations, and both, summed over the runs' result
    records (runs without the fields, from before they were recorded, count 0)."""
    periodic, final = (sum(float(r.get(k) or 0.0) for r in runs) for k in TIME_FIELDS[1:])
    return {"periodic_evaluation_s": periodic, "final_evaluation_s": final,
            "evaluation_s": periodic + final}  # fmt: skip


def grid_argv(variants: list[str], args: argparse.Namespace, results: Path) -> list[str]:
    """The run_all.py command line of the timed grid."""
    argv = ["--cluster", "debug", "--profile", args.profile, "--seeds", args.seeds,
            "--group-size", str(args.group_size), "--results", str(results),
            "--reports", str(results.parent / "e2e_reports"), "--no-progress",
            "--device", args.device]  # fmt: skip
    if variants:
        argv += ["--variants", ",".join(variants)]
    if args.threads:
        argv.append(f"train.threads={args.threads}")
    return [*argv, *args.overrides]


def end_to_end(variants: list[str], args: argparse.Namespace, out: Path) -> int:
    """Run the grid, print and write (`out/perf_e2e.json`) its end-to-end figures."""
    from bench.launcher import main as run_all_main

    results = out / "e2e_results"
    shutil.rmtree(results, ignore_errors=True)
    shutil.rmtree(out / "e2e_reports", ignore_errors=True)
    argv = grid_argv(variants, args, results)
    totals: dict[str, float] = {}
    start = time.perf_counter()
    with _clocks(totals):
        code = run_all_main(argv)
    wall = time.perf_counter() - start
    runs = [read_result(path.parent)[0] or {} for path in sorted(results.rglob(RESULT))]
    seed_iterations = sum(int(r.get("iterations") or 0) for r in runs)
    totals.update(evaluation_seconds(runs))
    row = {
        "command": "run_all.py " + " ".join(argv),
        "exit_code": code,
        "runs": len(runs),
        "complete": sum(r.get("status") == "complete" for r in runs),
        "seed_iterations": seed_iterations,
        "wall_s": wall,
        "seed_iterations_per_s": seed_iterations / wall if wall > 0 else 0.0,
        **totals,
        **{
            k.removesuffix("_s") + "_share": v / wall if wall > 0 else 0.0
            for k, v in totals.items()
        },
        "device": device_name(torch.device(args.device)),
        "torch": torch.__version__,
    }
    atomic_write_json(out / "perf_e2e.json", row)
    print(json.dumps(row, indent=2))
    shares = [row[k + "evaluation_share"] for k in ("", "periodic_", "final_")]
    print("evaluation: {:.1%} of the wall time (periodic {:.1%}, final {:.1%})".format(*shares))
    if code != 0:
        print(f"run_all.py exited with {code}; see the log above")
    return code
