"""The typed run configuration: one schema, documented where it is defined.

A run's config is this schema, merged with YAML files and `key=value` overrides (omegaconf
dotlist). Unknown keys and wrong types are rejected with the file, the key and a suggestion.
The resolved config is saved with every run's results.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from bench.data.registry import DEFAULT_DATASET, DatasetError, dataset_names, get_dataset
from implementations.core.model import ModelConfig


class ConfigError(ValueError):
    """A configuration problem, with where it came from and what was expected."""


@dataclass
class DataConfig:
    # The data set: a name registered in bench/data/registry.py (the modules of
    # bench/data/datasets/). "multi_mnist" is the AIR paper's; an unknown name is a config error.
    name: str = DEFAULT_DATASET
    data_dir: str | None = (
        None  # MNIST IDX folder; None: $AIR_DATA_DIR, ../shared/data/mnist, cache
    )
    cache_dir: str | None = None  # generated multi-MNIST cache; None: $AIR_CACHE_DIR or .cache/
    seed: int = 0  # data seed: fixed per experiment, so every variant and seed sees the same data
    train_counts: list[int] = field(default_factory=lambda: [0, 1, 2])  # digit counts in training
    test_counts: list[int] = field(default_factory=lambda: [0, 1, 2])  # digit counts at test time
    n_train: int = 60000  # training images
    n_test: int = 10000  # held-out test images (built from MNIST test digits only)
    rescale: bool = True  # rescale digits by 1/s, s ~ N(1.3, 0.1^2), as the Pyro example does
    # Extra test sets for the final evaluation, built as the published implementations built
    # theirs (bench/data/protocols.py: pyro, addtt, aakhundov; MNIST training digits, 0-2
    # digits). The held-out set above is always evaluated and stays the headline.
    reference_protocols: list[str] = field(default_factory=list)
    # The data set's own options (`options` of its plugin, with their defaults); multi_mnist's:
    # placement ("ink" / "frame") and overlap (false / true), the layout of its canvases
    # (bench/data/datasets/multi_mnist.py). Unknown keys and wrong types are config errors.
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class PriorConfig:
    kind: str = "fixed"  # "fixed" or "annealed" success probability of the geometric prior
    fixed: float = 0.01  # used when kind == "fixed" (PyTorch and Pyro AIR settings)
    start: float = 0.99  # annealed: value at iteration 0
    end: float = 1e-5  # annealed: value from `anneal_iters` on
    anneal_iters: int = 100000  # annealed: length of the log-linear schedule
    anneal_space: str = "prob"  # annealed: interpolate log(prob) or log(odds) ("prob"/"odds")


@dataclass
class EstimatorConfig:
    name: str = "nvil"  # a registered estimator (implementations/core/estimators.py or a variant)
    params: dict[str, Any] = field(default_factory=dict)  # the estimator's own options


@dataclass
class TrainConfig:
    iterations: int = 50000  # optimisation steps
    batch_size: int = 64
    lr: float = 1e-4  # Adam learning rate of the model (estimators may add their own groups)
    grad_clip: float | None = None  # max global gradient norm; None: no clipping
    eval_every: int = 1000  # evaluate on held-out images every this many iterations
    eval_images: int = 1000  # held-out images used by the periodic evaluations
    log_every: int = 100  # training-loss log line every this many iterations
    checkpoint_every: int = 1000  # checkpoint every this many iterations ...
    checkpoint_minutes: float = 10.0  # ... or after this many minutes, whichever comes first
    device: str = "cpu"  # "cpu" or "cuda" (or "cuda:N")
    threads: int | None = None  # torch CPU threads; None: torch's default
    progress: bool = True  # show a tqdm progress bar
    # torch.compile the loss (forward and backward): fuses the model's ~500 small ops per step.
    # Costs ~30-60 s of compilation when a run (or a resumed session) starts; same maths,
    # float rounding aside (tests/test_trainer.py compares it with the eager step).
    compile: bool = False
    # The training noise: "torch" (each run's torch generator, swapped in per seed in a seed
    # group) or "counter" (a hash of (seed, iteration, draw, tensor, element): no generator
    # state, one vectorised call for a whole seed group; bench/counter_noise.py). Different
    # numbers, same distribution. Evaluation noise is torch's either way.
    noise: str = "torch"
    # Seed groups: clip each seed's gradient and step its Adam in one compiled function over the
    # stacked tensors (bench/group_update.py; on CUDA in mode "reduce-overhead", a CUDA graph
    # where inductor allows: untested, no GPU was lent) instead of one fused Adam kernel per
    # seed. Same maths, float rounding aside. Single runs ignore it.
    compile_update: bool = False
    # Seed groups: the whole step (loss, backward by torch.func, clipping, Adam) as one compiled
    # graph (bench/group_step.py; on CUDA "reduce-overhead": one CUDA graph per step where
    # inductor allows; untested, no GPU was lent). Dense image projection. Same maths, float
    # rounding aside; on CPU no faster. A single run with it trains as a seed group of one.
    compile_step: bool = False


@dataclass
class EvalConfig:
    final_images: int = 10000  # held-out images for the final evaluation
    iw_samples: int = 100  # K of the final importance-weighted bound
    iw_images: int = 10000  # images used for the final importance-weighted bound
    periodic_iw_samples: int = 0  # K for periodic evaluations (0: skip the bound there)
    batch_size: int = 500  # images per evaluation batch (IW: images x K per forward pass)
    converged_accuracy: float = 0.98  # count accuracy that counts as converged ...
    converged_evals: int = 3  # ... sustained over this many last evaluations


@dataclass
class ProbeConfig:
    # Downstream probes (experiment `representation`, docs/representation.md): after training,
    # small models learn the digit sum and the digit order from the frozen model's latents, and
    # a CNN from the pixels, with this many labelled training images each. Empty: no probes
    # (every other experiment; the section then leaves the config hash as it was).
    budgets: list[int] = field(default_factory=list)
    tasks: list[str] = field(default_factory=lambda: ["sum", "order"])  # "sum" and/or "order"
    seeds: int = 3  # downstream seeds per task and budget (labelled subset, init, batches)
    steps: int = 1500  # Adam steps of each downstream model, whatever the budget
    batch_size: int = 64  # labelled images per step (the whole budget when smaller)
    lr: float = 1e-3  # Adam learning rate of the downstream models
    hidden: int = 256  # units of each of the two hidden layers of the latent probe
    pixel_cnn: bool = True  # also train the pixel CNN baseline (cached per data set)
    # Reuse the finished run of this experiment with the same variant, seed and training config
    # (its model.pt) instead of training again; changes no number, so it is not hashed.
    reuse_experiment: str = "count"


@dataclass
class RunConfig:
    seed: int = 0  # training seed: initialisation, data order, sampling
    out_dir: str = "results/single"  # where this run writes config, metrics, checkpoint, result
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for k in node:
            full = f"{prefix}{k}"
            keys.append(full)
            keys.extend(_all_keys(node._get_node(k), full + "."))
    return keys


def _explain(err: OmegaConfBaseException, source: str, schema: DictConfig) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, ConfigKeyError):
        guess = difflib.get_close_matches(key, _all_keys(schema), n=1)
        hint = f"; did you mean {guess[0]!r}?" if guess else ""
        return ConfigError(f"{source}: unknown config key {key!r}{hint}")
    if isinstance(err, ValidationError):
        return ConfigError(f"{source}: bad value for {key!r}: {err.msg}")
    return ConfigError(f"{source}: {err}")


def load_config(
    files: list[str | Path | tuple[str, dict[str, Any]]] | None = None,
    overrides: list[str] | None = None,
) -> RunConfig:
    """Schema defaults, then each layer in order, then `key=value` overrides.

    A layer is a YAML file path, or a `(source, mapping)` pair for config that comes from
    elsewhere (a variant folder, an experiment); `source` names it in error messages.
    """
    schema = OmegaConf.structured(RunConfig)
    merged = schema
    for layer in files or []:
        source, loaded = _read_layer(layer)
        try:
            merged = OmegaConf.merge(merged, loaded)
        except OmegaConfBaseException as err:
            raise _explain(err, source, schema) from err
    if overrides:
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as err:
            raise _explain(err, "command-line override", schema) from err
    try:
        cfg: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise _explain(err, "config", schema) from err
    validate(cfg)
    return cfg


def _read_layer(layer: str | Path | tuple[str, dict[str, Any]]) -> tuple[str, DictConfig]:
    if isinstance(layer, tuple):
        source, mapping = layer
        try:
            return source, OmegaConf.create(mapping or {})
        except OmegaConfBaseException as err:
            raise ConfigError(f"{source}: not a valid config mapping: {err}") from err
    path = Path(layer)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:  # yaml errors come in several types
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return str(path), loaded


def validate(cfg: RunConfig) -> None:
    """Checks the schema cannot express (ranges, choices), with the key in the message."""
    checks = [
        (cfg.train.iterations >= 0, "train.iterations", "an integer >= 0"),
        (cfg.train.batch_size > 0, "train.batch_size", "an integer > 0"),
        (cfg.train.lr > 0, "train.lr", "a positive float"),
        (cfg.train.eval_every > 0, "train.eval_every", "an integer > 0"),
        (cfg.train.checkpoint_every > 0, "train.checkpoint_every", "an integer > 0"),
        (cfg.prior.kind in ("fixed", "annealed"), "prior.kind", "'fixed' or 'annealed'"),
        (0 < cfg.prior.fixed < 1, "prior.fixed", "a probability in (0, 1)"),
        (cfg.prior.anneal_space in ("prob", "odds"), "prior.anneal_space", "'prob' or 'odds'"),
        (0 < cfg.prior.start < 1 and 0 < cfg.prior.end < 1, "prior.start/end", "in (0, 1)"),
        (cfg.model.likelihood in ("gaussian", "bernoulli"), "model.likelihood",
         "'gaussian' or 'bernoulli'"),
        (cfg.model.presence in ("bernoulli", "concrete"), "model.presence",
         "'bernoulli' or 'concrete'"),
        (cfg.model.max_steps >= 1, "model.max_steps", "an integer >= 1"),
        (cfg.model.concrete_gate in ("before", "after"), "model.concrete_gate",
         "'before' or 'after'"),
        (cfg.model.presence_prior in ("per_step", "count"), "model.presence_prior",
         "'per_step' or 'count'"),
        (cfg.model.presence_kl in ("sampled", "expected"), "model.presence_kl",
         "'sampled' or 'expected'"),
        (cfg.model.presence_kl == "sampled" or cfg.model.presence == "bernoulli",
         "model.presence_kl", "'sampled' with model.presence 'concrete'"),
        (len(cfg.model.where_prior_loc) == 3, "model.where_prior_loc", "3 numbers (s, x, y)"),
        (len(cfg.model.where_prior_scale) == 3, "model.where_prior_scale", "3 numbers"),
        (max(cfg.data.train_counts + cfg.data.test_counts) <= cfg.model.max_steps,
         "data.train_counts/test_counts", f"counts <= model.max_steps ({cfg.model.max_steps})"),
        (cfg.eval.iw_samples >= 0, "eval.iw_samples", "an integer >= 0"),
        (cfg.train.device == "cpu" or cfg.train.device.startswith("cuda"), "train.device",
         "'cpu' or 'cuda[:N]'"),
        (cfg.train.noise in ("torch", "counter"), "train.noise",
         f"'torch' or 'counter', got {cfg.train.noise!r}"),
    ]  # fmt: skip
    for ok, key, expected in checks:
        if not ok:
            raise ConfigError(f"config field {key}: expected {expected}")
    _validate_probe(cfg.probe)
    try:
        dataset = get_dataset(cfg.data.name)
        dataset.validate(cfg.data, cfg.model.canvas)
    except DatasetError as err:
        raise ConfigError(str(err)) from err
    # Variants ask for the protocols of the data set they were tuned on; a run whose data set
    # lacks one records it as skipped (bench/trainer.py), so only names no data set knows fail.
    known = list(dict.fromkeys(p for n in dataset_names() for p in get_dataset(n).protocols))
    protocols = cfg.data.reference_protocols
    if any(p not in known for p in protocols) or len(set(protocols)) != len(protocols):
        raise ConfigError(
            f"config field data.reference_protocols: expected distinct names from {known} "
            f"(the held-out set is always evaluated), got {list(protocols)}"
        )


PROBE_TASKS = ("sum", "order")


def _validate_probe(probe: ProbeConfig) -> None:
    checks = [
        (all(b > 0 for b in probe.budgets) and len(set(probe.budgets)) == len(probe.budgets),
         "probe.budgets", "distinct labelled-image counts > 0 (empty: no probes)"),
        (bool(probe.tasks) and all(t in PROBE_TASKS for t in probe.tasks)
         and len(set(probe.tasks)) == len(probe.tasks), "probe.tasks",
         f"distinct names from {list(PROBE_TASKS)}"),
        (probe.seeds >= 1, "probe.seeds", "an integer >= 1"),
        (probe.steps >= 1, "probe.steps", "an integer >= 1"),
        (probe.batch_size >= 1, "probe.batch_size", "an integer >= 1"),
        (probe.lr > 0, "probe.lr", "a positive float"),
        (probe.hidden >= 1, "probe.hidden", "an integer >= 1"),
        (bool(probe.reuse_experiment), "probe.reuse_experiment", "an experiment name"),
    ]  # fmt: skip
    for ok, key, expected in checks:
        if not ok:
            raise ConfigError(f"config field {key}: expected {expected}")


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_hash(cfg: RunConfig, ignore: tuple[str, ...] = ("seed", "out_dir")) -> str:
    """Short hash of everything that changes the numbers (not the seed or the output folder).

    Device settings are left in: a CUDA run is not bit-identical to a CPU one. Progress bars and
    data folders are left out.
    """
    d = to_dict(cfg)
    for key in ignore:
        d.pop(key, None)
    d["train"].pop("progress", None)
    if d["train"].get("noise") == "torch":
        d["train"].pop("noise", None)  # the default: the hash it had before the field
    if d["train"].get("compile_update") is False:
        d["train"].pop("compile_update", None)  # likewise
    if d["train"].get("compile_step") is False:
        d["train"].pop("compile_step", None)  # likewise
    # Where MNIST and the generated cache live changes no number (both are checksummed).
    d["data"].pop("data_dir", None)
    d["data"].pop("cache_dir", None)
    if not d["data"].get("reference_protocols"):
        d["data"].pop("reference_protocols", None)  # unset: the hash it had before the field
    # Likewise the data set (default: multi-MNIST, the only one before the field) and its options.
    if d["data"].get("name") == DEFAULT_DATASET:
        d["data"].pop("name", None)
    if not d["data"].get("params"):
        d["data"].pop("params", None)
    # Probes off (the default): the hash it had before the section. Where to reuse a trained
    # model from changes no number.
    probe = d.pop("probe", None) or {}
    if probe.get("budgets"):
        probe.pop("reuse_experiment", None)
        d["probe"] = probe
    blob = json.dumps(d, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:10]
