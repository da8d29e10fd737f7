"""Train one of our variants (as `run_all.py` would, cpu profile) and log *sampled* count accuracy.

The counterpart of run_pyro.py: same training images (count experiment, data seed 1, 60000,
the layout of the experiment's `data.params.placement`, override it to compare), same held-out
images (3000 MNIST-test canvases, data seed 1, same layout), and the same kind of count: one
sample of the inference network per image (`model(x, prior, sample=True).counts()`), as Pyro's
`count_accuracy` counts. Mode counts are logged beside them.

    OMP_NUM_THREADS=1 python docs/pyro_parity/run_ours.py --variant air_nvil_fixed --seed 0 \
        --out docs/pyro_parity/results/ours_seed0.csv [key=value overrides]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.config import load_config  # noqa: E402
from bench.trainer import batch_indices, build, compile_loss  # noqa: E402
from implementations.core.priors import prior_prob_at  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_pyro import accuracy_row, held_out, train_images, write_rows  # noqa: E402

FIELDS = ["impl", "seed", "iteration", "count_accuracy", "acc_0", "acc_1", "acc_2", "mean_count",
          "mode_count_accuracy", "elbo_batch", "baseline_mse", "wall_s"]  # fmt: skip


def layers(variant: str) -> list[tuple[str, dict]]:
    """The config layers run_all.py applies: experiment `count`, profile `cpu`, the variant."""
    out = []
    for path in (ROOT / "configs/experiments/count.yaml", ROOT / "configs/profiles/cpu.yaml",
                 ROOT / "implementations" / variant / "variant.yaml"):  # fmt: skip
        if not path.is_file():
            raise SystemExit(f"{path}: not found (is --variant a folder of implementations/?)")
        raw = OmegaConf.to_container(OmegaConf.load(path))
        out.append((str(path), raw.get("config", {}) or {}))
    return out


@torch.no_grad()
def counts(model: torch.nn.Module, x: torch.Tensor, prior: float, sample: bool) -> np.ndarray:
    out = []
    for start in range(0, len(x), 500):
        out.append(model(x[start : start + 500], prior, sample=sample).counts())
    return torch.cat(out).numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="air_nvil_fixed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=5000)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--n-test", type=int, default=3000)
    p.add_argument("--label", default="ours", help="the `impl` column of the CSV")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument(
        "--init-from-pyro",
        type=Path,
        default=None,
        metavar="EXAMPLES_AIR",
        help="start from the weights of Pyro's AIR (built with torch seed --seed), copied as "
        "in compare.py; needs model.where_scale_relative=true",
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("overrides", nargs="*", help="run-config key=value overrides")
    args = p.parse_args()
    torch.set_num_threads(1)

    cfg = load_config(layers(args.variant), [f"seed={args.seed}", *args.overrides])
    placement = (cfg.data.params or {}).get("placement", "ink")  # the spec's default
    X = train_images(cfg.data.n_train, cfg.data.seed, placement)
    x_test, c_test = held_out(args.n_test, cfg.data.seed, placement)
    device = torch.device("cpu")
    model, estimator, optimiser = build(cfg, device)
    if args.init_from_pyro is not None:
        if not cfg.model.where_scale_relative:
            raise SystemExit("--init-from-pyro needs model.where_scale_relative=true")
        from compare import copy_pyro_weights  # noqa: PLC0415
        from run_pyro import build_pyro_air, import_pyro_air  # noqa: PLC0415

        air_mod, _ = import_pyro_air(args.init_from_pyro)
        torch.manual_seed(args.seed)
        copy_pyro_weights(build_pyro_air(air_mod), model, estimator)
        optimiser.state.clear()
    loss_fn = None if args.no_compile else compile_loss(estimator, model, device)
    rows: list[dict] = []
    t0, run_elbo, run_mse, n = time.perf_counter(), 0.0, 0.0, 0
    for it in range(args.iterations):
        prior = prior_prob_at(cfg.prior, it)
        x = X[batch_indices(cfg.seed, it, len(X), cfg.train.batch_size)]
        if loss_fn is None:
            out = estimator.loss(model, x, prior)
            loss, logs = out.loss, out.logs
        else:
            loss, logs = loss_fn(x, torch.tensor(prior))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        run_elbo += float(logs["elbo"])
        run_mse += float(logs.get("baseline_mse", float("nan")))
        n += 1
        done = it + 1
        if done % args.eval_every == 0:
            model.eval()
            with torch.random.fork_rng():
                torch.manual_seed(12345)
                pred = counts(model, x_test, prior, sample=True)
            mode = counts(model, x_test, prior, sample=False)
            model.train()
            acc = accuracy_row(pred, c_test)
            row = {"impl": args.label, "seed": args.seed, "iteration": done, **acc,
                   "mode_count_accuracy": float((mode == c_test).mean()),
                   "elbo_batch": run_elbo / n, "baseline_mse": run_mse / n,
                   "wall_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
            run_elbo, run_mse, n = 0.0, 0.0, 0
            rows.append(row)
            write_rows(args.out, rows, FIELDS)
            print(f"{args.label} seed {args.seed} it {done} acc {acc['count_accuracy']:.3f} "
                  f"(0/1/2: {acc['acc_0']:.2f}/{acc['acc_1']:.2f}/{acc['acc_2']:.2f}) mode "
                  f"{row['mode_count_accuracy']:.3f} bl_mse {row['baseline_mse']:.0f} "
                  f"t {row['wall_s']}s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
