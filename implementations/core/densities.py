"""The closed-form densities of AIR's ELBO: Gaussian log densities and KL (z_where, z_what), the
binary Concrete density of a relaxed presence (scored in logit space), and the likelihood of
an image given its reconstruction (Gaussian or Bernoulli pixels)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)


def gaussian_kl(
    loc: torch.Tensor, scale: torch.Tensor, p_loc: torch.Tensor, p_scale: torch.Tensor
) -> torch.Tensor:
    """KL(N(loc, scale) || N(p_loc, p_scale)), summed over the last dimension."""
    var_ratio = (scale / p_scale) ** 2
    mean_term = ((loc - p_loc) / p_scale) ** 2
    return 0.5 * (var_ratio + mean_term - 1 - var_ratio.log()).sum(-1)


def gaussian_log_prob(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """log N(z; loc, scale), summed over the last dimension."""
    return (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * LOG_2PI).sum(-1)


def concrete_logit_density(
    y: torch.Tensor, logit: torch.Tensor | float, temp: float
) -> torch.Tensor:
    """log density of a binary Concrete sample, parameterised by its logit `y`.

    With y = (logit + Logistic noise) / temp, y is a scaled logistic variable; scoring in logit
    space avoids the sigmoid's saturation (Maddison et al., 2017, appendix C).
    """
    d = logit - temp * y
    return math.log(temp) + d - 2 * F.softplus(d)


def image_log_likelihood(
    x: torch.Tensor, canvas: torch.Tensor, likelihood: str, sd: float
) -> torch.Tensor:
    """(B,) log p(x | canvas): independent Gaussian pixels of sd `sd` (`likelihood` "gaussian")
    or Bernoulli pixels of mean `canvas` (any other value; `ModelConfig` allows "bernoulli")."""
    if likelihood == "gaussian":
        per_pixel = -0.5 * ((x - canvas) / sd) ** 2 - math.log(sd) - 0.5 * LOG_2PI
    else:
        p = canvas.clamp(1e-6, 1 - 1e-6)
        per_pixel = x * p.log() + (1 - x) * (-p).log1p()
    return per_pixel.flatten(1).sum(1)
