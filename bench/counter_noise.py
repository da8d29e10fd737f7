"""Counter-based training noise (`train.noise: counter`): a pure function of the counter.

Each number is a function of (seed, iteration, draw index within the iteration, tensor, element
index) and nothing else: no generator state is kept, swapped or checkpointed. A seed group draws
every seed's noise for an iteration in one vectorised call (seeds (S,), iterations (S,) ->
stacked (S, ...) tensors per draw), with no per-seed work on the host; a single run draws the
same numbers for its seed (S = 1), so a seed's run equals its run in a group, and a resumed run
draws what an uninterrupted one would.

The hash: a 3-round Feistel network on 64-bit counters, keyed by the seed, whose round function
is MurmurHash3's 32-bit finaliser (fmix32). The counter's high word is the iteration, its low
word `stream << 24 | element`, with `stream = 3 * draw + tensor` (tensor 0: pres, 1: where,
2: what; element: the flat index into that tensor of the draw). A Feistel network is a
permutation of its 2^64 counters for each key, so no two counters of a seed share their 64-bit
output; the noise uses one 32-bit half of it. Values are kept in [0, 2^32) in int64 tensors and
every product is formed so that it stays below 2^63 (no wrap-around at all).

Uniforms are `(2m + 1) / 2^24` for the top 23 bits m of a hash: strictly inside (0, 1), exactly
representable in float32, mean exactly 1/2 over the grid. Standard normals are
`torch.special.ndtri` of such a uniform, computed in float64 then cast (tails are cut at
|z| = 5.29, which a normal exceeds with probability 1.2e-7). The integer maths and the
conversion to uniforms are exact, so the uniforms do not depend on the device or on how the
elements are batched; the normals go through ndtri, whose last bit may differ between devices
(only CPU is tested here).

Evaluation noise is not drawn here: it stays on torch's seeded streams (bench/evaluate.py).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache

import torch

from implementations.core.model import AIR, Noise

TENSORS = ("pres", "where", "what")  # the tensor index in a stream: 3 * draw + this index
MASK = 0xFFFFFFFF
ELEMENT_BITS = 24  # elements per tensor per draw < 2^24
MAX_STREAMS = 1 << (32 - ELEMENT_BITS)  # 3 * draws per iteration < 256
ROUNDS = 3  # the first round sees the iteration only: two full rounds per element
_FMIX = (0x85EBCA6B, 0xC2B2AE35)  # MurmurHash3 fmix32's multipliers
_GOLDEN = 0x9E3779B9


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) and 2^31 <= c < 2^32, in place, with no int64
    overflow: x * c = x * (c - 2^31) + x * 2^31, and x * 2^31 mod 2^32 is (x & 1) << 31."""
    odd = (x & 1).bitwise_left_shift_(31)
    return x.mul_(c - (1 << 31)).add_(odd).bitwise_and_(MASK)


def fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser: a bijection of [0, 2^32) with full avalanche."""
    x = x ^ (x >> 16)  # a new tensor; the steps after it work in place
    _mul32(x, _FMIX[0])
    x.bitwise_xor_(x >> 13)
    _mul32(x, _FMIX[1])
    return x.bitwise_xor_(x >> 16)


def round_keys(seeds: torch.Tensor) -> torch.Tensor:
    """(S, ROUNDS) keys in [0, 2^32) from int64 seeds (all 64 bits of a seed count)."""
    seeds = seeds.to(torch.int64)
    low, high = seeds & MASK, (seeds >> 32) & MASK
    base = fmix32(fmix32(low ^ 0x5BD1E995) ^ high)
    return torch.stack([fmix32(base ^ ((_GOLDEN * (r + 1)) & MASK)) for r in range(ROUNDS)], 1)


def hash_bits(keys: torch.Tensor, iterations: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """(S, N) hashes in [0, 2^32) of counters (iterations[s], counters[n]) under keys[s].

    keys (S, ROUNDS) from `round_keys`; iterations (S,) in [0, 2^32); counters (N,) in
    [0, 2^32). The first round sees only the iteration, so it runs on (S,) values.
    """
    right = iterations.to(torch.int64)[:, None]  # the high word: constant along the counters
    left = counters.to(torch.int64)[None, :]
    left, right = right, left ^ fmix32(right ^ keys[:, :1])
    for r in range(1, ROUNDS):
        left, right = right, left ^ fmix32(right ^ keys[:, r : r + 1])
    return right


def uniforms_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """float32 uniforms (2m + 1) / 2^24 in (0, 1) from the top 23 bits m of 32-bit hashes."""
    return ((bits >> 9) * 2 + 1).to(torch.float32) * (2.0**-24)


def normals_from_uniforms(u: torch.Tensor) -> torch.Tensor:
    """Standard normals by the inverse normal CDF (float64, then float32)."""
    return torch.special.ndtri(u.to(torch.float64)).to(torch.float32)


def noise_sizes(batch: int, steps: int, what_dim: int) -> tuple[tuple[int, ...], ...]:
    """Shapes of one draw's tensors (pres, where, what), those of `AIR.draw_noise`."""
    return (steps, batch), (steps, batch, 3), (steps, batch, what_dim)


