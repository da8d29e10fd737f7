"""Training loop: one run from a config to metrics, checkpoints and a result file on disk.

A run folder holds:
  config.yaml      the resolved config
  metrics.jsonl    one JSON line per evaluation
  checkpoint.pt    model, estimator, optimiser, every RNG state, iteration, elapsed time
  result.json      written last: status, outcome and final metrics

Resuming from a checkpoint gives the same numbers as an uninterrupted run on CPU: the data order
is a pure function of (seed, epoch), every RNG state is saved, and metrics lines written after
the checkpoint are dropped on resume.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from bench import metrics
from bench.config import RunConfig, config_hash, to_yaml
from bench.counter_noise import TrainingNoise
from bench.datasets import Datasets, load_datasets
from bench.evaluate import evaluate
from bench.model_file import save_final_model
from bench.protocol_sets import protocol_plan, protocol_test_set
from bench.provenance import provenance
from bench.run_folder import (
    CHECKPOINT,
    CONFIG,
    PREVIOUS_CHECKPOINT,
    append_evaluation,
    clear_evaluations,
    complete_result,
    keep_evaluations,
    read_evaluations,
    write_result,
)
from bench.runtime import keep_freed_memory
from bench.samples_file import write_samples
from bench.storage import atomic_torch_save, atomic_write_text
from bench.train_loop import RunLoop, batch_indices  # noqa: F401  (batch_indices: re-exported)
from bench.train_setup import (  # noqa: F401  (build, seed_everything, compile_loss: re-exported)
    CheckpointError,
    build,
    compile_error,
    compile_loss,
    load_checkpoint,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
)
from implementations.core.priors import prior_prob_at

log = logging.getLogger(__name__)


class Trainer:
    """Owns one run: its folder, model, optimiser and loop."""

    def __init__(self, cfg: RunConfig, data: Datasets | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.out_dir)
        self.device = resolve_device(cfg.train.device)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.hash = config_hash(cfg)
        self.data = data or load_datasets(cfg)
        self.model, self.estimator, self.optimiser = build(cfg, self.device)
        self.train_images = torch.as_tensor(self.data.train.images)  # uint8, converted per batch
        self.iteration = 0  # iterations completed
        self.elapsed = 0.0  # training seconds over all sessions of this run
        self.evaluation_s = 0.0  # seconds of periodic evaluations, all sessions (result.json)
        self.status: dict[str, Any] = {}
        self.running: dict[str, float] = {}  # sums of training logs since the last evaluation
        self.start_iteration = 0  # where this session began (the checkpoint's iteration)
        # Set from outside (a scheduler's timeout signal): checkpoint after this iteration and
        # return a partial result, so a requeued job resumes exactly where this one stopped.
        self.stop_requested = False
        self._compiled_loss: Any = None  # train.compile: set once the first call has compiled
        # train.noise=counter: the model's training draws become a function of (seed, iteration)
        self.noise = TrainingNoise(self.model, cfg.seed) if cfg.train.noise == "counter" else None

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, rng: dict[str, Any] | None = None) -> None:
        """Write the checkpoint; `rng` replaces the global RNG states (seed groups pass theirs)."""
        path = self.run_dir / CHECKPOINT
        if path.exists():
            path.replace(self.run_dir / PREVIOUS_CHECKPOINT)
        atomic_torch_save(
            path,
            {
                "iteration": self.iteration,
                "elapsed": self.elapsed,
                "evaluation_s": self.evaluation_s,
                "config_hash": self.hash,
                "model": self.model.state_dict(),
                "estimator": self.estimator.state_dict(),
                "optimiser": self.optimiser.state_dict(),
                "rng": rng if rng is not None else rng_state(self.device),
                "status": self.status,
                "running": self.running,
            },
        )

    def restore(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.estimator.load_state_dict(ckpt["estimator"])
        self.optimiser.load_state_dict(ckpt["optimiser"])
        set_rng_state(ckpt["rng"], self.device)
        self.iteration = ckpt["iteration"]
        self.elapsed = ckpt["elapsed"]
        self.evaluation_s = ckpt.get("evaluation_s", 0.0)  # older checkpoints: not recorded
        self.status = ckpt.get("status", {})
        self.running = ckpt.get("running", {})
        # Evaluations written after this checkpoint will be written again, identically.
        keep_evaluations(self.run_dir, self.iteration)

    # ------------------------------------------------------------------ loop
    def prior_prob(self, iteration: int) -> float:
        return prior_prob_at(self.cfg.prior, iteration)

    def evaluate(
        self, n_images: int, iw_samples: int, iw_images: int | None = None, test: Any = None
    ) -> dict:
        """Metrics on the first `n_images` test images (keys: bench/evaluate.py's docstring).

        `test`: another test set (a reference protocol's, bench/data/protocols.py); default the
        run's own held-out test set.
        """
        test = self.data.test if test is None else test
        n = min(n_images, len(test))
        return evaluate(
            self.model,
            test.images[:n],
            test.counts[:n],
            test.boxes[:n],
            self.prior_prob(self.iteration),
            iw_samples=iw_samples,
            iw_images=iw_images,
            batch_size=self.cfg.eval.batch_size,
            seed=self.cfg.seed + 7919,
            frame_boxes=test.frame_boxes[:n],
            train_counts=self.cfg.data.train_counts,
        )

    def run(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train to `train.iterations` (or stop after `stop_after` more, for tests) and finish.

        Returns the result record, also written to result.json when the run ends.
        """
        if self.prepare():
            self.loop(stop_after)
        # After a stop request no final evaluation is started (it can take minutes): the run
        # is checkpointed, and resuming it runs just the final evaluation.
        if self.needs_training() or self.stop_requested:
            return {"status": "partial", "iteration": self.iteration}
        return self.finish()

    def prepare(self) -> bool:
        """Write the config, restore the newest checkpoint if any; True if training remains."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / CONFIG, to_yaml(self.cfg))
        ckpt = load_checkpoint(self.run_dir, self.hash)
        if ckpt is not None:
            self.restore(ckpt)
            self.start_iteration = self.iteration
            log.info("%s: resuming from iteration %d", self.run_dir, self.iteration)
        else:
            clear_evaluations(self.run_dir)  # a fresh start rewrites the history
        return self.needs_training()

    def needs_training(self) -> bool:
        diverged = self.status.get("diverged_at") is not None
        return not diverged and self.iteration < self.cfg.train.iterations

    def loop(self, stop_after: int | None) -> None:
        """Train to the end, `stop_after` more iterations, a stop request or a divergence
        (bench/train_loop.py: the loop's body, which bench.perf times)."""
        RunLoop(self, stop_after).run()

    def step(self, x: torch.Tensor, prior_prob: float) -> tuple[float, float, dict[str, Any]]:
        """One optimisation step on batch `x`: (loss, gradient norm, logs).

        The parameters are left untouched when the loss or the gradient is not finite (the
        caller records the divergence). `bench.perf` times exactly this.
        """
        with self.noise.at(self.iteration) if self.noise else nullcontext():
            compiled = self._compiled_loss_and_logs(x, prior_prob)
            if compiled is None:
                out = self.estimator.loss(self.model, x, prior_prob)
                loss, logs = out.loss, out.logs
            else:
                loss, logs = compiled
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = self._clip()
        loss_value = loss.item()
        if math.isfinite(loss_value) and math.isfinite(grad_norm):
            self.optimiser.step()
        return loss_value, grad_norm, logs

    def _compiled_loss_and_logs(self, x: torch.Tensor, prior_prob: float) -> tuple | None:
        """(loss, logs) from the compiled loss; None when train.compile is off or has failed.

        The compiled function is kept only once its first call (the compilation) succeeded; if
        that fails, the run says why, records it in its status and trains eagerly from then on.
        """
        if not self.cfg.train.compile or "compile_failed" in self.status:
            return None
        # The prior as a tensor: a float would be baked into the graph (one recompile per
        # value of an annealed prior).
        prior = torch.tensor(prior_prob, device=self.device)
        # Counter noise goes in as tensors computed here: the iteration is no graph constant.
        args = () if self.noise is None else (self.noise.given(x, self.estimator, prior),)
        if self._compiled_loss is not None:
            return self._compiled_loss(x, prior, *args)
        compiled = compile_loss(self.estimator, self.model, self.device, self.noise)
        try:  # the first call compiles: a missing C++ compiler, say, shows up here
            result = compiled(x, prior, *args)
        except Exception as err:  # torch raises many types from its compiler stack
            log.warning(
                "%s: train.compile failed (%s: %s); training eagerly instead (same maths)",
                self.run_dir, type(err).__name__, compile_error(err),
            )  # fmt: skip
            self.status["compile_failed"] = f"{type(err).__name__}: {err}"[:2000]
            if self.noise is not None:
                self.noise.queue.clear()  # the eager step draws its own, from draw 0
            return None
        self._compiled_loss = compiled
        return result

    def accumulate(self, loss_value: float, logs: dict[str, Any]) -> None:
        """Add one step's logs to the running sums reported at the next evaluation."""
        for k, v in {"loss": loss_value, **logs}.items():
            self.running[k] = self.running.get(k, 0.0) + float(v)
        self.running["n"] = self.running.get("n", 0.0) + 1

    def _clip(self) -> float:
        params = [p for g in self.optimiser.param_groups for p in g["params"] if p.grad is not None]
        if not self.cfg.train.grad_clip:
            # The norm only (it is logged and checked for divergence): clip_grad_norm_ with an
            # infinite threshold would still multiply every gradient by 1.0, a pass over 20 MB.
            return float(torch.nn.utils.get_total_norm([p.grad for p in params]))
        return float(torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip))

    def mark_diverged(self, loss: float, grad_norm: float) -> None:
        log.warning(
            "%s: non-finite values at iteration %d (loss %s, grad norm %s); recorded as diverged",
            self.run_dir, self.iteration, loss, grad_norm,
        )  # fmt: skip
        self.status["diverged_at"] = self.iteration

    def record_evaluation(self, running: dict[str, float], result: dict | None = None) -> None:
        """Evaluate (or take `result`, the same evaluation computed elsewhere: a seed group's
        vectorised one) and append the record to metrics.jsonl."""
        ev = self.cfg.eval
        if result is None:
            start = time.perf_counter()
            result = self.evaluate(self.cfg.train.eval_images, ev.periodic_iw_samples)
            self.evaluation_s += time.perf_counter() - start
        n = max(running.get("n", 1.0), 1.0)
        record = {
            "iteration": self.iteration,
            "wall_time": self.elapsed,
            "prior_prob": self.prior_prob(self.iteration),
            **{f"train_{k}": v / n for k, v in running.items() if k != "n"},
            **result,
        }
        append_evaluation(self.run_dir, record)
        log.info(
            "%s it %d: count acc %.3f (mode %.3f), over/under %.3f/%.3f, elbo %.1f (%s)",
            self.run_dir.name, self.iteration, result["count_accuracy"],
            result["count_accuracy_mode"], result["over_count_rate"], result["under_count_rate"],
            result["elbo"], result["likelihood"],
        )  # fmt: skip

    # ------------------------------------------------------------------ result
    def finish(
        self, final: dict | None = None, final_s: float = 0.0, protocols: dict | None = None
    ) -> dict[str, Any]:
        """Final evaluations, result.json, model.pt. `final` (the main final evaluation) and
        `protocols` (by name) computed elsewhere, as a seed group's vectorised ones, and
        `final_s` this run's share of their seconds; what is not given is evaluated here."""
        cfg, ev = self.cfg, self.cfg.eval
        history = read_evaluations(self.run_dir)
        # Converged means: the sampled count accuracy on test images of the counts the run
        # trains on (all of them in `count`; the unseen count is the generalisation figure).
        accs = [r.get("count_accuracy_in_distribution", r["count_accuracy"]) for r in history]
        its = [r["iteration"] for r in history]
        diverged_at = self.status.get("diverged_at")
        given = [m.get("iw_samples", 0) for m in [final, *(protocols or {}).values()] if m]
        if given and (diverged_at is not None or set(given) != {ev.iw_samples}):
            raise ValueError(
                f"{self.run_dir}: finish(final=...) takes a final evaluation (K = "
                f"eval.iw_samples = {ev.iw_samples}) of a run not diverged"
            )
        if diverged_at is None:
            start = time.perf_counter()
            if final is None:
                log.info("%s: final evaluation on %d images (K=%d)", self.run_dir.name,
                         ev.final_images, ev.iw_samples)  # fmt: skip
                final = self.evaluate(ev.final_images, ev.iw_samples, ev.iw_images)
            protocols = self._evaluate_protocols(protocols or {})
            final_s += time.perf_counter() - start
            converged = metrics.is_converged(accs, ev.converged_accuracy, ev.converged_evals)
            outcome = "converged" if converged else "not_converged"
        else:
            outcome, protocols = "diverged", {}
        result = {
            "status": "complete",
            "outcome": outcome,
            "diverged_at": diverged_at,
            "iterations": self.iteration,
            "wall_time_s": self.elapsed,
            "evaluation_s": self.evaluation_s,
            "final_evaluation_s": final_s,
            "iterations_to_target": metrics.iterations_to_target(its, accs, ev.converged_accuracy),
            "final": final,
            "final_protocols": protocols,
            "config_hash": self.hash,
            "seed": cfg.seed,
            "provenance": provenance(self.device),
        }
        write_samples(self.run_dir, self.model, self.data.test, self.prior_prob(self.iteration),
                      self.iteration)  # samples.npz: the report's reconstructions  # fmt: skip
        # A finished run keeps its weights only (model.pt: what the report and bench.api need),
        # written before result.json marks it complete; the resumable checkpoints (model,
        # estimator, Adam state: ~5x larger, twice) go once it is.
        save_final_model(self.run_dir, self.model, iteration=self.iteration,
                         config_hash=self.hash, diverged_at=diverged_at)  # fmt: skip
        result = write_result(self.run_dir, result)  # with the run's identity (run.json)
        for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
            (self.run_dir / name).unlink(missing_ok=True)
        return result

    def _evaluate_protocols(self, given: dict[str, dict]) -> dict[str, dict]:
        """Final metrics on each reference protocol's test images (`data.reference_protocols`),
        so that a published row is compared on the test set it was measured on; `given`: those
        already computed, by protocol."""
        out: dict[str, dict] = {}
        ev = self.cfg.eval
        for name, skipped in protocol_plan(self.cfg).items():
            if skipped is not None:  # say so in the result rather than fail the run
                log.info("%s: protocol %s skipped: %s", self.run_dir.name, name, skipped)
                out[name] = {"skipped": skipped}
                continue
            if name in given:
                out[name] = given[name]
                continue
            test = protocol_test_set(self.cfg, name)
            log.info("%s: final evaluation on protocol %s (%d images)", self.run_dir.name, name,
                     min(ev.final_images, len(test)))  # fmt: skip
            out[name] = self.evaluate(ev.final_images, ev.iw_samples, ev.iw_images, test=test)
        return out


def train_run(cfg: RunConfig) -> dict[str, Any]:
    """Train (or resume, or skip if complete) the run of `cfg`; returns its result record."""
    done, problem = complete_result(Path(cfg.out_dir), config_hash(cfg))
    if done is not None:
        log.info("%s: already complete, skipped", cfg.out_dir)
        return done
    if problem is not None:
        log.warning("%s: %s; the run is finished again", cfg.out_dir, problem)
    return Trainer(cfg).run()
