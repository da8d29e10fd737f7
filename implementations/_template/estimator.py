"""Example estimator of the template: REINFORCE with a running-average baseline.

Only needed when a variant brings new code. If your variant only changes config, delete this
file and name one of the core's estimators in `variant.yaml` instead (see the comment there):
nothing else registers `reinforce_ema` for this folder.

The name registered here is this folder's own: `variant.yaml` in this folder names it bare
(`reinforce_ema`), the run config records it as `<folder>:reinforce_ema`, and another variant
folder can use it only by writing `<folder>:reinforce_ema` itself. Copies of this template
each train with their own copy of the code, never with each other's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from implementations.core.estimators import (
    Estimator,
    EstimatorOutput,
    downstream_elbo,
    register_estimator,
    score_function_surrogate,
)
from implementations.core.model import AIR


@register_estimator("reinforce_ema")
class ReinforceEMA(Estimator):
    """Score function for z_pres, centred by an exponential moving average of its signal."""

    @dataclass
    class Params:
        decay: float = 0.9  # weight of the past in the running average

    def __init__(self, model: AIR, params: Params) -> None:
        super().__init__(model, params)
        # A buffer, not a parameter: saved in checkpoints, never touched by the optimiser.
        self.register_buffer("average", torch.zeros(model.cfg.max_steps))

    def loss(self, model: AIR, x: torch.Tensor, prior_prob: float) -> EstimatorOutput:
        trace = model(x, prior_prob)
        elbo = trace.elbo()
        signal = downstream_elbo(trace).detach()  # (T, B)
        centred = signal - self.average[:, None]
        if self.training:
            with torch.no_grad():
                d = self.params.decay
                self.average.mul_(d).add_((1 - d) * signal.mean(1))
        surrogate = score_function_surrogate(trace.log_q_pres, centred, trace.ran)
        loss = -(elbo + surrogate).mean()
        return EstimatorOutput(loss=loss, trace=trace, logs={"elbo": elbo.mean().detach()})