@lru_cache(maxsize=32)
def _counters(
    first_draw: int, batches: tuple[int, ...], steps: int, what_dim: int, device: torch.device
) -> torch.Tensor:
    """The low words of every element of draws first_draw, first_draw + 1, ... in order."""
    parts = []
    for d, batch in enumerate(batches, start=first_draw):
        for t, shape in enumerate(noise_sizes(batch, steps, what_dim)):
            n = int(torch.Size(shape).numel())
            stream = 3 * d + t
            if stream >= MAX_STREAMS or n > (1 << ELEMENT_BITS):
                raise ValueError(
                    f"counter noise holds at most {MAX_STREAMS // 3} draws per iteration of at "
                    f"most 2^{ELEMENT_BITS} elements per tensor; draw {d} asks for {n} "
                    f"{TENSORS[t]} elements"
                )
            parts.append((stream << ELEMENT_BITS) + torch.arange(n, device=device))
    return torch.cat(parts)


class CounterNoise:
    """Counter-based noise of a fixed set of seeds (S of them) on one device."""

    def __init__(self, seeds: Sequence[int] | torch.Tensor, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.seeds = torch.as_tensor(seeds, dtype=torch.int64).reshape(-1).to(self.device)
        self.keys = round_keys(self.seeds)

    def _iterations(self, iterations: int | torch.Tensor) -> torch.Tensor:
        if isinstance(iterations, int):
            if not 0 <= iterations <= MASK:
                raise ValueError(f"counter noise: iteration {iterations} not in [0, 2^32)")
            return torch.full((len(self.seeds),), iterations, dtype=torch.int64,
                              device=self.device)  # fmt: skip
        # Masked, so that a bad value cannot turn the shifts arithmetic (checking it would
        # read the device).
        return iterations.to(device=self.device, dtype=torch.int64).reshape(-1) & MASK

    def draws(
        self,
        iterations: int | torch.Tensor,
        batches: Sequence[int],
        steps: int,
        what_dim: int,
        dtype: torch.dtype = torch.float32,
        first_draw: int = 0,
    ) -> list[Noise]:
        """Draws first_draw, first_draw + 1, ... of `iterations` (an int or (S,)), of batch
        sizes `batches`: one `Noise` per draw, each tensor with a leading seed axis (S, ...).

        All draws are hashed in one pass; each number depends only on its own counter, so
        asking for draws together or one at a time gives the same numbers.
        """
        counters = _counters(first_draw, tuple(batches), steps, what_dim, self.device)
        bits = hash_bits(self.keys, self._iterations(iterations), counters)
        u = uniforms_from_bits(bits)
        s, out, at = len(self.seeds), [], 0
        for batch in batches:
            tensors = []
            for t, shape in enumerate(noise_sizes(batch, steps, what_dim)):
                n = int(torch.Size(shape).numel())
                part = u[:, at : at + n]
                at += n
                value = part if t == 0 else normals_from_uniforms(part)
                tensors.append(value.reshape(s, *shape).to(dtype))
            out.append(Noise(*tensors))
        return out


class TrainingNoise:
    """A single run's training noise in counter mode: replaces `draw_noise` on its model.

    The core model is not edited: the instance's `draw_noise` is this object (as the seed
    group's loss module does). It answers, in this order: from `queue` (noise computed before a
    compiled call and passed in as its input, so no iteration number is baked into the graph);
    with draw `index` of `iteration` when training (`at`); with the model's own torch draw
    otherwise (evaluation, sampling: their noise stays on torch's seeded streams).
    """

    def __init__(self, model: AIR, seed: int) -> None:
        self.model = model
        self.seed = seed
        self.iteration: int | None = None
        self.index = 0
        self.queue: list[Noise] = []
        self._noise: CounterNoise | None = None
        self._requests: dict[int, list[int]] = {}  # batch size -> batch sizes of its draws
        model.draw_noise = self  # type: ignore[method-assign]

    def counter(self, device: torch.device) -> CounterNoise:
        if self._noise is None or self._noise.device != torch.device(device):
            self._noise = CounterNoise([self.seed], device)
        return self._noise

    def __call__(self, batch: int, device: torch.device, dtype: torch.dtype) -> Noise:
        if self.queue:
            return self.queue.pop(0)
        if self.iteration is None:
            return AIR.draw_noise(self.model, batch, device, dtype)
        cfg, first = self.model.cfg, self.index
        (noise,) = self.counter(device).draws(
            self.iteration, [batch], cfg.max_steps, cfg.z_what_dim, dtype, first_draw=first
        )
        self.index += 1
        return Noise(noise.pres[0], noise.where[0], noise.what[0])

    @contextmanager
    def at(self, iteration: int) -> Iterator[None]:
        """Draws inside the block are iteration `iteration`'s, counted from draw 0."""
        self.iteration, self.index = iteration, 0
        try:
            yield
        finally:
            self.iteration = None
            self.queue.clear()

    def load(self, noises: list[tuple]) -> None:
        """Queue one loss evaluation's noise (called inside the compiled loss)."""
        self.queue[:] = [Noise(*n) for n in noises]

    def given(
        self, x: torch.Tensor, estimator: torch.nn.Module, prior: float | torch.Tensor
    ) -> list[tuple]:
        """Iteration `self.iteration`'s noise for the loss on batch `x`, as (pres, where, what)
        tuples: what the compiled loss takes as its input. The batch sizes of its draws are
        found once per batch size, by a dry run of the loss on copies of the model and
        estimator (their buffers, which a loss may update, are left untouched)."""
        if self.iteration is None:
            raise RuntimeError("TrainingNoise.given must be called inside `at(iteration)`")
        if x.shape[0] not in self._requests:
            self._requests[x.shape[0]] = draw_sizes(self.model, estimator, x, prior)
        cfg, requests = self.model.cfg, self._requests[x.shape[0]]
        noise = self.counter(x.device).draws(self.iteration, requests, cfg.max_steps,
                                             cfg.z_what_dim, x.dtype)  # fmt: skip
        return [(n.pres[0], n.where[0], n.what[0]) for n in noise]


def draw_sizes(
    model: AIR, estimator: torch.nn.Module, x: torch.Tensor, prior: float | torch.Tensor
) -> list[int]:
    """Batch sizes of the noise draws one loss evaluation on `x` makes, in order: a dry run on
    copies of `model` and `estimator` (whose buffers a loss may update), drawing from a forked
    torch generator, so neither the originals nor any random stream are touched."""
    given = model.__dict__.pop("draw_noise", None)  # an instance's own draws: not copied along
    try:
        twin, twin_estimator = copy.deepcopy((model, estimator))
    finally:
        if given is not None:
            model.draw_noise = given  # type: ignore[method-assign]
    requests: list[int] = []

    def record(batch: int, device: torch.device, dtype: torch.dtype) -> Noise:
        requests.append(batch)
        return AIR.draw_noise(twin, batch, device, dtype)

    twin.draw_noise = record  # type: ignore[method-assign]
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        twin_estimator.loss(twin, x, prior)
    return requests
