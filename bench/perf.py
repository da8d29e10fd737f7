"""Speed benchmark: ms per training iteration of each variant, and how far from the floor.

    python -m bench.perf                       # every variant, batch 64, this machine's default
    python -m bench.perf --variants air_nvil_fixed --iterations 300 --device cuda
    python -m bench.perf -v air_nvil_fixed -g 1 4 16    # also S seeds trained together
    python -m bench.perf --end-to-end -v air_nvil_fixed --seeds 0-3 --group-size 4

For each variant it prints and writes (JSON and CSV, under `results/perf/` by default): the
median wall time of one training iteration after warm-up, the peak memory, the FLOPs of one
step (counted by torch's FlopCounterMode), the device's measured matrix-multiply throughput
and the ratio of the two, i.e. the time the step would take if it ran at matmul speed.

What is timed is the loop body the runs execute, called as they call it: `RunLoop.iteration`
(bench/train_loop.py: batch, loss, backward, clipping, Adam, divergence check, log sums,
progress) for single runs and `GroupLoop.iteration` (bench/group_loop.py) for seed groups;
evaluations and checkpoints are kept out of this clock by setting their intervals past the
timed iterations. `--end-to-end` (bench/perf_e2e.py) times them too: a short real grid through
run_all.py, as seed-iterations per second of wall time with evaluation's share.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import platform
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.config import RunConfig, load_config
from bench.data.registry import check_loaded, get_dataset
from bench.datasets import Datasets
from bench.evaluate import to_float_images
from bench.overrides import OverrideError, check_overrides
from bench.provenance import device_name
from bench.runtime import keep_freed_memory
from bench.storage import atomic_write_json, atomic_write_text
from bench.train_loop import RunLoop
from bench.trainer import Trainer
from bench.variants import discover

log = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, n: int = 1024, repeats: int = 20) -> float:
    """Measured fp32 matrix-multiply throughput of the device, GFLOP/s."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def count_flops(trainer: Trainer, x: torch.Tensor) -> int:
    """FLOPs of one loss + backward, counted by FlopCounterMode on the eager, dense maths.

    Dense: the sparse image projection is an opaque op to the counter, so it is counted as the
    dense product it replaces; the floor derived from this count is therefore a lower bound on
    time only for the dense algorithm (the sparse one does ~5 % of that product's work).
    """
    model, estimator = trainer.model, trainer.estimator
    sparse = model.cfg.sparse_images
    model.cfg.sparse_images = False
    try:
        with FlopCounterMode(display=False) as counter:
            estimator.loss(model, x, 0.01).loss.backward()
    finally:
        model.cfg.sparse_images = sparse
        trainer.optimiser.zero_grad(set_to_none=True)
    return counter.get_total_flops()


# The timed loops are the real ones; these keep evaluations and checkpoints out of the
# per-iteration clock (the end-to-end mode, bench/perf_e2e.py, times them as they run).
QUIET = ["train.iterations=1000000000", "train.eval_every=1000000000",
         "train.checkpoint_every=1000000000", "train.checkpoint_minutes=1e9",
         "train.progress=false"]  # fmt: skip


