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
    dair: bool = False  # DAIR: the encoder sees the image minus the canvas drawn so far
    sparse_images: bool | None = None  # sparse image projection; None: single-threaded CPU only
    presence: str = "bernoulli"  # "bernoulli" (discrete z_pres) or "concrete" (relaxed)
    concrete_temperature: float = 1.0  # temperature of the Concrete relaxation
    concrete_stop: float = 0.99  # relaxed: stop once the running sum of (1 - z_pres) reaches it


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
    (an earlier `z_pres` was 0) contributes zero.
    """

    z_pres: torch.Tensor  # (T, B) sampled presence (0/1, or relaxed in (0, 1))
    pres_prob: torch.Tensor  # (T, B) q's probability that step t is on, given it runs
    ran: torch.Tensor  # (T, B) 1 where step t ran (all earlier steps were on)
    z_where: torch.Tensor  # (T, B, 3)
    z_what: torch.Tensor  # (T, B, D)
    log_q_pres: torch.Tensor  # (T, B) log q of the sampled presence (score-function term)
    kl_pres: torch.Tensor  # (T, B) presence KL: analytic (Bernoulli) or sampled (Concrete)
    log_ratio_pres: torch.Tensor  # (T, B) sampled log p - log q of the presence
    kl_where: torch.Tensor  # (T, B) analytic KL of z_where, for steps that are on
    kl_what: torch.Tensor  # (T, B) analytic KL of z_what, for steps that are on
    log_ratio_cont: torch.Tensor  # (T, B) sampled log p - log q of z_where and z_what
    log_lik: torch.Tensor  # (B,) log p(x | z)
    canvas: torch.Tensor  # (B, H, W) reconstruction
    extras: dict = field(default_factory=dict)  # variant-specific tensors

    def kl(self) -> torch.Tensor:
        """(T, B) KL contribution of each step."""
        return self.kl_pres + self.kl_where + self.kl_what

    def elbo(self) -> torch.Tensor:
        """(B,) single-sample ELBO in nats per image."""
        return self.log_lik - self.kl().sum(0)

    def log_weight(self) -> torch.Tensor:
        """(B,) importance weight log p(x, z) - log q(z | x) with every latent sampled."""
        return self.log_lik + self.log_ratio_pres.sum(0) + self.log_ratio_cont.sum(0)

    def counts(self) -> torch.Tensor:
        """(B,) number of steps that were on (relaxed presence rounded at 0.5)."""
        return (self.z_pres >= 0.5).long().cumprod(0).sum(0)


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
    """A batch of flattened images, with sparse copies made once and shared by every user.

    Multi-MNIST canvases are ~95 % zeros, so on CPU the image projection (the model's largest
    matrix product, 2500 x 4H) runs as a sparse-times-dense product; the model and NVIL's
    baseline both project the same images, so the CSR copies are built once per batch.
    """

    def __init__(self, flat: torch.Tensor, sparse: bool) -> None:
        self.dense = flat
        self.sparse = sparse and not flat.requires_grad
        self._csr: tuple[torch.Tensor, torch.Tensor] | None = None

    def csr(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(images as CSR, transposed images as CSR): for the forward and the weight gradient."""
        if self._csr is None:
            with warnings.catch_warnings():  # "CSR support is in beta": the two ops used here
                warnings.simplefilter("ignore")  # are checked against dense products in tests
                self._csr = (self.dense.to_sparse_csr(), self.dense.t().to_sparse_csr())
        return self._csr


