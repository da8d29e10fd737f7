"""Probe a finished run that is already on disk, through the worker's own path.

    python -m bench.probes.existing results/count/dair_nvil/3f326a1233/seed_0 \
        probe.seeds=2 probe.steps=1000 [probe.pixel_cnn=false]

The run's own config.yaml (its data, model, training settings) plus the `representation`
experiment's probe section (configs/experiments/representation.yaml) plus the overrides gives a
representation run, `<results>/representation/<variant>/<hash>/seed_<n>/`, in the results folder
of the run, which reuses the finished run's model.pt (read-only) exactly as `run_all.py
--experiments representation` would. This is how a run trained under an
older experiment config (whose data the current `representation.yaml` no longer matches) is
probed without training it again. Nothing is trained: a run that cannot be reused is an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from bench.config import ConfigError, config_hash, load_config, to_dict
from bench.grid import load_experiment
from bench.probes.stage import finished_run, training_config
from bench.run_folder import CONFIG


def probe_task(run: Path, overrides: list[str]) -> dict:
    """The worker task of the representation run that reuses the finished run in `run`."""
    run = run.resolve()
    if len(run.parents) < 4 or not run.name.startswith("seed_"):
        raise ValueError(f"{run}: expected a run folder <results>/<experiment>/<variant>/<hash>/"
                         "seed_<n>")  # fmt: skip
    experiment, variant, recorded = run.parents[2].name, run.parents[1].name, run.parent.name
    probe = {"probe": {**load_experiment("representation").config["probe"],
                       "reuse_experiment": experiment}}  # fmt: skip
    cfg = load_config([run / CONFIG, ("representation.yaml: probe", probe)], overrides)
    if not cfg.probe.budgets:
        raise ConfigError("probe.budgets: expected at least one budget")
    root = run.parents[3]
    digest = config_hash(cfg)
    run_dir = root / "representation" / variant / digest / run.name
    thash = config_hash(training_config(cfg, run_dir))
    if thash != recorded or finished_run(run, thash) is None:
        raise ValueError(
            f"{run}: not reusable: its config hashes to {thash} today (folder: {recorded}), or it "
            "is not complete with a model.pt; the worker would train it again"
        )
    cfg = dataclasses.replace(cfg, out_dir=str(run_dir))
    return {"experiment": "representation", "variant": variant, "seed": cfg.seed,
            "config_hash": digest, "run_dir": str(run_dir), "config": to_dict(cfg),
            "stop_grace_s": 60, "command": " ".join(sys.argv)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished run folder")
    parser.add_argument("overrides", nargs="*", help="key=value run-config overrides (probe.*)")
    args = parser.parse_args(argv)
    from bench.worker import run_task

    record = run_task(probe_task(args.run, args.overrides))
    scores = {k: v for k, v in (record.get("final") or {}).items() if k.startswith("probe_")}
    print(json.dumps({"status": record.get("status"), "run": record.get("training_run"),
                      "scores": scores, "seconds": (record.get("probes") or {}).get("seconds"),
                      "pixel_cnn_seconds": (record.get("probes") or {}).get("pixel_cnn_seconds")},
                     indent=1))  # fmt: skip
    return 0 if record.get("status") == "complete" else 3


if __name__ == "__main__":
    sys.exit(main())
