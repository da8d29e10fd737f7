"""The downstream models and how they are fitted: the latent probe (an MLP) and the pixel CNN.

Both are fitted the same way: `steps` Adam steps on minibatches of the labelled training
images only (the whole set when it is smaller than `batch_size`), then scored on the held-out
test images. `fit` never receives test data: it returns a predictor, and only `score` sees the
test targets (tests/test_representation.py checks that the test labels change nothing but
the score). The seed fixes the initialisation and the minibatches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

Predictor = Callable[[np.ndarray], np.ndarray]


@dataclass
class FitSettings:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    device: str = "cpu"


def latent_probe(inputs: int, classes: int, hidden: int) -> nn.Module:
    """The latent probe: two hidden ReLU layers."""
    return nn.Sequential(
        nn.Linear(inputs, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, classes),
    )  # fmt: skip


class PixelCNN(nn.Module):
    """The pixel baseline: three strided convolutions, then one hidden layer."""

    def __init__(self, canvas: int, classes: int, hidden: int = 256) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        )  # fmt: skip
        side = canvas
        for _ in range(3):
            side = (side - 1) // 2 + 1
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * side * side, hidden), nn.ReLU(), nn.Linear(hidden, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x[:, None]))


def fit(
    make: Callable[[], nn.Module],
    x: np.ndarray,
    y: np.ndarray,
    settings: FitSettings,
    seed: int,
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Predictor:
    """Fit `make()` on (x, y) with cross-entropy; returns a function from inputs to classes.

    `prepare` maps a raw batch (on the device) to the model's input; default: standardise each
    feature with the training set's own mean and sd (never the test set's).
    """
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"fit: expected as many targets as inputs (> 0), got {len(x)}, {len(y)}")
    device = torch.device(settings.device)
    xs = torch.as_tensor(x, device=device)
    ys = torch.as_tensor(y, dtype=torch.long, device=device)
    if prepare is None:
        mean = xs.float().mean(0)
        sd = xs.float().std(0, unbiased=False).clamp_min(1e-3)

        def prepare(batch: torch.Tensor) -> torch.Tensor:
            return (batch.float() - mean) / sd

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = make().to(device)
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    batch = min(settings.batch_size, len(xs))
    model.train()
    for _ in range(settings.steps):
        idx = torch.randperm(len(xs), generator=gen)[:batch].to(device)
        loss = nn.functional.cross_entropy(model(prepare(xs[idx])), ys[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()

    @torch.no_grad()
    def predict(inputs: np.ndarray, chunk: int = 1000) -> np.ndarray:
        out = []
        for start in range(0, len(inputs), chunk):
            part = torch.as_tensor(inputs[start : start + chunk], device=device)
            out.append(model(prepare(part)).argmax(1).cpu())
        return torch.cat(out).numpy() if out else np.zeros(0, np.int64)

    return predict


def score(predict: Predictor, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of `predict` on held-out (x, y)."""
    if len(x) == 0:
        return float("nan")
    return float((predict(x) == np.asarray(y)).mean())


def pixels(batch: torch.Tensor) -> torch.Tensor:
    """The CNN's input: uint8 images as floats in [0, 1]."""
    return batch.float() / 255.0
