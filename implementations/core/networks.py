"""The AIR model's networks: the inference LSTM whose image projection is computed once per image
(`ImageLSTM`, also NVIL's baseline) and plain multilayer perceptrons (`mlp`)."""

from __future__ import annotations

import math

import torch
from torch import nn

from implementations.core.sparse_projection import FlatImages, sparse_projection


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
