#!/usr/bin/env python
"""air-repro's main command: train the grid (experiments x variants x seeds), here or on SLURM.

    python run_all.py                                   # the cpu profile's grid (see --help)
    python run_all.py --profile smoke --seeds 0-1       # seconds per run: check an installation
    python run_all.py --cluster slurm --profile paper --seeds 0-19 [--wait]
    python run_all.py --dry-run ...                     # what would be skipped, resumed, submitted
    python run_all.py --report-only                     # gather results/ into CSV and the report
    python run_all.py -c configs/smoke.yaml -o results/try   # one run from a config, no grid

Ctrl-C or `kill` stops the running jobs, each checkpointed; the same command resumes them.
`python run_all.py --help` lists every option and each profile's defaults; bench/launcher.py
says how it works.
"""

from __future__ import annotations

import sys

from bench.launcher import main

if __name__ == "__main__":
    sys.exit(main())
