"""Every discovered variant is tested automatically: a new folder needs no new test.

For each variant: its config validates; a few training iterations on tiny data give a finite
loss and gradients where they belong; checkpoint-then-resume equals an uninterrupted run.
A deliberately broken folder is reported as broken while the others still load.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from bench.config import load_config
from bench.storage import read_json_lines
from bench.trainer import Trainer, build
from bench.variants import IMPLEMENTATIONS, discover
from tests.conftest import TINY, needs_mnist

DISCOVERY = discover()
VARIANTS = sorted(DISCOVERY.variants)


def test_shipped_variants_are_all_valid() -> None:
    assert DISCOVERY.broken == {}
    expected = {"air_nvil_fixed", "air_nvil_annealed", "air_concrete", "dair_nvil",
                "dair_concrete", "air_vimco"}  # fmt: skip
    assert expected <= set(VARIANTS)
    for name in VARIANTS:
        assert DISCOVERY.variants[name].spec.description.strip()


def _variant_config(name: str, tmp_path: Path, data_cache: Path, *extra: str):
    variant = DISCOVERY.variants[name]
    test_layer = (f"{name}/variant.yaml: test_config", variant.spec.test_config)
    base = [*TINY, f"data.cache_dir={data_cache}", f"out_dir={tmp_path / name}", *extra]
    return load_config([variant.config_layer(), test_layer], base)


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_gradients(name: str, tmp_path: Path, data_cache: Path) -> None:
    cfg = _variant_config(name, tmp_path, data_cache)
    model, estimator, optimiser = build(cfg, torch.device("cpu"))
    grouped = {id(p) for g in optimiser.param_groups for p in g["params"]}
    everything = list(model.parameters()) + list(estimator.parameters())
    assert grouped == {id(p) for p in everything}, "some parameter is not being optimised"

    torch.manual_seed(0)
    x = torch.zeros(8, 50, 50)
    x[::2, 10:30, 12:26] = torch.rand(4, 20, 14)
    out = estimator.loss(model, x, 0.3)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for pname, p in list(model.named_parameters()) + list(estimator.named_parameters()):
        assert p.grad is not None, f"{name}: {pname} gets no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
    assert any(p.grad.abs().sum() > 0 for p in model.predict.parameters())

    # The ELBO itself must not depend on the estimator's own networks (e.g. NVIL's baseline):
    # a baseline that leaks into the objective would bias the gradient.
    model.zero_grad()
    estimator.zero_grad()
    torch.manual_seed(0)
    out = estimator.loss(model, x, 0.3)
    (-out.trace.elbo().mean()).backward()
    for pname, p in estimator.named_parameters():
        assert p.grad is None or p.grad.abs().sum() == 0, f"{name}: ELBO reaches {pname}"


@needs_mnist
@pytest.mark.parametrize("name", VARIANTS)
def test_variant_resume_equals_uninterrupted(name: str, tmp_path: Path, data_cache: Path) -> None:
    full_cfg = _variant_config(name, tmp_path / "full", data_cache, "train.iterations=6",
                               "train.eval_every=3")  # fmt: skip
    full = Trainer(full_cfg).run()
    assert full["status"] == "complete" and full["outcome"] != "diverged"
    cfg = _variant_config(name, tmp_path / "resumed", data_cache, "train.iterations=6",
                          "train.eval_every=3", "train.checkpoint_every=2")  # fmt: skip
    Trainer(cfg).run(stop_after=4)
    resumed = Trainer(cfg).run()
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]  # noqa: E731
    assert strip(read_json_lines(Path(cfg.out_dir) / "metrics.jsonl")) == strip(
        read_json_lines(Path(full_cfg.out_dir) / "metrics.jsonl")
    )
    assert resumed["final"] == full["final"]


@pytest.fixture
def implementations_copy(tmp_path: Path) -> Path:
    root = tmp_path / "implementations"
    shutil.copytree(IMPLEMENTATIONS, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _break(root: Path, name: str, yaml_text: str | None = None, code: str | None = None) -> None:
    folder = root / name
    shutil.copytree(root / "air_nvil_fixed", folder)
    if yaml_text is not None:
        (folder / "variant.yaml").write_text(yaml_text)
    if code is not None:
        (folder / "estimator.py").write_text(code)


@pytest.mark.parametrize(
    ("yaml_text", "code", "reason"),
    [
        ("description: x\nconfig: {prior: {kind: fixed}\n", None, "not valid YAML"),
        ("description: x\nconfig:\n  train:\n    iteratons: 5\n", None,
         "did you mean 'train.iterations'"),
        ("description: x\nrefernce: {}\n", None, "did you mean 'reference'"),
        ("description: x\nconfig:\n  train:\n    lr: fast\n", None, "train.lr"),
        ("config: {}\n", None, "'description' is required"),
        ("description: x\nconfig:\n  estimator:\n    name: nvli\n", None, "did you mean 'nvil'"),
        ("description: x\nconfig:\n  estimator:\n    params: {baseline_rate: 1}\n", None,
         "unknown key"),
        (None, "import not_a_real_module\n", "ModuleNotFoundError"),
        (None, "raise RuntimeError('boom')\n", "boom"),
    ],
)  # fmt: skip
def test_broken_variant_is_reported_and_others_still_load(
    implementations_copy: Path, yaml_text: str | None, code: str | None, reason: str
) -> None:
    _break(implementations_copy, "zz_broken", yaml_text, code)
    found = discover(implementations_copy)
    assert "zz_broken" in found.broken and reason in found.broken["zz_broken"]
    assert set(found.variants) == set(VARIANTS)


def test_folder_without_yaml_is_broken_and_templates_are_skipped(
    implementations_copy: Path,
) -> None:
    (implementations_copy / "half_done").mkdir()
    found = discover(implementations_copy)
    assert "variant.yaml is missing" in found.broken["half_done"]
    assert "_template" not in found.variants and "core" not in found.variants


def test_template_copy_is_a_working_variant(implementations_copy: Path, tmp_path: Path) -> None:
    shutil.copytree(implementations_copy / "_template", implementations_copy / "my_idea")
    found = discover(implementations_copy)
    assert "my_idea" in found.variants, found.broken.get("my_idea")
    cfg = found.variants["my_idea"].run_config(overrides=[*TINY, f"out_dir={tmp_path}"])
    model, estimator, _ = build(cfg, torch.device("cpu"))
    x = torch.zeros(4, 50, 50)
    x[:, 5:25, 5:20] = 0.8
    out = estimator.loss(model, x, 0.3)
    out.loss.backward()
    assert torch.isfinite(out.loss)