class _SparseProjection(torch.autograd.Function):
    """`bias + images @ weight` with sparse images; gradients for weight and bias only."""

    @staticmethod
    def forward(ctx, images_csr, images_t_csr, weight, bias):  # noqa: ANN001, ANN205
        ctx.images_t_csr = images_t_csr
        return torch.addmm(bias, images_csr, weight)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        grad_weight = torch.sparse.mm(ctx.images_t_csr, grad)  # images^T @ grad, nnz-bound
        return None, None, grad_weight, grad.sum(0)


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
            csr, csr_t = images.csr()
            return _SparseProjection.apply(csr, csr_t, self.image_weight, self.image_bias)
        return torch.addmm(self.image_bias, images.dense, self.image_weight)

    def step(
        self, image_gates: torch.Tensor, latent: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        gates = image_gates + self.recurrent(torch.cat([latent, h], dim=1))
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
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
            head.bias[4:7] = math.log(math.expm1(cfg.where_scale_init))
            self.decoder[-1].bias.fill_(cfg.decoder_bias)
        # Noise for the next forward passes, in call order: lets a caller (the seed-vectorised
        # trainer) supply each seed's own random numbers; empty means "draw from the RNG".
        self.noise_queue: list[Noise] = []
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
        self, x: torch.Tensor, prior_prob: float, sample: bool = True, noise: Noise | None = None
    ) -> Trace:
        """Run inference on images `x` (B, H, W) in [0, 1] and score the result.

        `prior_prob` is the current success probability of the geometric presence prior.
        `sample=False` takes modes instead of samples (presence on iff its probability >= 0.5).
        `noise` (from `draw_noise`) is drawn from the global RNG when not given.
        """
        cfg = self.cfg
        batch = x.shape[0]
        flat = self.flat_images(x)
        h = x.new_zeros(batch, cfg.lstm_hidden)
        c = torch.zeros_like(h)
        prev_latent = torch.cat(
            [x.new_zeros(batch, 3 + cfg.z_what_dim), x.new_ones(batch, 1)], dim=1
        )
        canvas = torch.zeros_like(x)
        ran = x.new_ones(batch)  # step t runs only if every earlier step was on
        image_gates = None if cfg.dair else self.rnn.project(flat)
        log_prior_on, log_prior_off = math.log(prior_prob), math.log1p(-prior_prob)
        relaxed = cfg.presence == "concrete"
        stop_sum = x.new_zeros(batch)  # relaxed: running sum of (1 - z_pres)
        steps: dict[str, list[torch.Tensor]] = {k: [] for k in _STEP_KEYS}
        if sample and noise is None:
            queued = self.noise_queue.pop(0) if self.noise_queue else None
            noise = queued or self.draw_noise(batch, x.device, x.dtype)

        for t in range(cfg.max_steps):
            seen = x - canvas if cfg.dair else x
            if cfg.dair:  # the input changes every step and is not sparse: dense product
                gates = self.rnn.project(FlatImages(seen.reshape(batch, -1), sparse=False))
            else:
                gates = image_gates
            h, c = self.rnn.step(gates, prev_latent, h, c)
            out = self.predict(h)
            pres_logit, where_loc = out[:, 0], out[:, 1:4]
            where_scale = F.softplus(out[:, 4:7])

            # Presence. Sampled first: the window and appearance are only scored when it is on.
            if relaxed:
                u = noise.pres[t] if sample else None
                z_pres, log_q, log_p = self._concrete_presence(pres_logit, prior_prob, u)
                z_pres = z_pres * ran
                kl_pres = log_q - log_p  # no closed form for Concrete: one-sample estimate
            else:
                if sample:  # u < p is a Bernoulli(p) draw
                    z_pres = (noise.pres[t] < torch.sigmoid(pres_logit).detach()).to(x.dtype)
                else:
                    z_pres = (pres_logit >= 0).to(x.dtype)
                z_pres = z_pres * ran
                log_q = z_pres * F.logsigmoid(pres_logit) + (1 - z_pres) * F.logsigmoid(-pres_logit)
                log_p = z_pres * log_prior_on + (1 - z_pres) * log_prior_off
                # Closed-form Bernoulli KL (as addtt's PyTorch AIR): same expectation as the
                # sampled log q - log p, less variance.
                q_on = torch.sigmoid(pres_logit)
                kl_pres = q_on * (F.logsigmoid(pres_logit) - log_prior_on) + (1 - q_on) * (
                    F.logsigmoid(-pres_logit) - log_prior_off
                )
            log_q, log_p, kl_pres = log_q * ran, log_p * ran, kl_pres * ran

            z_where = where_loc + where_scale * noise.where[t] if sample else where_loc
            glimpse = crop(seen, z_where, cfg.window).reshape(batch, -1)
            enc = self.encoder(glimpse)
            what_loc, what_scale = enc[:, : cfg.z_what_dim], F.softplus(enc[:, cfg.z_what_dim :])
            z_what = what_loc + what_scale * noise.what[t] if sample else what_loc
            obj = torch.sigmoid(self.decoder(z_what)).view(batch, cfg.window, cfg.window)
            canvas = canvas + z_pres[:, None, None] * paste(obj, z_where, cfg.canvas)

            on = z_pres
            zeros_what = torch.zeros_like(what_loc)
            ones_what = torch.ones_like(what_loc)
            kl_where = _gaussian_kl(
                where_loc, where_scale, self.where_prior_loc, self.where_prior_scale
            )
            kl_what = _gaussian_kl(what_loc, what_scale, zeros_what, ones_what)
            log_ratio = (
                _gaussian_log_prob(z_where, self.where_prior_loc, self.where_prior_scale)
                - _gaussian_log_prob(z_where, where_loc, where_scale)
                + _gaussian_log_prob(z_what, zeros_what, ones_what)
                - _gaussian_log_prob(z_what, what_loc, what_scale)
            )
            steps["z_pres"].append(z_pres)
            steps["pres_prob"].append(torch.sigmoid(pres_logit))
            steps["ran"].append(ran)
            steps["z_where"].append(z_where)
            steps["z_what"].append(z_what)
            steps["log_q_pres"].append(log_q)
            steps["kl_pres"].append(kl_pres)
            steps["log_ratio_pres"].append(log_p - log_q)
            steps["kl_where"].append(kl_where * on)
            steps["kl_what"].append(kl_what * on)
            steps["log_ratio_cont"].append(log_ratio * on)

            if relaxed:
                # Stop once enough "off" mass has accumulated (so an empty image can stop at
                # the first step); the stop is a hard decision, not differentiated through.
                stop_sum = stop_sum + (1 - z_pres)
                ran = ran * (stop_sum < cfg.concrete_stop).to(x.dtype)
            else:
                ran = z_pres
            prev_latent = torch.cat([z_where, z_what, z_pres[:, None]], dim=1)

        stacked = {k: torch.stack(v) for k, v in steps.items()}
        trace = Trace(log_lik=self.log_likelihood(x, canvas), canvas=canvas, **stacked)
        trace.extras["flat_images"] = flat
        return trace

    def flat_images(self, x: torch.Tensor) -> FlatImages:
        """Flattened images, sparse where that is faster (see `ModelConfig.sparse_images`)."""
        sparse = self.cfg.sparse_images
        if sparse is None:
            # Measured on a 2-core CPU (NVIL AIR, batch 64): one thread, sparse 58 ms against
            # dense 65 ms per iteration; two threads, dense 43 ms against sparse 45 ms (the dense
            # product uses both cores, the sparse one does not). GPUs: dense.
            sparse = x.device.type == "cpu" and torch.get_num_threads() == 1
        return FlatImages(x.reshape(x.shape[0], -1), sparse=sparse)

    def _concrete_presence(
        self, logit: torch.Tensor, prior_prob: float, uniform: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Relaxed (binary Concrete) presence with Monte Carlo log densities of q and p."""
        temp = self.cfg.concrete_temperature
        if uniform is None:  # mode
            z = (logit >= 0).to(logit.dtype)
            return z, torch.zeros_like(logit), torch.zeros_like(logit)
        u = uniform.clamp(1e-6, 1 - 1e-6)
        noise = u.log() - (-u).log1p()
        y = (logit + noise) / temp  # logit of the relaxed sample
        prior_logit = math.log(prior_prob) - math.log1p(-prior_prob)
        z = torch.sigmoid(y)
        return (
            z,
            _concrete_logit_density(y, logit, temp),
            _concrete_logit_density(y, prior_logit, temp),
        )

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
        on = (trace.z_pres >= 0.5).cumprod(0).bool().cpu()  # (T, B)
        step_boxes = self.boxes(trace).cpu()  # (T, B, 4)
        return [step_boxes[on[:, b], b] for b in range(on.shape[1])]


def _concrete_logit_density(
    y: torch.Tensor, logit: torch.Tensor | float, temp: float
) -> torch.Tensor:
    """log density of a binary Concrete sample, parameterised by its logit `y`.

    With y = (logit + Logistic noise) / temp, y is a scaled logistic variable; scoring in logit
    space avoids the sigmoid's saturation (Maddison et al., 2017, appendix C).
    """
    d = logit - temp * y
    return math.log(temp) + d - 2 * F.softplus(d)


_STEP_KEYS = (
    "z_pres",
    "pres_prob",
    "ran",
    "z_where",
    "z_what",
    "log_q_pres",
    "kl_pres",
    "log_ratio_pres",
    "kl_where",
    "kl_what",
    "log_ratio_cont",
)
