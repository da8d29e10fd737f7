"""The AIR model (Eslami et al., 2016): generative model and inference network in one module.

One forward pass runs the inference LSTM for `max_steps` steps. At each step it proposes a
presence `z_pres`, a window `z_where = (s, x, y)` and an appearance `z_what` read from the glimpse
under that window; the decoder draws the object and pastes it onto the canvas. Every term of the
ELBO is kept per step in a `Trace`, so estimators can build per-step learning signals from it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from implementations.core.priors import count_prior_step_log_probs
from implementations.core.spatial import crop, paste, where_to_box

LOG_2PI = math.log(2 * math.pi)


@dataclass
class ModelConfig:
    """Architecture and generative-model settings (defaults: the PyTorch/Pyro AIR settings)."""

    canvas: int = 50  # side of the square input images, in pixels
    window: int = 28  # side of the glimpse read by the encoder and of the decoded object
    max_steps: int = 3  # at most this many objects per image
    lstm_hidden: int = 256  # units of the inference LSTM
    z_what_dim: int = 50  # appearance code size
    encoder_hidden: int = 200  # hidden units of the glimpse encoder (z_what posterior)
    decoder_hidden: int = 200  # hidden units of the object decoder
    predict_hidden: int = 200  # hidden units of the LSTM -> (z_pres, z_where) head
    decoder_bias: float = -2.0  # output bias before the sigmoid: objects start mostly empty
    likelihood: str = "gaussian"  # "gaussian" or "bernoulli"
    likelihood_sd: float = 0.3  # sd of the Gaussian likelihood
    where_prior_loc: list[float] = field(default_factory=lambda: [3.0, 0.0, 0.0])
    where_prior_scale: list[float] = field(default_factory=lambda: [0.2, 1.0, 1.0])
    where_scale_init: float = 0.1  # initial posterior sd of z_where (keeps early zooms sane)
    # True: Pyro's form (examples/air/air.py, guide_step): sd = softplus(out) * prior sd, the
    # head's bias left at nn.Linear's init, so the sd starts near 0.69 x (0.2, 1, 1);
    # `where_scale_init` is then unused. False: sd = softplus(out), starting at where_scale_init.
    where_scale_relative: bool = False
    dair: bool = False  # DAIR: the encoder sees the image minus the canvas drawn so far
    sparse_images: bool | None = None  # sparse image projection; None: on CPU, not on GPUs
    presence: str = "bernoulli"  # "bernoulli" (discrete z_pres) or "concrete" (relaxed)
    concrete_temperature: float = 1.0  # temperature of the Concrete relaxation
    concrete_stop: float = 0.99  # relaxed: stop once the running sum of (1 - z_pres) reaches it
    # Relaxed: which stop sum decides whether a step's object is drawn and its window and
    # appearance are scored. "before": the sum before this step's (1 - z_pres) is added, so the
    # step that crosses `concrete_stop` is still drawn (this harness's original rule); "after":
    # the sum after it, so that step is not drawn and its KL not counted (aakhundov's
    # air_model.py, where the canvas and the where/what KL are gated on the updated stop sum).
    # The presence KL is always counted for every step that ran (both rules, and aakhundov's).
    concrete_gate: str = "before"
    # Relaxed: True multiplies the window and appearance KL of each step by its relaxed z_pres
    # (the original rule); False counts it unscaled wherever the gate is on (aakhundov).
    concrete_scale_kl: bool = True
    # Prior on the number of objects n, from the success probability s (prior.* in the run
    # config). "per_step": a Bernoulli(s) prior on each step that runs, i.e. a geometric cut at
    # max_steps whose last count takes the whole tail, p(max_steps) = s^max_steps (Pyro, addtt);
    # "count": p(n) = s^n (1 - s) for n = 0..max_steps (akosiorek's prior.py), under which the
    # last step costs log s like every other one instead of gaining log(s / (1 - s)).
    presence_prior: str = "per_step"
    # "count" prior only: False keeps akosiorek's truncated table as it is (its mass is
    # 1 - s^(max_steps + 1): the KL gains the constant -log of it, 14.7 nats at s = 1 - 1e-7,
    # 0.06 at s = 0.5, 1e-4 at s = 0.1; no gradient changes); True divides by that mass.
    count_prior_normalised: bool = False
    # Bernoulli presence: how the KL terms are weighted. "sampled": the presence KL of each step
    # that ran and the window/appearance KL of each step that is on, for the sampled presences
    # (Pyro, addtt); "expected": each step's presence KL by q's probability of reaching the step
    # and its window/appearance KL by q's probability that it is on (q(n > t)), which makes the
    # presence KL exactly KL(q(n) || p(n)) over counts and differentiable in the presence
    # probabilities (akosiorek's model.py, `analytic=True`). The sampled log-ratios of the
    # importance weight are the same either way.
    presence_kl: str = "sampled"


@dataclass
class Noise:
    """Standard noise for one forward pass; shapes (T, B), (T, B, 3), (T, B, D)."""

    pres: torch.Tensor  # uniform: Bernoulli draws (u < p) or Concrete's logistic noise
    where: torch.Tensor  # standard normal, reparameterises z_where
    what: torch.Tensor  # standard normal, reparameterises z_what


@dataclass
class Trace:
    """Everything one forward pass sampled, with the ELBO kept per step.

    Shapes: T = max_steps, B = batch. Per-step terms are already masked: a step that did not run
    (an earlier `z_pres` was 0) contributes zero, except to the KL terms under
    `presence_kl: expected`, which weight every step by q's probabilities instead.
    """

    z_pres: torch.Tensor  # (T, B) sampled presence (0/1, or relaxed in (0, 1))
    pres_prob: torch.Tensor  # (T, B) q's probability that step t is on, given it runs
    ran: torch.Tensor  # (T, B) 1 where step t ran (all earlier steps were on)
    z_where: torch.Tensor  # (T, B, 3)
    z_what: torch.Tensor  # (T, B, D)
    log_q_pres: torch.Tensor  # (T, B) log q of the sampled presence (score-function term)
    kl_pres: torch.Tensor  # (T, B) presence KL: analytic (Bernoulli) or sampled (Concrete)
    log_ratio_pres: torch.Tensor  # (T, B) sampled log p - log q of the presence
    kl_where: torch.Tensor  # (T, B) analytic KL of z_where, weighted as `presence_kl` says
    kl_what: torch.Tensor  # (T, B) analytic KL of z_what, weighted as `presence_kl` says
    log_ratio_cont: torch.Tensor  # (T, B) sampled log p - log q of z_where and z_what
    log_lik: torch.Tensor  # (B,) log p(x | z)
    canvas: torch.Tensor  # (B, H, W) reconstruction
    extras: dict = field(default_factory=dict)  # variant-specific tensors
    # (T, B) relaxed presence with `concrete_gate: after` only: 1 where the step's object is
    # drawn (the stop sum after its update is still below `concrete_stop`); None otherwise.
    kept: torch.Tensor | None = None

    def kl(self) -> torch.Tensor:
        """(T, B) KL contribution of each step."""
        return self.kl_pres + self.kl_where + self.kl_what

    def elbo(self) -> torch.Tensor:
        """(B,) single-sample ELBO in nats per image."""
        return self.log_lik - self.kl().sum(0)

    def log_weight(self) -> torch.Tensor:
        """(B,) importance weight log p(x, z) - log q(z | x) with every latent sampled."""
        return self.log_lik + self.log_ratio_pres.sum(0) + self.log_ratio_cont.sum(0)

    def on_mask(self) -> torch.Tensor:
        """(T, B) bool: the steps counted as objects, always a prefix of the steps.

        Relaxed presence rounded at 0.5; with `concrete_gate: after`, the steps that are drawn
        (aakhundov counts a step when the stop sum after it is below the threshold).
        """
        if self.kept is not None:
            return self.kept > 0
        return (self.z_pres >= 0.5).long().cumprod(0).bool()

    def counts(self) -> torch.Tensor:
        """(B,) number of steps that were on (see `on_mask`)."""
        return self.on_mask().long().sum(0)


def _gaussian_kl(
    loc: torch.Tensor, scale: torch.Tensor, p_loc: torch.Tensor, p_scale: torch.Tensor
) -> torch.Tensor:
    """KL(N(loc, scale) || N(p_loc, p_scale)), summed over the last dimension."""
    var_ratio = (scale / p_scale) ** 2
    mean_term = ((loc - p_loc) / p_scale) ** 2
    return 0.5 * (var_ratio + mean_term - 1 - var_ratio.log()).sum(-1)


def _gaussian_log_prob(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """log N(z; loc, scale), summed over the last dimension."""
    return (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * LOG_2PI).sum(-1)


class FlatImages:
    """A batch of flattened images, and whether to project them as sparse matrices.

    Multi-MNIST canvases are ~95 % zeros, so on CPU the image projection (the model's largest
    matrix product, 2500 x 4H) runs as a sparse-times-dense product (`sparse_projection`).
    """

    def __init__(self, flat: torch.Tensor, sparse: bool) -> None:
        self.dense = flat
        self.sparse = sparse and not flat.requires_grad


class _CsrCache:
    """The CSR copies of the last images projected, shared by the model and NVIL's baseline.

    Both project the same batch, forward and backward, so its CSR form (and its transpose's)
    is built once per batch. The cache keeps a reference to the images it was built from, so
    their memory cannot be reused while the entry lives: an equal data pointer, version counter,
    shape and strides then means the very same values.
    """

    def __init__(self) -> None:
        self._entries: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, images: torch.Tensor, transpose: bool) -> torch.Tensor:
        hit = self._entries.get(transpose)
        if hit is not None and _same_tensor(hit[0], images):
            return hit[1]
        with warnings.catch_warnings():  # "CSR support is in beta": the two products used
            warnings.simplefilter("ignore")  # here are checked against dense ones in tests
            if transpose:  # from the forward's CSR when it is there: half the time of a dense t()
                forward = self._entries.get(False)
                source = forward[1].t() if forward and _same_tensor(forward[0], images) else None
                csr = (source if source is not None else images.t()).to_sparse_csr()
            else:
                csr = images.to_sparse_csr()
        self._entries[transpose] = (images, csr)
        return csr


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.data_ptr() == b.data_ptr()
        and a._version == b._version
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
        and a.device == b.device
    )


_CSR = _CsrCache()


# Custom ops rather than an autograd.Function: torch.compile cannot trace sparse tensors, but
# it can call an opaque op, so the whole loss still compiles into one graph (`train.compile`).
@torch.library.custom_op("air::sparse_projection", mutates_args=())
def sparse_projection(
    images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """`bias + images @ weight` computed from the CSR form of `images` (nnz-bound)."""
    return torch.addmm(bias, _CSR.get(images, transpose=False), weight)


@torch.library.custom_op("air::sparse_weight_grad", mutates_args=())
def sparse_weight_grad(images: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """`images^T @ grad` from the CSR form of `images^T`: the projection's weight gradient."""
    # Written straight into a fresh buffer with beta=0: torch.sparse.mm zero-fills a temporary
    # and copies it out, which measured 3x slower than the product itself at 2500 x 1024.
    out = grad.new_empty(images.shape[1], grad.shape[1])
    return torch.addmm(out, _CSR.get(images, transpose=True), grad, beta=0, out=out)


@sparse_projection.register_fake
def _(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return images.new_empty(images.shape[0], weight.shape[1])


@sparse_weight_grad.register_fake
def _(images: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return grad.new_empty(images.shape[1], grad.shape[1])


def _projection_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    ctx.save_for_backward(inputs[0])


def _projection_backward(ctx, grad):  # noqa: ANN001, ANN202
    (images,) = ctx.saved_tensors
    return None, sparse_weight_grad(images, grad), grad.sum(0)  # no gradient for the images


sparse_projection.register_autograd(_projection_backward, setup_context=_projection_setup)


class ImageLSTM(nn.Module):
    """An LSTM cell whose input is (image, small latent vector).

    The image part of the input projection is split off so that it can be computed once per
    image rather than once per step: in AIR the image does not change between steps, and that
    projection (2500 x 4H) is the largest matrix product of the model. Its weight is stored
    input-major (pixels x 4H) so that sparse rows of the image read contiguous weight rows.
    """

    def __init__(self, image_dim: int, latent_dim: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        bound = 1.0 / math.sqrt(image_dim)  # nn.Linear's default initialisation
        self.image_weight = nn.Parameter(torch.empty(image_dim, 4 * hidden).uniform_(-bound, bound))
        self.image_bias = nn.Parameter(torch.empty(4 * hidden).uniform_(-bound, bound))
        self.recurrent = nn.Linear(latent_dim + hidden, 4 * hidden, bias=False)

    def project(self, images: FlatImages) -> torch.Tensor:
        if images.sparse:
            return sparse_projection(images.dense, self.image_weight, self.image_bias)
        return torch.addmm(self.image_bias, images.dense, self.image_weight)

    def step(
        self,
        image_gates: torch.Tensor,
        latent: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One LSTM step from `state` = (h, c); None is the zero state of the first step.

        From the zero state the recurrent product needs only the latent's columns of the
        weight (h = 0 adds exact zeros) and the forget gate has nothing to forget: a 54-wide
        product instead of a 310-wide one, with the same values and gradients.
        """
        weight = self.recurrent.weight  # (4H, latent + H)
        if state is None:
            gates = torch.addmm(image_gates, latent, weight[:, : latent.shape[1]].t())
        else:
            gates = torch.addmm(image_gates, torch.cat([latent, state[0]], dim=1), weight.t())
        # One sigmoid over all four gate blocks (the g block's is unused): fewer ops per step.
        i, f, _, o = torch.sigmoid(gates).chunk(4, dim=1)
        g = torch.tanh(gates[:, 2 * self.hidden : 3 * self.hidden])
        c = i * g if state is None else f * state[1] + i * g
        h = o * torch.tanh(c)
        return h, c

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        # Checkpoints written before the input-major layout stored an nn.Linear (4H x pixels).
        old_weight, old_bias = prefix + "image_proj.weight", prefix + "image_proj.bias"
        if old_weight in state_dict:
            state_dict[prefix + "image_weight"] = state_dict.pop(old_weight).t().contiguous()
            state_dict[prefix + "image_bias"] = state_dict.pop(old_bias)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class AIR(nn.Module):
    """Attend, Infer, Repeat with Bernoulli or Concrete presence, AIR or DAIR encoder."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.likelihood not in ("gaussian", "bernoulli"):
            raise ValueError(
                f"model.likelihood must be 'gaussian' or 'bernoulli', got {cfg.likelihood!r}"
            )
        if cfg.presence not in ("bernoulli", "concrete"):
            raise ValueError(
                f"model.presence must be 'bernoulli' or 'concrete', got {cfg.presence!r}"
            )
        _check_presence_options(cfg)
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
                log_q = _concrete_logit_density(y, logit, temp)
                log_p = _concrete_logit_density(y, prior_logit, temp)
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
            _gaussian_log_prob(z_where, p_loc, p_scale)
            - _gaussian_log_prob(z_where, where_loc, where_scale)
            + _gaussian_log_prob(z_what, standard_loc, standard_scale)
            - _gaussian_log_prob(z_what, what_loc, what_scale)
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
            kl_where=_gaussian_kl(where_loc, where_scale, p_loc, p_scale) * kl_on,
            kl_what=_gaussian_kl(what_loc, what_scale, standard_loc, standard_scale) * kl_on,
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
        if self.cfg.likelihood == "gaussian":
            sd = self.cfg.likelihood_sd
            per_pixel = -0.5 * ((x - canvas) / sd) ** 2 - math.log(sd) - 0.5 * LOG_2PI
        else:
            p = canvas.clamp(1e-6, 1 - 1e-6)
            per_pixel = x * p.log() + (1 - x) * (-p).log1p()
        return per_pixel.flatten(1).sum(1)

    def boxes(self, trace: Trace) -> torch.Tensor:
        """(T, B, 4) pixel boxes of every step's window."""
        return where_to_box(trace.z_where, self.cfg.canvas)

    def present_boxes(self, trace: Trace) -> list[torch.Tensor]:
        """Per image, the (count, 4) pixel boxes of the steps that are on, in step order (CPU)."""
        on = trace.on_mask().cpu()  # (T, B)
        step_boxes = self.boxes(trace).cpu()  # (T, B, 4)
        return [step_boxes[on[:, b], b] for b in range(on.shape[1])]


_CHOICES = {
    "concrete_gate": ("before", "after"),
    "presence_prior": ("per_step", "count"),
    "presence_kl": ("sampled", "expected"),
}


def _check_presence_options(cfg: ModelConfig) -> None:
    """ValueError naming the field for a bad choice or an unsupported combination."""
    for name, choices in _CHOICES.items():
        value = getattr(cfg, name)
        if value not in choices:
            raise ValueError(f"model.{name} must be one of {list(choices)}, got {value!r}")
    if cfg.presence_kl == "expected" and cfg.presence != "bernoulli":
        raise ValueError(
            "model.presence_kl 'expected' needs model.presence 'bernoulli' (the Concrete "
            "relaxation has no closed-form presence KL to take in expectation)"
        )


def _concrete_logit_density(
    y: torch.Tensor, logit: torch.Tensor | float, temp: float
) -> torch.Tensor:
    """log density of a binary Concrete sample, parameterised by its logit `y`.

    With y = (logit + Logistic noise) / temp, y is a scaled logistic variable; scoring in logit
    space avoids the sigmoid's saturation (Maddison et al., 2017, appendix C).
    """
    d = logit - temp * y
    return math.log(temp) + d - 2 * F.softplus(d)