def _time_calls(call: Callable[[], None], n: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(n):
        _sync(device)
        t = time.perf_counter()
        call()
        _sync(device)
        times.append(time.perf_counter() - t)
    return times


def benchmark_variant(
    name: str,
    overrides: list[str],
    device: torch.device,
    iterations: int,
    warmup: int,
    data: Datasets,
    scratch: Path,
) -> dict:
    """Time `iterations` training iterations of variant `name` after `warmup` of them.

    An iteration is exactly the run's (`RunLoop.iteration`, what `Trainer._loop` runs: batch
    gather, loss, backward, gradient norm, Adam, divergence check, log sums, progress), so
    `train.compile=true` and every other training setting are timed as they train.
    """
    variant = discover().variants[name]
    folder = scratch / f"loop_{name}"
    shutil.rmtree(folder, ignore_errors=True)
    cfg = variant.run_config(overrides=[f"train.device={device}", *QUIET, *overrides,
                                        f"out_dir={folder}"])  # fmt: skip
    trainer = Trainer(cfg, data=data)  # evaluates and checkpoints nothing here (QUIET)
    trainer.run_dir.mkdir(parents=True, exist_ok=True)
    loop = RunLoop(trainer)
    batch = cfg.train.batch_size
    x = to_float_images(data.train.images[:batch], device)
    compile_start = time.perf_counter()
    loop.iteration()  # with train.compile, this is where compilation happens
    first_step_s = time.perf_counter() - compile_start
    _time_calls(loop.iteration, warmup, device)
    flops = count_flops(trainer, x)
    times = _time_calls(loop.iteration, iterations, device)
    if loop.diverged:
        raise RuntimeError(
            f"{name}: training diverged while timing (iteration {trainer.iteration})"
        )
    shutil.rmtree(folder, ignore_errors=True)
    return {
        "variant": name,
        "batch_size": batch,
        "median_ms": 1000 * statistics.median(times),
        "p10_ms": 1000 * float(np.percentile(times, 10)),
        "p90_ms": 1000 * float(np.percentile(times, 90)),
        "gflop_per_iteration": flops / 1e9,
        "peak_memory_mb": _peak_memory_mb(device),
        "first_step_s": first_step_s,
        "compile": cfg.train.compile,
        "sparse_images": trainer.model.flat_images(x[:1]).sparse,
    }  # fmt: skip


def benchmark_groups(
    name: str,
    overrides: list[str],
    device: torch.device,
    sizes: list[int],
    iterations: int,
    warmup: int,
    data: Datasets,
    scratch: Path,
    csv_path: Path | None = None,
) -> list[dict]:
    """Seed-iterations per second when S seeds of `name` train together: the time of the
    group's iteration as it trains (`GroupLoop.iteration`: gather, noise, vectorised loss,
    backward, per-seed clipping, per-seed Adam, divergence flags and log sums). With
    `csv_path`, the table so far is written after each size (a killed benchmark keeps them)."""
    from bench.group_loop import GroupLoop
    from bench.seedgroup import SeedGroup

    variant = discover().variants[name]
    rows = []
    for size in sizes:
        folder = scratch / f"group_{name}_{size}"
        shutil.rmtree(folder, ignore_errors=True)
        cfgs = [
            variant.run_config(overrides=[f"train.device={device}", *QUIET, *overrides,
                                          f"seed={seed}", f"out_dir={folder}/seed_{seed}"])
            for seed in range(size)
        ]  # fmt: skip
        loop = GroupLoop(SeedGroup(cfgs, data), list(range(size)))
        _time_calls(loop.iteration, warmup, device)
        step = statistics.median(_time_calls(loop.iteration, iterations, device))
        rows.append({"variant": name, "seeds": size, "median_ms_per_step": 1000 * step,
                     "seed_iterations_per_s": size / step,
                     "peak_memory_mb": _peak_memory_mb(device)})  # fmt: skip
        rows[-1]["speedup_vs_first"] = (
            rows[-1]["seed_iterations_per_s"] / rows[0]["seed_iterations_per_s"]
        )
        shutil.rmtree(folder, ignore_errors=True)
        if csv_path is not None:
            atomic_write_text(csv_path, pd.DataFrame(rows).to_csv(index=False))
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.perf",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "-v",
        "--variants",
        nargs="*",
        default=[],
        help="variants to time, comma- or space-separated: a,b or a b (default: every valid "
        "variant)",
    )
    p.add_argument("-d", "--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument(
        "-n", "--iterations", type=int, default=200, help="timed iterations (default: %(default)s)"
    )
    p.add_argument(
        "-w",
        "--warmup",
        type=int,
        default=20,
        help="untimed warm-up iterations (default: %(default)s)",
    )
    p.add_argument("-t", "--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "-o",
        "--out",
        default="results/perf",
        help="folder for perf.json / perf.csv (default: %(default)s)",
    )
    p.add_argument(
        "-g",
        "--group-sizes",
        nargs="*",
        default=[],
        help="also time S seeds trained together, first variant only: 1,4,16 or 1 4 16 "
        "(default: none)",
    )
    p.add_argument(
        "--end-to-end",
        action="store_true",
        help="instead: run a short real grid through run_all.py (in this process, --cluster "
        "debug, a temporary results folder) and report seed-iterations/s end to end, with "
        "evaluation's and checkpoints' share of the wall time (bench/perf_e2e.py)",
    )
    p.add_argument(
        "--seeds", default="0-1", help="--end-to-end: seeds of the grid (default: %(default)s)"
    )
    p.add_argument(
        "--profile", default="smoke", help="--end-to-end: run_all.py profile (default: %(default)s)"
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=1,
        help="--end-to-end: seeds trained together per job (default: %(default)s)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides for every variant, e.g. train.compile=true (default: none)",
    )
    args = p.parse_args(argv)
    # `-v a b train.lr=1e-3`: the list options also swallow the overrides after them.
    for name in ("variants", "group_sizes"):
        words = getattr(args, name)
        args.overrides = [*(w for w in words if "=" in w), *args.overrides]
        setattr(args, name, _split_commas([w for w in words if "=" not in w]))
    try:
        args.group_sizes = [int(g) for g in args.group_sizes]
    except ValueError:
        p.error(f"--group-sizes: expected integers, got {args.group_sizes}")
    try:
        check_overrides(RunConfig, args.overrides, "config override")
    except OverrideError as err:
        p.error(str(err))
    return args


