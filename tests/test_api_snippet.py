"""The README's "Use a trained model from Python" snippet runs as written, against run folders in
the results layout; `load_run` takes a folder or a glob matching one, `find_runs` lists them."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.api import find_runs, load_run
from bench.config import config_hash, load_config, to_yaml
from bench.model_file import save_final_model
from implementations.core.model import AIR
from tests.conftest import ROOT, TINY


def _finished_run(results: Path, seed: int, variant: str = "air_nvil_fixed") -> Path:
    """A run folder as a finished run leaves it (config.yaml, model.pt), without training."""
    cfg = load_config(overrides=[*TINY, f"seed={seed}"])
    run_dir = results / "count" / variant / config_hash(cfg) / f"seed_{seed}"
    cfg.out_dir = str(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    torch.manual_seed(seed)
    save_final_model(run_dir, AIR(cfg.model), iteration=12, config_hash=config_hash(cfg))
    return run_dir


def _readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use a trained model from Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the section should hold one Python snippet"
    return blocks[0]


def test_readme_snippet_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _finished_run(tmp_path / "results", 0)
    _finished_run(tmp_path / "results", 1)
    _finished_run(tmp_path / "results", 0, variant="air_concrete")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_readme_snippet(), "README.md", "exec"), namespace)  # noqa: S102
    run, out, images = namespace["run"], namespace["out"], namespace["images"]
    assert run.run_dir.resolve() == first.resolve()
    assert out.counts.shape == (len(images),)
    assert out.boxes[0].shape == (out.counts[0], 4)
    assert out.presence_prob.shape == (len(images), 3)
    assert out.reconstructions.shape == (len(images), 50, 50)
    assert [r.cfg.seed for r in namespace["runs"]] == [0, 1]


def test_load_run_patterns_and_errors(tmp_path: Path) -> None:
    results = tmp_path / "results"
    dirs = [_finished_run(results, s) for s in (0, 1)]
    assert find_runs(results) == sorted(dirs)
    assert find_runs(results, seed=1) == [dirs[1]]
    assert find_runs(results, variant="air_concrete") == []
    assert load_run(dirs[1]).cfg.seed == 1
    assert load_run(f"{results}/count/air_nvil_fixed/*/seed_1").run_dir == dirs[1]
    with pytest.raises(ValueError, match="matches 2 run folders"):
        load_run(f"{results}/count/*/*/seed_*")
    with pytest.raises(FileNotFoundError, match=r"<experiment>/<variant>/<config hash>/seed_<n>"):
        load_run(results / "nvil")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_runs(tmp_path / "nowhere")
    # The model really is the saved one: the same seed's fresh model gives the same output.
    loaded = load_run(dirs[1])
    torch.manual_seed(1)
    fresh = AIR(loaded.cfg.model).eval()
    x = np.zeros((2, 50, 50), dtype=np.float32)
    x[0, 10:30, 10:25] = 1.0
    with torch.no_grad():
        expected = fresh(torch.as_tensor(x), loaded.cfg.prior.fixed, sample=False).canvas
    np.testing.assert_allclose(loaded.infer(x).reconstructions, expected.numpy(), atol=0, rtol=0)
