"""The columns of the runs table: one schema for `bench.gather`, which writes runs.csv, and the
report (`bench.report.summary.normalise_runs`), which reads it or any table with these columns.

`RUN_SCHEMA` maps each fixed column, in the order runs.csv has them, to what it holds when a
table lacks it (the report fills such columns with it). Every other key of a result.json's
"final" and "final_protocols" becomes a column too (`bench.gather.final_columns`), after these.
Plain data only: the report imports it, and it imports nothing.
"""

from __future__ import annotations

import math
from typing import Any

NAN = math.nan
COUNTS = range(4)  # final_count_accuracy_<k> for the counts the experiments test (0-3)

RUN_SCHEMA: dict[str, Any] = {
    "experiment": "",
    "variant": "",
    "seed": -1,
    "config_hash": None,
    "run_dir": None,
    "status": "partial",  # bench.runstate.RunState.table_status
    "outcome": None,
    "diverged_at": NAN,
    "iterations": NAN,
    "target_iterations": NAN,
    "wall_time_s": NAN,  # training only
    "evaluation_s": NAN,  # periodic evaluations (a group's vectorised time split over its seeds)
    "final_evaluation_s": NAN,  # the final evaluation, reference protocols included
    "iterations_to_target": NAN,
    "final_count_accuracy": NAN,
    **{f"final_count_accuracy_{k}": NAN for k in COUNTS},
    "final_elbo": NAN,
    "final_iw_bound": NAN,
    "final_box_iou": NAN,
    "final_mean_count": NAN,
    "final_confusion": None,  # JSON text
    "error": None,
    "slurm_job_id": None,
    "git_commit": None,
    "device": None,
    "host": None,
    "converged_accuracy": NAN,
    "converged_evals": NAN,
    "attempts": NAN,  # lines of attempts.jsonl: worker processes that worked on the run
}
RUN_COLUMNS = list(RUN_SCHEMA)
# Final-metric columns every runs table has (older results lack some keys).
FIXED_FINAL = [c for c in RUN_COLUMNS if c.startswith("final_")]
# The evaluations table (one row per line of metrics.jsonl): the run's identity and the
# iteration first, then every key of the line.
EVAL_KEYS = ["experiment", "variant", "seed", "config_hash", "iteration"]
