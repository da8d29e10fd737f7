"""The plain AIR forward pass: one step at a time, every term computed where it arises.

This is the obviously-correct version the fast model is checked against
(tests/test_speed_equivalence.py). It reads the same parameters as `implementations.core.model.AIR`
and the same noise, but does everything the straightforward way: a dense image projection at
every step (with the image re-concatenated to the latent, as an `nn.LSTMCell` over
`[image, latent]` would), `affine_grid` + `grid_sample` for the spatial transformer, the decoder
and the paste inside the loop, and each step's KL and log-density terms inside the loop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from implementations.core.model import AIR, ModelConfig, Noise

LOG_2PI = math.log(2 * math.pi)


def grid_sample_paste(objects: torch.Tensor, z_where: torch.Tensor, canvas: int) -> torch.Tensor:
    """Pyro's spatial transformer: affine_grid + grid_sample with theta = [[s, 0, x], [0, s, y]]."""
    b, w = objects.shape[0], objects.shape[-1]
    s, x, y = z_where.unbind(-1)
    zero = torch.zeros_like(s)
    theta = torch.stack([torch.stack([s, zero, x], -1), torch.stack([zero, s, y], -1)], 1)
    grid = F.affine_grid(theta, [b, 1, canvas, canvas], align_corners=False)
    pasted = F.grid_sample(objects.view(b, 1, w, w), grid, align_corners=False)
    return pasted.view(b, canvas, canvas)


def grid_sample_crop(images: torch.Tensor, z_where: torch.Tensor, window: int) -> torch.Tensor:
    """The inverse transform: theta = [[1/s, 0, -x/s], [0, 1/s, -y/s]]."""
    s, x, y = z_where.unbind(-1)
    b, h, _ = images.shape
    zero = torch.zeros_like(s)
    theta = torch.stack(
        [torch.stack([1 / s, zero, -x / s], -1), torch.stack([zero, 1 / s, -y / s], -1)], 1
    )
    grid = F.affine_grid(theta, [b, 1, window, window], align_corners=False)
    return F.grid_sample(images.view(b, 1, h, h), grid, align_corners=False).view(b, window, window)


def lstm_step(rnn, image: torch.Tensor, latent: torch.Tensor, h, c):  # noqa: ANN001, ANN201
    """An LSTM cell over [image, latent, h]: the weights of `ImageLSTM`, used the plain way."""
    weight = torch.cat([rnn.image_weight.t(), rnn.recurrent.weight], dim=1)  # (4H, in)
    gates = F.linear(torch.cat([image, latent, h], dim=1), weight, rnn.image_bias)
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _kl(loc, scale, p_loc, p_scale):  # noqa: ANN001, ANN202
    return torch.distributions.kl_divergence(
        torch.distributions.Normal(loc, scale), torch.distributions.Normal(p_loc, p_scale)
    ).sum(-1)


def _log_prob(z, loc, scale):  # noqa: ANN001, ANN202
    return torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)


def plain_step_priors(
    cfg: ModelConfig, prior_prob: float
) -> tuple[list[float], list[float], float]:
    """Per step, log p(step on | it runs) and log p(off | runs), and a once-per-sequence offset.

    "per_step": log s and log(1 - s) at every step. "count": read off the table of the count
    prior p(n) = s^n (1 - s), n = 0..T (torch's Geometric over failures with failure
    probability 1 - s), normalised or not: p(on at t) = p(n > t) / p(n >= t), and the offset is
    the log of the table's mass, so that the per-step terms of a sequence sum to log p(n).
    """
    steps = cfg.max_steps
    if cfg.presence_prior == "per_step":
        return [math.log(prior_prob)] * steps, [math.log1p(-prior_prob)] * steps, 0.0
    s = torch.tensor(prior_prob, dtype=torch.float64)
    table = torch.distributions.Geometric(probs=1 - s).log_prob(torch.arange(steps + 1.0))
    if cfg.count_prior_normalised:
        table = table - torch.logsumexp(table, 0)
    at_least = [torch.logsumexp(table[t:], 0) for t in range(steps + 1)]
    log_on = [float(at_least[t + 1] - at_least[t]) for t in range(steps)]
    log_off = [float(table[t] - at_least[t]) for t in range(steps)]
    return log_on, log_off, float(at_least[0])