def _split_commas(words: list[str]) -> list[str]:
    """['a,b', 'c'] -> ['a', 'b', 'c']: lists are accepted with commas (as run_all.py takes
    them) or spaces."""
    return [w.strip() for word in words for w in word.split(",") if w.strip()]


def timing_data(base: RunConfig, n_images: int = 2048) -> Datasets:
    """`n_images` training images of the config's data set (`data.name`) to time steps on;
    only `step` runs, so the same images stand in for the test set."""
    dataset = get_dataset(base.data.name)
    sample = dataclasses.replace(base.data, n_train=n_images)
    canvas = base.model.canvas
    images = dataset.load(sample, canvas, "train")
    images = check_loaded(dataset, images, canvas, "train", sample.train_counts)
    return Datasets(train=images, test=images)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu":
        keep_freed_memory()  # as the trainer does
    found = discover()
    names = args.variants or sorted(found.variants)
    unknown = [n for n in names if n not in found.variants]
    if unknown:
        print(
            f"python -m bench.perf: error: unknown or broken variant(s) {unknown}; "
            f"valid: {sorted(found.variants)}",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out)
    if args.end_to_end:
        from bench.perf_e2e import end_to_end

        return end_to_end(names, args, out)
    base = load_config(overrides=args.overrides)
    data = timing_data(base)
    peak = matmul_gflops(device)
    rows = []
    for name in names:
        log.info("timing %s (%d iterations after %d warm-up)", name, args.iterations, args.warmup)
        row = benchmark_variant(name, args.overrides, device, args.iterations, args.warmup, data,
                                out)  # fmt: skip
        row["matmul_gflops"] = peak
        row["floor_ms"] = 1000 * row["gflop_per_iteration"] / peak
        row["ratio_to_floor"] = row["median_ms"] / row["floor_ms"]
        rows.append(row)
    table = pd.DataFrame(rows)
    machine = {"device": device_name(device), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "machine": platform.machine()}  # fmt: skip
    atomic_write_json(out / "perf.json", {"machine": machine, "rows": rows})
    atomic_write_text(out / "perf.csv", table.to_csv(index=False))
    print(f"device: {machine['device']}, torch {machine['torch']}, threads {machine['threads']}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    if args.group_sizes:
        groups = benchmark_groups(names[0], args.overrides, device, args.group_sizes,
                                  args.iterations, args.warmup, data, out,
                                  out / "perf_groups.csv")  # fmt: skip
        group_table = pd.DataFrame(groups)
        print(group_table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
