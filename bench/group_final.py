"""A seed group's final evaluation, vectorised over the seeds that finished together.

After the group's loops have ended, each seed's trainer holds its own parameters (the last sync
copied them out: `SeedGroup.sync_seed`). The seeds due for their final evaluation (trained to
the end, not diverged, no stop requested) are stacked afresh (`StackedSeeds.of`) and their main
final evaluation (eval.final_images images, the bound with K = eval.iw_samples on eval.iw_images
of them) runs as one vectorised pass per pass of `evaluate` (bench/group_eval.py, in chunks of
`seeds_per_chunk` seeds), and so does the same evaluation on each reference protocol's test set
that the run evaluates (bench/protocol_sets.py). Each trainer's `finish(**given)` then writes
its result as a single run does (the protocols it skips, it records as skipped).

It is used where the periodic evaluation is vectorised (`GroupLoop.vector_eval`'s rule: on
accelerators, or where `GroupLoop.vector_eval_on_cpu` is set); if it fails (an estimator that
vmap refuses), each seed is evaluated on its own, with a warning. Its time is shared equally:
each seed's `final_evaluation_s` gets the vectorised evaluation's seconds divided by the number
of seeds evaluated together (main and protocols; plus what its `finish` spends itself).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from bench.group_eval import StackedSeeds, evaluate_seeds
from bench.group_loop import GroupLoop
from bench.protocol_sets import protocol_plan, protocol_test_set

if TYPE_CHECKING:
    from bench.seedgroup import SeedGroup

log = logging.getLogger(__name__)


def final_evaluations(group: SeedGroup) -> dict[int, dict]:
    """{trainer index: `Trainer.finish`'s keyword arguments (final metrics, protocols' metrics,
    its share of the seconds)} of the group's seeds due for their final evaluation, at least two
    at one iteration; {} where it does not apply or fails (each `finish` evaluates its own)."""
    if group.stop_requested or not GroupLoop.evaluates_vectorised(group.device):
        return {}
    by_iteration: dict[int, list[int]] = {}
    for i, trainer in enumerate(group.trainers):
        if not trainer.needs_training() and trainer.status.get("diverged_at") is None:
            by_iteration.setdefault(trainer.iteration, []).append(i)
    out: dict[int, dict] = {}
    ev = group.cfg.eval
    evaluated = [name for name, skipped in protocol_plan(group.cfg).items() if skipped is None]
    for members in by_iteration.values():
        if len(members) < 2:
            continue
        seeds = [group.trainers[i].cfg.seed for i in members]
        log.info("seeds %s: final evaluation on %d images (K=%d), vectorised", seeds,
                 ev.final_images, ev.iw_samples)  # fmt: skip
        start = time.perf_counter()
        try:
            stacked = StackedSeeds.of(group, members)
            js = range(len(members))
            args = (ev.final_images, ev.iw_samples, ev.iw_images)
            finals = evaluate_seeds(stacked, js, *args)
            on: dict[str, list[dict]] = {}
            for name in evaluated:
                log.info("seeds %s: final evaluation on protocol %s, vectorised", seeds, name)
                on[name] = evaluate_seeds(
                    stacked, js, *args, test=protocol_test_set(group.cfg, name)
                )
        except Exception as err:  # vmap raises several types for unsupported code
            log.warning("seeds %s: the vectorised final evaluation failed (%s: %s); each seed "
                        "is evaluated on its own", seeds, type(err).__name__, err)  # fmt: skip
            continue
        share = (time.perf_counter() - start) / len(members)
        for j, i in enumerate(members):
            protocols = {name: on[name][j] for name in evaluated}
            out[i] = {"final": finals[j], "final_s": share, "protocols": protocols}
    return out
