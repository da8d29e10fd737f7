"""Every discovered variant is tested automatically: a new folder needs no new test.

For each variant: its config validates; a few training iterations on tiny data give a finite
loss and gradients where they belong; checkpoint-then-resume equals an uninterrupted run.
A deliberately broken folder is reported as broken while the others still load.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
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


# ------------------------------------------------------------------ estimator scoping (issue 14)
def _template_copy(root: Path, name: str) -> Path:
    folder = root / name
    shutil.copytree(IMPLEMENTATIONS / "_template", folder, ignore=shutil.ignore_patterns("__*"))
    return folder


def _estimator_of(found, name: str, tmp_path: Path):  # noqa: ANN001, ANN202
    cfg = found.variants[name].run_config(overrides=[*TINY, f"out_dir={tmp_path / name}"])
    model, estimator, _ = build(cfg, torch.device("cpu"))
    return cfg, model, estimator


def test_template_copied_alone_is_a_working_variant(tmp_path: Path) -> None:
    """The template copy as step 1 of the README leaves it, in a folder with nothing else: it
    trains with the estimator its own estimator.py registers."""
    root = tmp_path / "implementations"
    _template_copy(root, "my_idea")
    found = discover(root)
    assert found.broken == {} and set(found.variants) == {"my_idea"}
    cfg, model, estimator = _estimator_of(found, "my_idea", tmp_path)
    assert cfg.estimator.name == "my_idea:reinforce_ema"
    assert type(estimator).__module__.startswith("air_variant_my_idea_estimator")
    x = torch.zeros(4, 50, 50)
    x[:, 5:25, 5:20] = 0.8
    out = estimator.loss(model, x, 0.3)
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_template_walk_without_new_code(tmp_path: Path) -> None:
    """README step 3, "no new code": deleting estimator.py alone leaves a broken folder that
    says what to do (even beside a copy that registers `reinforce_ema`: no borrowing); also
    replacing the estimator block, as the step says, gives a working variant."""
    root = tmp_path / "implementations"
    _template_copy(root, "aa_keeps_code")
    folder = _template_copy(root, "my_idea")
    (folder / "estimator.py").unlink()
    found = discover(root)
    assert "aa_keeps_code" in found.variants
    reason = found.broken["my_idea"]
    assert "'reinforce_ema' is not a registered estimator" in reason
    assert "'aa_keeps_code:reinforce_ema'" in reason  # how to use the neighbour's, explicitly
    assert "my_idea/ registers: none" in reason

    yaml_text = (folder / "variant.yaml").read_text()
    block = "  estimator:\n    name: reinforce_ema\n    params:\n      decay: 0.9\n"
    assert block in yaml_text  # the block README step 3 tells you to replace
    (folder / "variant.yaml").write_text(yaml_text.replace(block, "  estimator: {name: nvil}\n"))
    found = discover(root)
    assert found.broken == {}
    cfg, _, estimator = _estimator_of(found, "my_idea", tmp_path)
    assert cfg.estimator.name == "nvil" and type(estimator).__name__ == "NVIL"


def test_two_template_copies_each_train_with_their_own_estimator(tmp_path: Path) -> None:
    root = tmp_path / "implementations"
    first = _template_copy(root, "first")
    second = _template_copy(root, "second")
    for folder, decay in ((first, "0.5"), (second, "0.7")):  # distinguishable defaults
        code = (folder / "estimator.py").read_text()
        assert "decay: float = 0.9" in code
        (folder / "estimator.py").write_text(
            code.replace("decay: float = 0.9", f"decay: float = {decay}")
        )
        text = (folder / "variant.yaml").read_text()
        (folder / "variant.yaml").write_text(text.replace("    params:\n      decay: 0.9\n", ""))
    found = discover(root)
    assert found.broken == {}
    cfg1, _, est1 = _estimator_of(found, "first", tmp_path)
    cfg2, _, est2 = _estimator_of(found, "second", tmp_path)
    assert (cfg1.estimator.name, cfg2.estimator.name) == (
        "first:reinforce_ema",
        "second:reinforce_ema",
    )
    assert type(est1) is not type(est2)
    assert (est1.params.decay, est2.params.decay) == (0.5, 0.7)
    assert "first" in type(est1).__module__ and "second" in type(est2).__module__


def test_another_folders_estimator_only_by_its_qualified_name(tmp_path: Path) -> None:
    root = tmp_path / "implementations"
    _template_copy(root, "owner")
    user = _template_copy(root, "user")
    (user / "estimator.py").unlink()
    text = (
        (user / "variant.yaml")
        .read_text()
        .replace("    name: reinforce_ema\n", '    name: "owner:reinforce_ema"\n')
    )
    (user / "variant.yaml").write_text(text)
    wrong = _template_copy(root, "wrong")
    (wrong / "estimator.py").unlink()
    (wrong / "variant.yaml").write_text(text.replace("owner:reinforce_ema", "owner:reinforce"))
    found = discover(root)
    cfg, _, estimator = _estimator_of(found, "user", tmp_path)
    assert cfg.estimator.name == "owner:reinforce_ema"
    _, _, owners = _estimator_of(found, "owner", tmp_path)
    assert type(estimator) is type(owners)
    assert "folder 'owner' registers no estimator 'reinforce'" in found.broken["wrong"]
    assert set(found.variants) == {"owner", "user"}


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("from implementations.core.estimators import register_estimator, NVIL\n"
         "register_estimator('nvil')(type('Mine', (NVIL,), {}))\n", "registered twice"),
        ("from implementations.core.estimators import register_estimator, NVIL\n"
         "register_estimator('a:b')(type('Mine', (NVIL,), {}))\n", "must not contain ':'"),
    ],
)  # fmt: skip
def test_folder_estimators_that_clash_are_broken(
    implementations_copy: Path, code: str, reason: str
) -> None:
    _break(implementations_copy, "zz_clash", None, code)
    found = discover(implementations_copy)
    assert reason in found.broken["zz_clash"]
    assert set(found.variants) == set(VARIANTS)
    from implementations.core.estimators import ESTIMATORS

    assert ESTIMATORS["nvil"].__name__ == "NVIL" and "a:b" not in ESTIMATORS


def test_broken_owner_breaks_only_the_folders_that_name_it(implementations_copy: Path) -> None:
    _break(implementations_copy, "zz_owner", None, "raise RuntimeError('owner boom')\n")
    user = implementations_copy / "zz_user"
    shutil.copytree(implementations_copy / "air_nvil_fixed", user)
    (user / "variant.yaml").write_text(
        'description: x\nconfig:\n  estimator:\n    name: "zz_owner:thing"\n'
    )
    found = discover(implementations_copy)
    assert "owner boom" in found.broken["zz_owner"]
    assert "'zz_owner:thing'" in found.broken["zz_user"] and "owner boom" in found.broken["zz_user"]
    assert set(found.variants) == set(VARIANTS)


def test_worker_registers_a_folder_estimator_from_its_qualified_name() -> None:
    """A fresh process (a worker) has only the core's estimators; the qualified name in the run
    config imports that one folder, and no bare `vimco` appears."""
    code = (
        "from bench.variants import ensure_registered\n"
        "from implementations.core.estimators import ESTIMATORS\n"
        "ensure_registered('air_vimco:vimco')\n"
        "print(sorted(ESTIMATORS))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=IMPLEMENTATIONS.parent,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['air_vimco:vimco', 'nvil', 'reparam']"
    assert DISCOVERY.variants["air_vimco"].run_config().estimator.name == "air_vimco:vimco"


def test_a_bare_folder_estimator_name_outside_its_folder_suggests_the_qualified_one() -> None:
    """A single-run config (no variant folder) naming `vimco` bare: an error that says how."""
    with pytest.raises(
        ValueError, match=r"unknown estimator 'vimco'; did you mean 'air_vimco:vimco'"
    ):
        build(load_config(overrides=[*TINY, "estimator.name=vimco"]), torch.device("cpu"))
    cfg = load_config(overrides=[*TINY, "estimator.name=air_vimco:vimco"])
    _, estimator, _ = build(cfg, torch.device("cpu"))
    assert type(estimator).__name__ == "VIMCO"
    with pytest.raises(ValueError, match="write 'air_vimco:vimco' to use it"):
        DISCOVERY.variants["air_nvil_fixed"].run_config(overrides=["estimator.name=vimco"])
