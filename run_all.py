#!/usr/bin/env python
"""air-repro entry point.

Until the launcher lands, this trains (or resumes) one run from a config:

    python run_all.py                                  # default config (NVIL AIR, fixed prior)
    python run_all.py --config configs/smoke.yaml      # a few seconds, for a first check
    python run_all.py --device cuda train.iterations=5000 out_dir=results/try
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from bench.config import ConfigError, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-c", "--config", action="append", default=[],
                   help="YAML config file(s), merged in order over the defaults")  # fmt: skip
    p.add_argument("-d", "--device", help="cpu or cuda (same as train.device=...)")
    p.add_argument("-o", "--out", help="run folder (same as out_dir=...)")
    p.add_argument("-s", "--seed", type=int, help="training seed (same as seed=...)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (omegaconf dotlist)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    overrides = list(args.overrides)
    for flag, key in ((args.device, "train.device"), (args.out, "out_dir"), (args.seed, "seed")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    if args.no_progress:
        overrides.append("train.progress=false")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        print(f"error: expected key=value overrides, got {bad}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from bench.trainer import train_run  # heavy imports after the arguments are known good

    result = train_run(cfg)
    summary = {k: result.get(k) for k in ("status", "outcome", "iterations", "wall_time_s")}
    if result.get("final"):
        summary.update({k: result["final"].get(k) for k in ("count_accuracy", "elbo", "iw_bound")})
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
