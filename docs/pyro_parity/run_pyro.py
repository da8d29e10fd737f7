"""Train Pyro's AIR example (examples/air) on our multi-MNIST data and log count accuracy.

Pyro's code is *not* part of this project: fetch the Pyro repository yourself and pass the path
of its ``examples/air`` folder. This script imports ``air.py`` / ``main.py`` from there and
``pyro`` from the installed ``pyro-ppl`` package (``pip install --no-deps pyro-ppl pyro-api
opt_einsum``; tested with pyro-ppl 1.9.2 and Pyro's git HEAD ff6ae1c, Oct 2024).

Settings are the AIR tutorial's command line (tutorial/source/air.ipynb)::

    python main.py -n 200000 -blr 0.1 --z-pres-prior 0.01 --scale-prior-sd 0.2 --predict-net 200
        --bl-predict-net 200 --decoder-output-use-sigmoid --decoder-output-bias -2

trained on our ``count`` experiment's training images (60000, data seed 1, ``--placement``:
``frame`` by default, the experiments' layout) and evaluated every ``--eval-every`` iterations
on held-out test images of the same layout (MNIST test digits, data seed 1) with
*sampled* counts (one guide sample per image), as Pyro's own ``count_accuracy`` does.

    OMP_NUM_THREADS=1 python docs/pyro_parity/run_pyro.py --pyro-air /work/pyro_src/examples/air \
        --seed 0 --out docs/pyro_parity/results/pyro_seed0.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.data.multi_mnist import MultiMnistSpec, load_or_generate  # noqa: E402

FIELDS = ["impl", "seed", "iteration", "count_accuracy", "acc_0", "acc_1", "acc_2", "mean_count",
          "elbo_batch", "wall_s"]  # fmt: skip


def held_out(
    n_test: int, data_seed: int = 1, placement: str = "frame"
) -> tuple[torch.Tensor, np.ndarray]:
    """The held-out images (float in [0, 1]) and their true counts."""
    spec = MultiMnistSpec(n_images=n_test, split="test", seed=data_seed, placement=placement)
    test = load_or_generate(spec)
    return torch.from_numpy(test.float_images()), test.counts


def train_images(n_train: int, data_seed: int = 1, placement: str = "frame") -> torch.Tensor:
    spec = MultiMnistSpec(n_images=n_train, split="train", seed=data_seed, placement=placement)
    return torch.from_numpy(load_or_generate(spec).float_images())


def accuracy_row(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    row = {"count_accuracy": float((pred == true).mean()), "mean_count": float(pred.mean())}
    for c in (0, 1, 2):
        sel = true == c
        row[f"acc_{c}"] = float((pred[sel] == c).mean()) if sel.any() else float("nan")
    return row


def write_rows(path: Path, rows: list[dict], fields: list[str] = FIELDS) -> None:
    """Atomic CSV write (the file is rewritten after every evaluation)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def import_pyro_air(path: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """Pyro's examples/air `air` and `main` modules."""
    if not (path / "air.py").is_file() or not (path / "main.py").is_file():
        raise SystemExit(f"--pyro-air {path}: expected Pyro's examples/air (air.py, main.py)")
    # main.py imports visdom (plots) and pyro.contrib.examples' data helpers (which need
    # torchvision); we use neither: our data set is fed instead.
    import pyro.contrib.examples  # noqa: PLC0415

    sys.modules.setdefault("visdom", types.ModuleType("visdom"))
    for name in ("multi_mnist", "util"):
        full = f"pyro.contrib.examples.{name}"
        if full not in sys.modules:
            sys.modules[full] = types.ModuleType(full)
            setattr(pyro.contrib.examples, name, sys.modules[full])
    sys.modules["pyro.contrib.examples.util"].get_data_directory = None
    sys.path.insert(0, str(path))
    import air  # noqa: PLC0415
    import main  # noqa: PLC0415

    return air, main


def build_pyro_air(air_mod: types.ModuleType) -> torch.nn.Module:
    """The tutorial's model: the arguments main.py passes for the tutorial's command line."""
    return air_mod.AIR(
        num_steps=3, x_size=50, window_size=28, z_what_size=50, rnn_hidden_size=256,
        encoder_net=[200], decoder_net=[200], predict_net=[200], bl_predict_net=[200],
        decoder_output_bias=-2.0, decoder_output_use_sigmoid=True, scale_prior_sd=0.2,
        use_masking=True, use_baselines=True,
    )  # fmt: skip


@torch.no_grad()
def sampled_counts(air: torch.nn.Module, x: torch.Tensor, batch: int = 500) -> np.ndarray:
    out = []
    for start in range(0, len(x), batch):
        xb = x[start : start + batch]
        _, z_pres = air.guide(xb, xb.shape[0])
        out.append(sum(z.squeeze(-1) for z in z_pres).long())
    return torch.cat(out).numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pyro-air", type=Path, required=True, help="Pyro's examples/air folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=5000)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--n-train", type=int, default=60000)
    p.add_argument("--n-test", type=int, default=3000)
    p.add_argument("--baseline-lr", type=float, default=0.1)
    p.add_argument(
        "--placement",
        choices=["frame", "ink"],
        default="frame",
        help="layout of the training and held-out images (bench/data/multi_mnist.py): frame, the "
        "experiments' layout since the parity fix; ink, the layout before it",
    )
    p.add_argument("--out", type=Path, required=True, help="CSV of the learning curve")
    args = p.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Default grid_sample")  # Pyro's code, each step

    import pyro  # noqa: PLC0415
    import pyro.optim as optim  # noqa: PLC0415
    from pyro.infer import SVI, TraceGraph_ELBO  # noqa: PLC0415

    air_mod, main_mod = import_pyro_air(args.pyro_air)
    X = train_images(args.n_train, placement=args.placement)
    x_test, c_test = held_out(args.n_test, placement=args.placement)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    air = build_pyro_air(air_mod)
    prior = main_mod.make_prior(0.01)  # --z-pres-prior 0.01 (not --z-pres-prior-raw)

    def lr_of(name: str) -> dict[str, float]:  # main.py's per_param_optim_args
        return {"lr": args.baseline_lr if "bl_" in name else 1e-4}

    svi = SVI(air.model, air.guide, optim.Adam(lr_of), loss=TraceGraph_ELBO())
    rows: list[dict] = []
    t0, losses = time.perf_counter(), []
    for i in range(1, args.iterations + 1):
        losses.append(svi.step(X, batch_size=64, z_pres_prior_p=lambda t: prior(t)))
        if i % args.eval_every == 0:
            acc = accuracy_row(sampled_counts(air, x_test), c_test)
            row = {"impl": "pyro", "seed": args.seed, "iteration": i, **acc,
                   "elbo_batch": -float(np.mean(losses)) / len(X),
                   "wall_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
            losses = []
            rows.append(row)
            write_rows(args.out, rows)
            print(f"pyro seed {args.seed} it {i} acc {acc['count_accuracy']:.3f} "
                  f"(0/1/2: {acc['acc_0']:.2f}/{acc['acc_1']:.2f}/{acc['acc_2']:.2f}) "
                  f"t {row['wall_s']}s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
