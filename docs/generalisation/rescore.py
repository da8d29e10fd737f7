"""Score finished runs again with today's metrics (sampled counts, over-count rates, ...).

The first generalisation runs were trained before evaluation counted from posterior samples; their
result.json holds mode counts. This loads each run's saved model (bench.api.load_run), rebuilds
its own test set from its config.yaml and evaluates it with bench.evaluate, writing one CSV row per
run. It changes nothing in the run folders.

    python docs/generalisation/rescore.py OUT.csv RUN_DIR [RUN_DIR ...] [--data-name NAME]
        [--data-params JSON]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch

from bench.api import load_run
from bench.datasets import load_datasets
from bench.evaluate import evaluate

KEYS = [
    "count_accuracy", "count_accuracy_mode", "count_accuracy_in_distribution",
    "over_count_rate", "under_count_rate", "count_accuracy_0", "count_accuracy_1",
    "count_accuracy_2", "count_accuracy_3", "count_accuracy_mode_2", "count_accuracy_mode_3",
    "elbo", "iw_bound", "box_iou_frame", "box_precision", "box_recall",
]  # fmt: skip


def rescore(
    run_dir: Path,
    n_images: int,
    iw_samples: int,
    iw_images: int,
    data_name: str | None = None,
    data_params: dict | None = None,
) -> dict:
    run = load_run(run_dir)
    cfg = run.cfg
    if data_name is not None:  # another data set's test split (e.g. a model trained elsewhere)
        cfg.data.name = data_name
    if data_params is not None:  # another layout of it (replaces the run's data.params)
        cfg.data.params = dict(data_params)
    test = load_datasets(cfg).test
    n = min(n_images, len(test))
    m = evaluate(
        run.model, test.images[:n], test.counts[:n], test.boxes[:n], cfg.prior.fixed,
        iw_samples=iw_samples, iw_images=iw_images, seed=cfg.seed + 7919,
        frame_boxes=test.frame_boxes[:n], train_counts=cfg.data.train_counts,
    )  # fmt: skip
    parts = run_dir.parts
    row = {"data": cfg.data.name, "data_params": json.dumps(cfg.data.params, sort_keys=True),
           "experiment": parts[-4], "variant": parts[-3],
           "config_hash": parts[-2], "seed": cfg.seed, "iteration": run.iteration,
           "test_images": n}  # fmt: skip
    row.update({k: m.get(k) for k in KEYS})
    row["confusion"] = json.dumps(m["confusion"])
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--iw-samples", type=int, default=20)
    p.add_argument("--iw-images", type=int, default=200)
    p.add_argument("--data-name", help="score on this data set's test split instead of the run's")
    p.add_argument("--data-params", type=json.loads, help='data.params to score with, as JSON '
                   '(e.g. \'{"placement": "frame"}\'); replaces the run\'s')  # fmt: skip
    a = p.parse_args()
    torch.set_num_threads(1)
    rows = [
        rescore(r, a.images, a.iw_samples, a.iw_images, a.data_name, a.data_params) for r in a.runs
    ]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with a.out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for r in rows:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})


if __name__ == "__main__":
    main()
