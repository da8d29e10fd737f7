"""Speed benchmark: ms per training iteration of each variant, and how far from the floor.

    python -m bench.perf                       # every variant, batch 64, this machine's default
    python -m bench.perf --variants air_nvil_fixed --iterations 300 --device cuda

For each variant it prints and writes (JSON and CSV, under `results/perf/` by default): the
median wall time of one optimisation step after warm-up, the peak memory, the FLOPs of one
step (counted by torch's FlopCounterMode), the device's measured matrix-multiply throughput
and the ratio of the two, i.e. the time the step would take if it ran at matmul speed.
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
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.config import RunConfig, load_config
from bench.data.registry import check_loaded, get_dataset
from bench.evaluate import to_float_images
from bench.overrides import OverrideError, check_overrides
from bench.provenance import device_name
from bench.runtime import keep_freed_memory
from bench.storage import atomic_write_json, atomic_write_text
from bench.trainer import Datasets, Trainer
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


def benchmark_variant(
    name: str,
    overrides: list[str],
    device: torch.device,
    iterations: int,
    warmup: int,
    data: Datasets,
) -> dict:
    """Time `iterations` optimisation steps of variant `name` after `warmup` steps.

    A step is exactly the trainer's (`Trainer.step`: loss, backward, gradient norm, Adam), so
    `train.compile=true` and every other training setting are timed as they train.
    """
    variant = discover().variants[name]
    cfg = variant.run_config(overrides=[f"train.device={device}", *overrides])
    trainer = Trainer(cfg, data=data)  # evaluates nothing here: only `step` is called
    batch = cfg.train.batch_size
    x_all = to_float_images(data.train.images, device)

    def step(i: int) -> None:
        start = (i * batch) % (len(x_all) - batch)
        trainer.step(x_all[start : start + batch], 0.01)

    compile_start = time.perf_counter()
    step(0)  # with train.compile, this is where compilation happens
    first_step_s = time.perf_counter() - compile_start
    for i in range(warmup):
        step(i)
    flops = count_flops(trainer, x_all[:batch])
    times = []
    for i in range(iterations):
        _sync(device)
        t = time.perf_counter()
        step(i)
        _sync(device)
        times.append(time.perf_counter() - t)
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
        "sparse_images": trainer.model.flat_images(x_all[:1]).sparse,
    }  # fmt: skip


def benchmark_groups(
    name: str,
    overrides: list[str],
    device: torch.device,
    sizes: list[int],
    iterations: int,
    warmup: int,
    out_root: Path,
) -> list[dict]:
    """Seed-iterations per second when S seeds of `name` train together (bench.seedgroup)."""
    from bench.seedgroup import SeedGroup

    variant = discover().variants[name]
    rows = []
    for size in sizes:
        folder = out_root / f"group_{name}_{size}"
        shutil.rmtree(folder, ignore_errors=True)
        cfgs = [
            variant.run_config(overrides=[
                f"train.device={device}", f"train.iterations={warmup + iterations}",
                "train.eval_every=1000000000", "train.checkpoint_every=1000000000",
                "train.checkpoint_minutes=1e9", "train.progress=false", "data.n_test=64",
                *overrides, f"seed={seed}", f"out_dir={folder}/seed_{seed}",
            ])
            for seed in range(size)
        ]  # fmt: skip
        group = SeedGroup(cfgs)
        group._train_vectorised(list(range(size)))
        step = statistics.median(group.step_times[warmup:])
        rows.append({"variant": name, "seeds": size, "median_ms_per_step": 1000 * step,
                     "seed_iterations_per_s": size / step,
                     "peak_memory_mb": _peak_memory_mb(device)})  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)
    base = rows[0]["seed_iterations_per_s"] if rows else 1.0
    for row in rows:
        row["speedup_vs_first"] = row["seed_iterations_per_s"] / base
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
    base = load_config(overrides=args.overrides)
    data = timing_data(base)
    peak = matmul_gflops(device)
    rows = []
    for name in names:
        log.info("timing %s (%d iterations after %d warm-up)", name, args.iterations, args.warmup)
        row = benchmark_variant(name, args.overrides, device, args.iterations, args.warmup, data)
        row["matmul_gflops"] = peak
        row["floor_ms"] = 1000 * row["gflop_per_iteration"] / peak
        row["ratio_to_floor"] = row["median_ms"] / row["floor_ms"]
        rows.append(row)
    table = pd.DataFrame(rows)
    machine = {"device": device_name(device), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "machine": platform.machine()}  # fmt: skip
    out = Path(args.out)
    atomic_write_json(out / "perf.json", {"machine": machine, "rows": rows})
    atomic_write_text(out / "perf.csv", table.to_csv(index=False))
    print(f"device: {machine['device']}, torch {machine['torch']}, threads {machine['threads']}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    if args.group_sizes:
        groups = benchmark_groups(names[0], args.overrides, device, args.group_sizes,
                                  args.iterations, args.warmup, out)  # fmt: skip
        group_table = pd.DataFrame(groups)
        atomic_write_text(out / "perf_groups.csv", group_table.to_csv(index=False))
        print(group_table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
