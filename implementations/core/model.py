"""The AIR model (Eslami et al., 2016): generative model and inference network.

One forward pass runs the inference LSTM for `max_steps` steps. At each step it proposes a
presence `z_pres`, a window `z_where = (s, x, y)` and an appearance `z_what` read from the glimpse
under that window; the decoder draws the object and pastes it onto the canvas. Every term of the
ELBO is kept per step in a `Trace`, so estimators can build per-step learning signals from it.

The parts live beside it: its settings (`model_config.py`), what a pass takes and gives
(`trace.py`), the densities of its ELBO (`densities.py`), its networks (`networks.py`), the
sparse image projection (`sparse_projection.py`), the spatial transformer (`spatial.py`) and
the count priors (`priors.py`). Their public names are importable from here too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from implementations.core.densities import (
    LOG_2PI,
    concrete_logit_density,
    gaussian_kl,
    gaussian_log_prob,
    image_log_likelihood,
)
from implementations.core.model_config import ModelConfig, check_model_config
from implementations.core.networks import ImageLSTM, mlp
from implementations.core.priors import count_prior_step_log_probs
from implementations.core.sparse_projection import (
    FlatImages,
    sparse_projection,
    sparse_weight_grad,
)
from implementations.core.spatial import crop, paste, where_to_box
from implementations.core.trace import Noise, Trace

__all__ = [
    "AIR",
    "LOG_2PI",
    "FlatImages",
    "ImageLSTM",
    "ModelConfig",
    "Noise",
    "Trace",
    "mlp",
    "sparse_projection",
    "sparse_weight_grad",
]


class AIR(nn.Module):
    """Attend, Infer, Repeat with Bernoulli or Concrete presence, AIR or DAIR encoder."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        check_model_config(cfg)
        self.cfg = cfg
        pixels, glimpse = cfg.canvas**2, cfg.window**2
        self.latent_dim = 3 + cfg.z_what_dim + 1  # previous (z_where, z_what, z_pres)
        self.rnn = ImageLSTM(pixels, self.latent_dim, cfg.lstm_hidden)
        self.predict = mlp([cfg.lstm_hidden, cfg.predict_hidden, 1 + 3 + 3])
        self.encoder = mlp([glimpse, cfg.encoder_hidden, 2 * cfg.z_what_dim])
        self.decoder = mlp([cfg.z_what_dim, cfg.decoder_hidden, glimpse])
        with torch.no_grad():
            # Start the z_where posterior at the prior's mean with a small sd, and the decoder
            # mostly empty (Pyro's bias -2): a decoder that starts bright turns every step on.
            head = self.predict[-1]
            head.bias[1:4] = torch.tensor(cfg.where_prior_loc)
            if not cfg.where_scale_relative:
                head.bias[4:7] = math.log(math.expm1(cfg.where_scale_init))
            self.decoder[-1].bias.fill_(cfg.decoder_bias)
        self.register_buffer("where_prior_loc", torch.tensor(cfg.where_prior_loc))
        self.register_buffer("where_prior_scale", torch.tensor(cfg.where_prior_scale))

    # ----------------------------------------------------------------------------- inference
    def draw_noise(self, batch: int, device: torch.device, dtype: torch.dtype) -> Noise:
        """All the randomness of one forward pass, drawn up front in a fixed order.

        Drawing it before the pass (rather than inside each step) makes the model a pure
        function of (parameters, images, noise): several seeds can then be trained in one
        vectorised pass and still see exactly the random numbers their own runs would.
        """
        steps, what = self.cfg.max_steps, self.cfg.z_what_dim
        return Noise(
            pres=torch.rand(steps, batch, device=device, dtype=dtype),
            where=torch.randn(steps, batch, 3, device=device, dtype=dtype),
            what=torch.randn(steps, batch, what, device=device, dtype=dtype),
        )

    def forward(
        self,
        x: torch.Tensor,
        prior_prob: float | torch.Tensor,
        sample: bool = True,
        noise: Noise | None = None,
    ) -> Trace:
        """Run inference on images `x` (B, H, W) in [0, 1] and score the result.

        `prior_prob` is the current success probability of the geometric presence prior: a
        float, or a 0-d tensor under torch.compile (a float would be baked into the compiled
        graph and force a recompilation whenever an annealed prior moves).
        `sample=False` takes modes instead of samples (presence on iff its probability >= 0.5).
        `noise` (from `draw_noise`) is drawn from the global RNG when not given.

        Only what the next step needs runs inside the step loop (the LSTM, the heads, the glimpse
        and its encoding). Everything else is batched over the steps afterwards: each of the
        ~10 scoring terms is one op over (T, B) rather than T ops over (B,), and for AIR the
        decoder and the paste run once over T x B objects. Same maths as the step-by-step
        version in tests/plain_air.py, which tests/test_speed_equivalence.py checks it against.
        """
        if sample and noise is None:
            noise = self.draw_noise(x.shape[0], x.device, x.dtype)
        flat = self.flat_images(x)
        steps = self._infer(x, flat, noise if sample else None)
        trace = self._score(x, steps, prior_prob)
        trace.extras["flat_images"] = flat
        return trace

    def _infer(
        self, x: torch.Tensor, flat: FlatImages, noise: Noise | None
    ) -> dict[str, torch.Tensor]:
        """The sequential part: each step's latents, stacked to (T, B, ...).

        Modes instead of samples where `noise` is None.
        """
        cfg = self.cfg
        batch, dtype = x.shape[0], x.dtype
        state = None  # the LSTM's (h, c); None: zeros
        prev_latent = torch.cat([x.new_zeros(batch, 3 + cfg.z_what_dim), x.new_ones(batch, 1)], 1)
        canvas = torch.zeros_like(x)  # DAIR only: the encoder sees x minus what is drawn
        ran = x.new_ones(batch)  # step t runs only if every earlier step was on
        stop_sum = x.new_zeros(batch)  # relaxed: running sum of (1 - z_pres)
        relaxed = cfg.presence == "concrete"
        gate_after = relaxed and cfg.concrete_gate == "after"
        image_gates = None if cfg.dair else self.rnn.project(flat)
        steps: dict[str, list[torch.Tensor | None]] = {}

        for t in range(cfg.max_steps):
            seen = x - canvas if cfg.dair else x
            if cfg.dair:  # the input changes every step and is not sparse: dense product
                gates = self.rnn.project(FlatImages(seen.reshape(batch, -1), sparse=False))
            else:
                gates = image_gates
            state = self.rnn.step(gates, prev_latent, state)
            out = self.predict(state[0])
            pres_logit, where_loc = out[:, 0], out[:, 1:4]
            where_scale = F.softplus(out[:, 4:7])
            if cfg.where_scale_relative:
                where_scale = where_scale * self.where_prior_scale

            if noise is None:  # modes: on iff q's probability >= 0.5
                pres_y, z_pres = None, (pres_logit >= 0).to(dtype)
            elif relaxed:  # binary Concrete: y = (logit + Logistic noise) / temperature
                u = noise.pres[t].clamp(1e-6, 1 - 1e-6)
                pres_y = (pres_logit + (u.log() - (-u).log1p())) / cfg.concrete_temperature
                z_pres = torch.sigmoid(pres_y)
            else:  # u < p is a Bernoulli(p) draw
                pres_y = None
                z_pres = (noise.pres[t] < torch.sigmoid(pres_logit).detach()).to(dtype)
            z_pres = z_pres * ran

            z_where = where_loc if noise is None else where_loc + where_scale * noise.where[t]
            enc = self.encoder(crop(seen, z_where, cfg.window).reshape(batch, -1))
            what_loc, what_scale = enc[:, : cfg.z_what_dim], F.softplus(enc[:, cfg.z_what_dim :])
            z_what = what_loc if noise is None else what_loc + what_scale * noise.what[t]
            if relaxed:
                # Stop once enough "off" mass has accumulated (so an empty image can stop at
                # the first step); the stop is a hard decision, not differentiated through.
                stop_sum = stop_sum + (1 - z_pres)
                next_ran = ran * (stop_sum < cfg.concrete_stop).to(dtype)
            else:
                next_ran = z_pres
            kept = next_ran if gate_after else None  # drawn only if the updated sum is below
            if cfg.dair:
                weight = z_pres if kept is None else z_pres * kept
                canvas = canvas + weight[:, None, None] * self._draw(z_what, z_where)

            latents = dict(pres_logit=pres_logit, pres_y=pres_y, z_pres=z_pres, ran=ran,
                           where_loc=where_loc, where_scale=where_scale, z_where=z_where,
                           what_loc=what_loc, what_scale=what_scale, z_what=z_what,
                           kept=kept)  # fmt: skip
            for k, v in latents.items():
                steps.setdefault(k, []).append(v)
            ran = next_ran
            prev_latent = torch.cat([z_where, z_what, z_pres[:, None]], dim=1)

        stacked = {k: torch.stack(v) for k, v in steps.items() if v[0] is not None}
        if cfg.dair:
            stacked["canvas"] = canvas
        return stacked

    def _draw(self, z_what: torch.Tensor, z_where: torch.Tensor) -> torch.Tensor:
        """Decode objects (N, D) and paste them at z_where (N, 3): (N, canvas, canvas)."""
        w = self.cfg.window
        obj = torch.sigmoid(self.decoder(z_what)).view(-1, w, w)
        return paste(obj, z_where, self.cfg.canvas)

    def _score(
        self, x: torch.Tensor, s: dict[str, torch.Tensor], prior_prob: float | torch.Tensor
    ) -> Trace:
        """Every ELBO term of every step at once, from the stacked (T, B, ...) latents."""
        cfg = self.cfg
        z_pres, ran, logit = s["z_pres"], s["ran"], s["pres_logit"]
        kept = s.get("kept")  # relaxed presence gated after the stop-sum update
        drawn_weight = z_pres if kept is None else z_pres * kept
        if "canvas" in s:  # DAIR drew it step by step
            canvas = s["canvas"]
        else:  # one decoder pass and one paste over all T x B objects
            steps, batch = z_pres.shape
            drawn = self._draw(s["z_what"].flatten(0, 1), s["z_where"].flatten(0, 1))
            canvas = (drawn_weight[..., None, None] * drawn.view(steps, batch, *x.shape[1:])).sum(0)

        log_offset = None  # count prior: log of its mass, added once per sequence (step 0)
        if cfg.presence_prior == "count":
            on_t, off_t, offset = count_prior_step_log_probs(
                prior_prob, cfg.max_steps, cfg.count_prior_normalised
            )
            log_prior_on, log_prior_off = on_t.to(logit)[:, None], off_t.to(logit)[:, None]
            log_offset = torch.cat([offset.to(logit)[None], logit.new_zeros(cfg.max_steps - 1)])
            log_offset = log_offset[:, None]  # (T, 1)
        elif isinstance(prior_prob, torch.Tensor):
            log_prior_on, log_prior_off = prior_prob.log(), torch.log1p(-prior_prob)
        else:
            log_prior_on, log_prior_off = math.log(prior_prob), math.log1p(-prior_prob)
        pres_prob = torch.sigmoid(logit)
        if cfg.presence == "concrete":
            if "pres_y" in s:
                temp, y = cfg.concrete_temperature, s["pres_y"]
                prior_logit = log_prior_on - log_prior_off
                log_q = concrete_logit_density(y, logit, temp)
                log_p = concrete_logit_density(y, prior_logit, temp)
            else:  # modes: no density
                log_q = log_p = torch.zeros_like(logit)
            kl_pres = log_q - log_p  # no closed form for Concrete: one-sample estimate
        else:
            log_on, log_off = F.logsigmoid(logit), F.logsigmoid(-logit)
            log_q = z_pres * log_on + (1 - z_pres) * log_off
            log_p = z_pres * log_prior_on + (1 - z_pres) * log_prior_off
            # Closed-form Bernoulli KL (as addtt's PyTorch AIR): same expectation as the
            # sampled log q - log p, less variance.
            kl_pres = pres_prob * (log_on - log_prior_on) + (1 - pres_prob) * (
                log_off - log_prior_off
            )
        on_prob = None
        if cfg.presence_kl == "expected":  # q(n > t) and q(n >= t): differentiable weights
            on_prob = pres_prob.cumprod(0)
            reach = torch.cat([torch.ones_like(on_prob[:1]), on_prob[:-1]])
            kl_pres = kl_pres * reach
        else:
            kl_pres = kl_pres * ran
        log_q, log_p = log_q * ran, log_p * ran
        if log_offset is not None:  # ran[0] is 1: every sequence gets it once
            log_p, kl_pres = log_p + log_offset, kl_pres - log_offset

        where_loc, where_scale, z_where = s["where_loc"], s["where_scale"], s["z_where"]
        what_loc, what_scale, z_what = s["what_loc"], s["what_scale"], s["z_what"]
        p_loc, p_scale = self.where_prior_loc, self.where_prior_scale
        standard_loc, standard_scale = z_what.new_zeros(()), z_what.new_ones(())  # z_what's prior
        log_ratio = (
            gaussian_log_prob(z_where, p_loc, p_scale)
            - gaussian_log_prob(z_where, where_loc, where_scale)
            + gaussian_log_prob(z_what, standard_loc, standard_scale)
            - gaussian_log_prob(z_what, what_loc, what_scale)
        )
        # Window and appearance are scored only for steps that are on: weighted by the sampled
        # presence or, relaxed, by the gate (and z_pres if scaled). The KL may instead be
        # weighted by q(n > t) ("expected"); the sampled log-ratio never is.
        if cfg.presence == "concrete":
            gate = ran if kept is None else kept
            on = gate * z_pres if cfg.concrete_scale_kl else gate
        else:
            on = z_pres
        kl_on = on if on_prob is None else on_prob
        return Trace(
            z_pres=z_pres,
            pres_prob=pres_prob,
            ran=ran,
            z_where=z_where,
            z_what=z_what,
            log_q_pres=log_q,
            kl_pres=kl_pres,
            log_ratio_pres=log_p - log_q,
            kl_where=gaussian_kl(where_loc, where_scale, p_loc, p_scale) * kl_on,
            kl_what=gaussian_kl(what_loc, what_scale, standard_loc, standard_scale) * kl_on,
            log_ratio_cont=log_ratio * on,
            log_lik=self.log_likelihood(x, canvas),
            canvas=canvas,
            kept=kept,
        )

    def flat_images(self, x: torch.Tensor) -> FlatImages:
        """Flattened images, sparse where that is faster (see `ModelConfig.sparse_images`)."""
        sparse = self.cfg.sparse_images
        if sparse is None:
            # Measured on a 2-core CPU (NVIL AIR, batch 64, python -m bench.perf): 2 threads,
            # sparse 35-38 ms against dense 38-45 ms per step; 1 thread, 56 against 64. GPUs:
            # dense (the sparse path is not measured there).
            sparse = x.device.type == "cpu"
        return FlatImages(x.reshape(x.shape[0], -1), sparse=sparse)

    # ----------------------------------------------------------------------------- scoring
    def log_likelihood(self, x: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
        """(B,) log p(x | canvas) under the configured likelihood."""
        return image_log_likelihood(x, canvas, self.cfg.likelihood, self.cfg.likelihood_sd)

    def boxes(self, trace: Trace) -> torch.Tensor:
        """(T, B, 4) pixel boxes of every step's window."""
        return where_to_box(trace.z_where, self.cfg.canvas)

    def present_boxes(self, trace: Trace) -> list[torch.Tensor]:
        """Per image, the (count, 4) pixel boxes of the steps that are on, in step order (CPU)."""
        on = trace.on_mask().cpu()  # (T, B)
        step_boxes = self.boxes(trace).cpu()  # (T, B, 4)
        return [step_boxes[on[:, b], b] for b in range(on.shape[1])]