def plain_forward(model: AIR, x: torch.Tensor, prior_prob: float, noise: Noise) -> dict:
    """Every field of the model's `Trace`, computed step by step; returns a dict of tensors."""
    cfg = model.cfg
    b = x.shape[0]
    h = x.new_zeros(b, cfg.lstm_hidden)
    c = torch.zeros_like(h)
    latent = torch.cat([x.new_zeros(b, 3 + cfg.z_what_dim), x.new_ones(b, 1)], 1)
    canvas = torch.zeros_like(x)
    ran = x.new_ones(b)
    stop_sum = x.new_zeros(b)
    step_log_on, step_log_off, offset = plain_step_priors(cfg, prior_prob)
    reach = x.new_ones(b)  # presence_kl "expected": q's probability of reaching step t
    zeros, ones = x.new_zeros(cfg.z_what_dim), x.new_ones(cfg.z_what_dim)
    p_loc, p_scale = model.where_prior_loc, model.where_prior_scale
    out: dict[str, list[torch.Tensor]] = {}

    def keep(**terms: torch.Tensor) -> None:
        for k, v in terms.items():
            out.setdefault(k, []).append(v)

    for t in range(cfg.max_steps):
        log_on, log_off = step_log_on[t], step_log_off[t]
        seen = x - canvas if cfg.dair else x
        h, c = lstm_step(model.rnn, seen.reshape(b, -1), latent, h, c)
        head = model.predict(h)
        logit, where_loc, where_scale = head[:, 0], head[:, 1:4], F.softplus(head[:, 4:7])
        if cfg.where_scale_relative:  # Pyro's form: relative to the prior's sd
            where_scale = where_scale * torch.tensor(cfg.where_prior_scale)
        if cfg.presence == "concrete":
            temp = cfg.concrete_temperature
            u = noise.pres[t].clamp(1e-6, 1 - 1e-6)
            y = (logit + u.log() - (-u).log1p()) / temp
            z_pres = torch.sigmoid(y) * ran
            prior_logit = log_on - log_off

            # Density of y = (l + Logistic) / temp: temp * logistic_pdf(temp * y - l), with
            # log logistic_pdf(v) = log sigmoid(v) + log sigmoid(-v).
            v_q, v_p = temp * y - logit, temp * y - prior_logit
            log_q = (math.log(temp) + F.logsigmoid(v_q) + F.logsigmoid(-v_q)) * ran
            log_p = (math.log(temp) + F.logsigmoid(v_p) + F.logsigmoid(-v_p)) * ran
            kl_pres = log_q - log_p
        else:
            q = torch.distributions.Bernoulli(logits=logit)
            z_pres = (noise.pres[t] < q.probs.detach()).to(x.dtype) * ran
            prior = torch.distributions.Bernoulli(logits=torch.full_like(logit, log_on - log_off))
            log_q = q.log_prob(z_pres) * ran
            log_p = (z_pres * log_on + (1 - z_pres) * log_off) * ran
            kl_pres = torch.distributions.kl_divergence(q, prior)
            kl_pres = kl_pres * (reach if cfg.presence_kl == "expected" else ran)
        if t == 0:  # the count prior's mass, once per sequence
            log_p, kl_pres = log_p + offset, kl_pres - offset
        z_where = where_loc + where_scale * noise.where[t]
        enc = model.encoder(grid_sample_crop(seen, z_where, cfg.window).reshape(b, -1))
        what_loc, what_scale = enc[:, : cfg.z_what_dim], F.softplus(enc[:, cfg.z_what_dim :])
        z_what = what_loc + what_scale * noise.what[t]
        obj = torch.sigmoid(model.decoder(z_what)).view(b, cfg.window, cfg.window)
        pasted = z_pres[:, None, None] * grid_sample_paste(obj, z_where, cfg.canvas)
        if cfg.presence == "concrete":
            stop_sum = stop_sum + (1 - z_pres)
        # What the step adds to the canvas and how its window/appearance KL is weighted.
        if cfg.presence == "concrete" and cfg.concrete_gate == "after":
            # aakhundov's rule: gated on the stop sum after this step's update, KL unscaled.
            kept = stop_sum < cfg.concrete_stop
            canvas = canvas + torch.where(kept[:, None, None], pasted, torch.zeros_like(pasted))
            scale = z_pres if cfg.concrete_scale_kl else x.new_ones(b)
            weight = torch.where(kept, scale, torch.zeros_like(scale))
            keep(kept=kept.to(x.dtype))
        else:
            canvas = canvas + pasted
            unscaled = cfg.presence == "concrete" and not cfg.concrete_scale_kl
            weight = ran if unscaled else z_pres
        # presence_kl "expected": the KL (not the sampled log-ratio) weighted by q(n > t).
        kl_weight = reach * torch.sigmoid(logit) if cfg.presence_kl == "expected" else weight
        log_ratio = (
            _log_prob(z_where, p_loc, p_scale) - _log_prob(z_where, where_loc, where_scale)
            + _log_prob(z_what, zeros, ones) - _log_prob(z_what, what_loc, what_scale)
        )  # fmt: skip
        keep(z_pres=z_pres, pres_prob=torch.sigmoid(logit), ran=ran, z_where=z_where,
             z_what=z_what, log_q_pres=log_q, kl_pres=kl_pres, log_ratio_pres=log_p - log_q,
             kl_where=_kl(where_loc, where_scale, p_loc, p_scale) * kl_weight,
             kl_what=_kl(what_loc, what_scale, zeros, ones) * kl_weight,
             log_ratio_cont=log_ratio * weight)  # fmt: skip
        if cfg.presence == "concrete":
            ran = ran * (stop_sum < cfg.concrete_stop).to(x.dtype)
        else:
            ran = z_pres
        reach = reach * torch.sigmoid(logit)
        latent = torch.cat([z_where, z_what, z_pres[:, None]], 1)
    trace = {k: torch.stack(v) for k, v in out.items()}
    trace["canvas"] = canvas
    trace["log_lik"] = model.log_likelihood(x, canvas)
    return trace


def plain_nvil_baseline(estimator, x: torch.Tensor, trace: dict) -> torch.Tensor:  # noqa: ANN001
    """(T, B) NVIL's baseline values the plain way: its LSTM over [image, previous latents]."""
    b, steps = x.shape[0], trace["z_pres"].shape[0]
    prev = torch.cat([trace["z_where"], trace["z_what"], trace["z_pres"][..., None]], -1).detach()
    latent = torch.cat([x.new_zeros(b, prev.shape[-1] - 1), x.new_ones(b, 1)], 1)
    h = x.new_zeros(b, estimator.params.baseline_hidden)
    c = torch.zeros_like(h)
    values = []
    for t in range(steps):
        h, c = lstm_step(estimator.baseline_rnn, x.reshape(b, -1), latent, h, c)
        # The estimator's output scale (NVIL.Params.baseline_scale), where it has one.
        scale = getattr(estimator.params, "baseline_scale", 1.0)
        values.append(estimator.baseline_out(h).squeeze(-1) * scale)
        latent = prev[t]
    return torch.stack(values)
