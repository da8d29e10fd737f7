"""Train several seeds of one configuration in one process, vectorised over the seeds.

One AIR seed leaves a GPU mostly idle; stacking S seeds' parameters along a leading axis and
running the loss under `torch.func.vmap` turns S small problems into one S-times larger one.
Each seed keeps everything a separate run has: its initialisation (built exactly as its own run
builds it), its data order (`batch_indices(seed, ...)`), its random stream (each seed's RNG
state is swapped in to draw that seed's noise, in the same order as its own run would), and its
optimiser state (Adam is elementwise, so one Adam over stacked tensors is S independent Adams).
Results stay one folder per seed, in the single-run format: a group can be resumed seed by seed
and vice versa, and each seed's numbers equal its separate run's up to float rounding.

Like a Trainer, a group honours `stop_requested` (set by the worker on the scheduler's timeout
signal): every seed is checkpointed after the current iteration and `run` returns partial
records, which a new group (or single runs) resumes.

Estimators whose loss cannot run under vmap (data-dependent Python control flow, say) are
detected by a dry run and trained seed after seed instead, with a warning.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from bench.config import RunConfig, config_hash
from bench.evaluate import to_float_images
from bench.trainer import (
    Datasets,
    Trainer,
    _rng_state,
    _set_rng_state,
    batch_indices,
    load_datasets,
)
from implementations.core.model import AIR, Noise
from implementations.registry import build_estimator

log = logging.getLogger(__name__)


class _LossModule(nn.Module):
    """Model and estimator under one root, so functional_call can swap all their tensors."""

    def __init__(self, model: AIR, estimator: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.estimator = estimator

    def forward(self, x: torch.Tensor, noises: list[tuple], prior: float) -> tuple:
        self.model.noise_queue = [Noise(*n) for n in noises]
        out = self.estimator.loss(self.model, x, prior)
        self.model.noise_queue = []
        return out.loss, out.logs


class SeedGroup:
    """S runs that differ only in their seed, trained together."""

    def __init__(self, cfgs: list[RunConfig], data: Datasets | None = None) -> None:
        if not cfgs:
            raise ValueError("SeedGroup needs at least one config")
        hashes = {config_hash(c) for c in cfgs}
        if len(hashes) != 1:
            raise ValueError(f"a seed group needs one config up to seed/out_dir, got {hashes}")
        if len({c.seed for c in cfgs}) != len(cfgs):
            raise ValueError("a seed group needs distinct seeds")
        self.cfg = cfgs[0]
        self.device = torch.device(self.cfg.train.device)
        self.data = data or load_datasets(self.cfg)
        self.trainers: list[Trainer] = []
        self.rng: list[dict[str, Any]] = []  # each seed's RNG states, as its own run has them
        self.prior = 0.0  # presence prior of the iteration being trained (read by the loss)
        self.step_times: list[float] = []  # seconds per vectorised step (for bench.perf)
        self._stop_requested = False
        for cfg in cfgs:
            trainer = Trainer(cfg, data=self.data)  # builds and initialises from cfg.seed
            trainer.prepare()  # restores its checkpoint (and its RNG states) if it has one
            self.trainers.append(trainer)
            self.rng.append(_rng_state(self.device))

    # ------------------------------------------------------------------ public
    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    @stop_requested.setter
    def stop_requested(self, value: bool) -> None:
        """Set from outside (a scheduler's timeout signal), as `Trainer.stop_requested`: every
        seed checkpoints after the current iteration and `run` returns partial records."""
        self._stop_requested = value
        for trainer in self.trainers:  # the seed-after-seed fallback runs Trainer._loop
            trainer.stop_requested = value

    def run(self) -> list[dict[str, Any]]:
        """Train every seed to the end; returns each seed's result record.

        After a stop request, seeds that still need training (or their final evaluation) get
        `{"status": "partial", "iteration": ...}`, like `Trainer.run`; a new group resumes them.
        """
        pending = [i for i, t in enumerate(self.trainers) if t.needs_training()]
        by_iteration: dict[int, list[int]] = {}
        for i in pending:
            by_iteration.setdefault(self.trainers[i].iteration, []).append(i)
        for members in by_iteration.values():
            if len(members) > 1 and self._vectorisable():
                self._train_vectorised(members)
            else:
                for i in members:
                    if self.stop_requested:
                        break
                    self._train_alone(i)
            if self.stop_requested:
                break
        return [self._finish(t) for t in self.trainers]

    def _finish(self, trainer: Trainer) -> dict[str, Any]:
        # After a stop, no final evaluation is started: S of them could outlast the grace time.
        if trainer.needs_training() or self.stop_requested:
            return {"status": "partial", "iteration": trainer.iteration}
        return trainer.finish()

    # ------------------------------------------------------------------ strategies
    def _train_alone(self, i: int) -> None:
        trainer = self.trainers[i]
        _set_rng_state(self.rng[i], self.device)
        trainer._loop(None)

    def _template(self) -> _LossModule:
        """A model and estimator of the group's config, used as the functional skeleton."""
        cfg = self.cfg
        model_cfg = type(cfg.model)(**{**vars(cfg.model), "sparse_images": False})  # no CSR in vmap
        with torch.random.fork_rng(devices=[]):
            model = AIR(model_cfg).to(self.device)
            estimator = build_estimator(cfg.estimator, model).to(self.device)
        return _LossModule(model, estimator)

    def _vectorisable(self) -> bool:
        """Dry run of the vectorised loss on two copies of seed 0; False if vmap refuses it."""
        template = self._template()
        params, buffers = self._stack([0, 0], template)
        x = torch.zeros(2, 2, self.cfg.model.canvas, self.cfg.model.canvas, device=self.device)
        self.prior = 0.5
        try:
            with torch.random.fork_rng(devices=[]):
                requests = self._noise_requests(template, x[0])
                noises = [self._draw(template, requests) for _ in range(2)]
                stacked = _stack_noises(noises)
                vmap(self._functional(template), in_dims=(0, 0, 0, 0))(params, buffers, x, stacked)
        except Exception as err:  # vmap raises several types for unsupported code
            log.warning(
                "estimator %r cannot be vectorised over seeds (%s: %s); seeds run one after "
                "another", self.cfg.estimator.name, type(err).__name__, err,
            )  # fmt: skip
            return False
        return True

    def _train_vectorised(self, members: list[int]) -> None:
        tc = self.cfg.train
        trainers = [self.trainers[i] for i in members]
        template = self._template()
        params, buffers = self._stack(members, template)
        optimiser = self._optimiser(template, params, trainers)
        loss_fn = vmap(self._functional(template), in_dims=(0, 0, 0, 0))
        images = trainers[0].train_images
        start = trainers[0].iteration
        requests = None
        since_ckpt = time.monotonic()
        active = np.ones(len(members), dtype=bool)
        log.info("training seeds %s together from iteration %d", [t.cfg.seed for t in trainers],
                 start)  # fmt: skip
        for iteration in range(start, tc.iterations):
            t0 = time.perf_counter()
            x = torch.stack([
                to_float_images(images[batch_indices(t.cfg.seed, iteration, len(images),
                                                     tc.batch_size)], self.device)
                for t in trainers
            ])  # fmt: skip
            if requests is None:
                requests = self._noise_requests(template, x[0])
            noises = []
            for i in members:
                _set_rng_state(self.rng[i], self.device)
                noises.append(self._draw(template, requests))
                self.rng[i] = _rng_state(self.device)
            self.prior = trainers[0].prior_prob(iteration)
            losses, logs = loss_fn(params, buffers, x, _stack_noises(noises))
            loss_values = losses.detach()
            optimiser.zero_grad(set_to_none=True)
            losses.sum().backward()  # seeds share no parameters: each gets its own gradient
            norms = _clip_per_seed(list(params.values()), tc.grad_clip)
            step_seconds = time.perf_counter() - t0
            self.step_times.append(step_seconds)
            for j, trainer in enumerate(trainers):
                if not active[j]:
                    continue
                loss_j, norm_j = float(loss_values[j]), float(norms[j])
                if not (math.isfinite(loss_j) and math.isfinite(norm_j)):
                    self._sync(j, members, params, buffers, optimiser, template)
                    trainer._diverged(loss_j, norm_j)
                    trainer.save_checkpoint(rng=self.rng[members[j]])
                    active[j] = False
            if not active.any():
                return
            optimiser.step()
            for j, trainer in enumerate(trainers):
                if not active[j]:
                    continue
                trainer.iteration = iteration + 1
                trainer.elapsed += step_seconds  # the group's wall time: what this seed cost
                trainer.accumulate(float(loss_values[j]), {k: v[j] for k, v in logs.items()})
            it = iteration + 1
            evaluate = it % tc.eval_every == 0 or it == tc.iterations
            minutes = (time.monotonic() - since_ckpt) / 60
            checkpoint = it % tc.checkpoint_every == 0 or minutes >= tc.checkpoint_minutes
            checkpoint = checkpoint or it == tc.iterations
            if evaluate or checkpoint:
                for j, trainer in enumerate(trainers):
                    if not active[j]:
                        continue
                    self._sync(j, members, params, buffers, optimiser, template)
                    if evaluate:
                        trainer._record_evaluation(trainer.running)
                        trainer.running.clear()
                    if checkpoint:
                        trainer.save_checkpoint(rng=self.rng[members[j]])
                if checkpoint:
                    since_ckpt = time.monotonic()
            if self.stop_requested:
                if not checkpoint:  # a lossless stop: every seed saved where it stopped
                    self._checkpoint_active(members, active, params, buffers, optimiser, template)
                return

    # ------------------------------------------------------------------ helpers
    def _checkpoint_active(
        self, members: list[int], active: np.ndarray, params: dict, buffers: dict,
        optimiser: torch.optim.Optimizer, template: _LossModule,
    ) -> None:  # fmt: skip
        for j, i in enumerate(members):
            if active[j]:
                self._sync(j, members, params, buffers, optimiser, template)
                self.trainers[i].save_checkpoint(rng=self.rng[i])

    def _functional(self, template: _LossModule):  # noqa: ANN202
        def loss(params, buffers, x, noises):  # noqa: ANN001, ANN202
            return functional_call(template, (params, buffers), (x, noises, self.prior))

        return loss

    def _noise_requests(self, template: _LossModule, x: torch.Tensor) -> list[int]:
        """Batch sizes of the noise draws one loss evaluation makes, in order (dry run)."""
        requests: list[int] = []
        original = template.model.draw_noise

        def record(batch: int, device: torch.device, dtype: torch.dtype) -> Noise:
            requests.append(batch)
            return original(batch, device, dtype)

        template.model.draw_noise = record  # type: ignore[method-assign]
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                template.estimator.loss(template.model, x, 0.5)
        finally:
            del template.model.draw_noise  # back to the class's method
        return requests

    def _draw(self, template: _LossModule, requests: list[int]) -> list[tuple]:
        dtype = torch.get_default_dtype()
        draws = [template.model.draw_noise(b, self.device, dtype) for b in requests]
        return [(n.pres, n.where, n.what) for n in draws]

    def _named_modules(self, trainer: Trainer) -> _LossModule:
        return _LossModule(trainer.model, trainer.estimator)

    def _stack(self, members: list[int], template: _LossModule) -> tuple[dict, dict]:
        """Each named parameter and buffer of the members, stacked along a new seed axis."""
        modules = [self._named_modules(self.trainers[i]) for i in members]
        params = {
            name: torch.stack([dict(m.named_parameters())[name].detach() for m in modules])
            .clone()
            .requires_grad_()
            for name, _ in template.named_parameters()
        }
        buffers = {
            name: torch.stack([dict(m.named_buffers())[name] for m in modules]).clone()
            for name, _ in template.named_buffers()
        }
        return params, buffers

    def _optimiser(
        self, template: _LossModule, params: dict[str, torch.Tensor], trainers: list[Trainer]
    ) -> torch.optim.Optimizer:
        """One Adam over the stacked tensors, groups and state taken from the seeds' own."""
        names = {id(p): n for n, p in template.named_parameters()}
        groups = [{"params": [params["model." + n] for n, _ in template.model.named_parameters()],
                   "lr": self.cfg.train.lr, "name": "model"}]  # fmt: skip
        for group in template.estimator.param_groups(self.cfg.train.lr):
            stacked = [params[names[id(p)]] for p in group["params"]]
            groups.append({**group, "params": stacked})
        optimiser = torch.optim.Adam(groups, fused=True)
        seed_states = [_state_by_name(t) for t in trainers]
        if seed_states[0]:  # resumed seeds: carry their Adam moments over
            for name, p in params.items():
                per_seed = [s[name] for s in seed_states]
                optimiser.state[p] = {
                    "step": per_seed[0]["step"].clone(),
                    "exp_avg": torch.stack([s["exp_avg"] for s in per_seed]),
                    "exp_avg_sq": torch.stack([s["exp_avg_sq"] for s in per_seed]),
                }
        return optimiser

    def _sync(
        self, j: int, members: list[int], params: dict, buffers: dict,
        optimiser: torch.optim.Optimizer, template: _LossModule,
    ) -> None:  # fmt: skip
        """Copy seed j's slice of the stacked state into its own trainer (for eval, checkpoint)."""
        trainer = self.trainers[members[j]]
        own = self._named_modules(trainer)
        with torch.no_grad():
            for name, p in own.named_parameters():
                p.copy_(params[name][j])
            for name, b in own.named_buffers():
                b.copy_(buffers[name][j])
        own_params = dict(own.named_parameters())
        for name, p in params.items():
            state = optimiser.state.get(p)
            if state:
                trainer.optimiser.state[own_params[name]] = {
                    "step": state["step"].clone(),
                    "exp_avg": state["exp_avg"][j].clone(),
                    "exp_avg_sq": state["exp_avg_sq"][j].clone(),
                }


def _state_by_name(trainer: Trainer) -> dict[str, dict[str, torch.Tensor]]:
    own = _LossModule(trainer.model, trainer.estimator)
    return {
        name: trainer.optimiser.state[p]
        for name, p in own.named_parameters()
        if p in trainer.optimiser.state and trainer.optimiser.state[p]
    }


def _stack_noises(noises: list[list[tuple]]) -> list[tuple]:
    """Per seed [draw][tensor] -> per draw, tensors stacked along the seed axis."""
    return [
        tuple(torch.stack([seed[d][k] for seed in noises]) for k in range(3))
        for d in range(len(noises[0]))
    ]


def _clip_per_seed(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Clip each seed's gradient by its own global norm, as clip_grad_norm_ does per run."""
    grads = [p.grad for p in params if p.grad is not None]
    per_tensor = torch.stack([g.flatten(1).norm(dim=1) for g in grads])  # (n_tensors, S)
    norms = per_tensor.norm(dim=0)
    if max_norm:
        coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.view(-1, *([1] * (g.ndim - 1))))
    return norms


def train_group(cfgs: list[RunConfig], data: Datasets | None = None) -> list[dict[str, Any]]:
    """Train (or resume) the seeds of `cfgs` together; complete seeds are left as they are."""
    return SeedGroup(cfgs, data).run()
