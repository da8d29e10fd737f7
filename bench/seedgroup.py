"""Train several seeds of one configuration in one process, vectorised over the seeds.

One AIR seed leaves a GPU mostly idle; stacking S seeds' parameters along a leading axis and
running the loss under `torch.func.vmap` turns S small problems into one S-times larger one.
Each seed keeps everything a separate run has: its initialisation (built exactly as its own run
builds it), its data order (`batch_indices(seed, ...)`), its random stream (`train.noise:
torch`: each seed's RNG state is swapped in to draw that seed's noise, in the same order as its
own run would; `counter`: all seeds' noise in one vectorised call, a pure function of (seed,
iteration, draw, tensor, element) that its own run computes too: bench/counter_noise.py), and its
optimiser state (one Adam per seed on its slice of the stacked tensors: `SeedAdam`, torch's
fused kernel, so a diverged seed's step can be skipped on the device).
Results stay one folder per seed, in the single-run format: a group can be resumed seed by seed
and vice versa, and each seed's numbers equal its separate run's up to float rounding.

The loop itself is bench/group_loop.py (`GroupLoop`: the device-resident loop, with the rule
for a seed that diverges between two sync points) and its periodic evaluation, vectorised over
the seeds, bench/group_eval.py; the final evaluation of the seeds that finish together is
vectorised the same way (bench/group_final.py).

Like a Trainer, a group honours `stop_requested` (set by the worker on the scheduler's timeout
signal): every seed is checkpointed after the current iteration and `run` returns partial
records, which a new group (or single runs) resumes.

Estimators whose loss cannot run under vmap (data-dependent Python control flow, say) are
detected by a dry run and trained seed after seed instead, with a warning.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from bench.config import RunConfig, config_hash
from bench.counter_noise import CounterNoise, draw_sizes
from bench.datasets import Datasets, load_datasets
from bench.group_final import final_evaluations
from bench.group_loop import GroupLoop, _stack_noises
from bench.group_update import SeedAdam
from bench.train_setup import rng_state, set_rng_state
from bench.trainer import Trainer
from implementations.core.model import AIR, Noise
from implementations.registry import build_estimator

log = logging.getLogger(__name__)


class _LossModule(nn.Module):
    """Model and estimator under one root, so functional_call can swap all their tensors.

    `given_noise` (the group's template): the model's `draw_noise` answers from the noise
    passed to `forward` instead of drawing, so each seed's loss sees its own noise under vmap
    (the core model needs no hook for it: only this instance's method is replaced).
    """

    def __init__(self, model: AIR, estimator: nn.Module, given_noise: bool = False) -> None:
        super().__init__()
        self.model = model
        self.estimator = estimator
        self._noise: list[Noise] = []
        if given_noise:
            model.draw_noise = self._next_noise  # type: ignore[method-assign]

    def _next_noise(self, batch: int, device: torch.device, dtype: torch.dtype) -> Noise:
        if not self._noise:
            raise RuntimeError("the loss drew more noise than its dry run did")
        return self._noise.pop(0)

    def forward(self, x: torch.Tensor, noises: list[tuple], prior: float) -> tuple:
        """The loss with `noises` (each draw's tensors, in call order) as the model's noise."""
        self._noise[:] = [Noise(*n) for n in noises]
        out = self.estimator.loss(self.model, x, prior)
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
        self._stop_requested = False
        self._counter: tuple[tuple[int, ...], CounterNoise] | None = None  # train.noise=counter
        for cfg in cfgs:
            trainer = Trainer(cfg, data=self.data)  # builds and initialises from cfg.seed
            trainer.prepare()  # restores its checkpoint (and its RNG states) if it has one
            self.trainers.append(trainer)
            self.rng.append(rng_state(self.device))

    # ------------------------------------------------------------------ public
    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    @stop_requested.setter
    def stop_requested(self, value: bool) -> None:
        """Set from outside (a scheduler's timeout signal), as `Trainer.stop_requested`: every
        seed checkpoints after the current iteration and `run` returns partial records."""
        self._stop_requested = value
        for trainer in self.trainers:  # the seed-after-seed fallback runs Trainer.loop
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
            # A lone seed trains in the group loop too with train.compile_step (its whole step
            # is one graph there): a single run as a group of one.
            alone_ok = len(members) > 1 or self.cfg.train.compile_step
            if alone_ok and self._vectorisable():
                self._train_vectorised(members)
            else:
                for i in members:
                    if self.stop_requested:
                        break
                    self._train_alone(i)
            if self.stop_requested:
                break
        finals = final_evaluations(self)  # vectorised where the periodic one is (group_final)
        return [self._finish(t, finals.get(i)) for i, t in enumerate(self.trainers)]

    def _finish(self, trainer: Trainer, given: dict | None) -> dict[str, Any]:
        # After a stop, no final evaluation is started: S of them could outlast the grace time.
        if trainer.needs_training() or self.stop_requested:
            return {"status": "partial", "iteration": trainer.iteration}
        return trainer.finish(**(given or {}))  # given: the vectorised final evaluations

    # ------------------------------------------------------------------ strategies
    def _train_alone(self, i: int) -> None:
        trainer = self.trainers[i]
        set_rng_state(self.rng[i], self.device)
        trainer.loop(None)

    def loss_template(self, dense: bool = False) -> _LossModule:
        """A model and estimator of the group's config, used as the functional skeleton.

        Its image projection is sparse where a single run's is (vmap has a rule for the sparse
        product), unless `dense` (torch.func.grad cannot differentiate the sparse custom op)."""
        model_cfg = self.cfg.model
        if dense:
            model_cfg = type(model_cfg)(**{**vars(model_cfg), "sparse_images": False})
        with torch.random.fork_rng(devices=[]):
            model = AIR(model_cfg).to(self.device)
            estimator = build_estimator(self.cfg.estimator, model).to(self.device)
        return _LossModule(model, estimator, given_noise=True)

    def _vectorisable(self) -> bool:
        """Dry run of the vectorised loss on two copies of seed 0; False if vmap refuses it."""
        template = self.loss_template()
        params, buffers = self.stack_members([0, 0], template)
        x = torch.zeros(2, 2, self.cfg.model.canvas, self.cfg.model.canvas, device=self.device)
        try:
            with torch.random.fork_rng(devices=[]):
                requests = self.noise_requests(template, x[0])
                noises = [self._draw(template, requests) for _ in range(2)]
                stacked = _stack_noises(noises)
                loss = vmap(self.functional_loss(template), in_dims=(0, 0, 0, 0, None))
                loss(params, buffers, x, stacked, 0.5)
        except Exception as err:  # vmap raises several types for unsupported code
            log.warning(
                "estimator %r cannot be vectorised over seeds (%s: %s); seeds run one after "
                "another", self.cfg.estimator.name, type(err).__name__, err,
            )  # fmt: skip
            return False
        return True

    def _train_vectorised(self, members: list[int]) -> None:
        GroupLoop(self, members).run()

    # ------------------------------------------------------------------ helpers
    def functional_loss(self, template: _LossModule):  # noqa: ANN202
        def loss(params, buffers, x, noises, prior):  # noqa: ANN001, ANN202
            return functional_call(template, (params, buffers), (x, noises, prior))

        return loss

    def noise_requests(self, template: _LossModule, x: torch.Tensor) -> list[int]:
        """Batch sizes of the noise draws one loss evaluation makes, in order (dry run)."""
        return draw_sizes(template.model, template.estimator, x, 0.5)

    def _draw(self, template: _LossModule, requests: list[int]) -> list[tuple]:
        dtype = torch.get_default_dtype()
        draws = [AIR.draw_noise(template.model, b, self.device, dtype) for b in requests]
        return [(n.pres, n.where, n.what) for n in draws]

    def draw_for(self, i: int, template: _LossModule, requests: list[int]) -> list[tuple]:
        """Seed i's noise, from its own torch stream (the only generator the draws use)."""
        state = self.rng[i]
        torch.set_rng_state(state["torch"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)
        noise = self._draw(template, requests)
        state["torch"] = torch.get_rng_state()
        if "cuda" in state:
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return noise

    def draw_members(
        self, members: list[int], iteration: int, template: _LossModule, requests: list[int]
    ) -> list[tuple]:
        """The noise of seeds `members` at `iteration`: per draw, (pres, where, what) stacked
        along the seed axis. `train.noise=counter`: one vectorised call for every seed
        (bench/counter_noise.py); `torch`: each seed's own stream in turn (`draw_for`)."""
        if self.cfg.train.noise != "counter":
            return _stack_noises([self.draw_for(i, template, requests) for i in members])
        seeds = tuple(self.trainers[i].cfg.seed for i in members)
        if self._counter is None or self._counter[0] != seeds:
            self._counter = (seeds, CounterNoise(seeds, self.device))
        cfg = template.model.cfg
        draws = self._counter[1].draws(iteration, requests, cfg.max_steps, cfg.z_what_dim,
                                       torch.get_default_dtype())  # fmt: skip
        return [(n.pres, n.where, n.what) for n in draws]

    def _named_modules(self, trainer: Trainer) -> _LossModule:
        return _LossModule(trainer.model, trainer.estimator)

    def stack_members(self, members: list[int], template: _LossModule) -> tuple[dict, dict]:
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

    def stacked_optimiser(
        self, template: _LossModule, params: dict[str, torch.Tensor], trainers: list[Trainer]
    ) -> SeedAdam:
        """One Adam per seed over the stacked tensors, groups and state taken from the seeds'."""
        names = {id(p): n for n, p in template.named_parameters()}
        groups = [{"params": [params["model." + n] for n, _ in template.model.named_parameters()],
                   "lr": self.cfg.train.lr, "name": "model"}]  # fmt: skip
        for group in template.estimator.param_groups(self.cfg.train.lr):
            stacked = [params[names[id(p)]] for p in group["params"]]
            groups.append({**group, "params": stacked})
        optimiser = SeedAdam(groups, len(trainers))
        seed_states = [_state_by_name(t) for t in trainers]
        for name, p in params.items():
            per_seed = [s.get(name) for s in seed_states]
            if all(s is not None for s in per_seed):  # resumed seeds: carry their moments over
                state = optimiser.state[p]
                for key in ("exp_avg", "exp_avg_sq"):
                    state[key].copy_(torch.stack([s[key] for s in per_seed]))
                state["step"].copy_(torch.stack([s["step"].reshape(()) for s in per_seed]))
        return optimiser

    def sync_seed(
        self, j: int, members: list[int], params: dict, buffers: dict,
        optimiser: SeedAdam, template: _LossModule,
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
            state = optimiser.state[p]
            if state["step"][j] > 0:  # as torch's Adam: no state before a parameter's first step
                trainer.optimiser.state[own_params[name]] = {
                    "step": state["step"][j].clone(),
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


def train_group(cfgs: list[RunConfig], data: Datasets | None = None) -> list[dict[str, Any]]:
    """Train (or resume) the seeds of `cfgs` together; complete seeds are left as they are."""
    return SeedGroup(cfgs, data).run()
