"""Checks shared by the seed-group tests: a group's seeds end where their separate runs end,
a way to keep the group loops a test's runs build, and a spy on the vectorised final
evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench import group_eval, group_final
from bench.group_loop import GroupLoop
from bench.model_file import load_final_model

FINAL_KEYS = ("elbo", "count_accuracy", "iw_bound")


def assert_same_ends(
    alone: list[dict],
    together: list[dict],
    alone_dirs: list[str | Path],
    together_dirs: list[str | Path],
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> None:
    """Each seed's result (iterations, final ELBO, count accuracy, bound to `rtol`) and final
    model weights (to `rtol`, `atol`) equal its separate run's."""
    for ref, got in zip(alone, together, strict=True):
        assert got["iterations"] == ref["iterations"]
        for key in FINAL_KEYS:
            assert got["final"][key] == pytest.approx(ref["final"][key], rel=rtol, abs=rtol), key
    for mine_dir, theirs_dir in zip(together_dirs, alone_dirs, strict=True):
        mine = load_final_model(Path(mine_dir))["model"]
        theirs = load_final_model(Path(theirs_dir))["model"]
        assert mine.keys() == theirs.keys()
        for name, w in theirs.items():
            torch.testing.assert_close(mine[name], w, rtol=rtol, atol=atol, msg=name)


def keep_group_loops(monkeypatch: pytest.MonkeyPatch) -> list[GroupLoop]:
    """The list every GroupLoop built from now on (in this test) is appended to."""
    loops: list[GroupLoop] = []
    real_init = GroupLoop.__init__

    def keep(self, *args):  # noqa: ANN001, ANN002, ANN202
        real_init(self, *args)
        loops.append(self)

    monkeypatch.setattr(GroupLoop, "__init__", keep)
    return loops


def spy_vectorised_final(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Make groups evaluate vectorised on the CPU too (the GPU's rule), in chunks of 2 tiny
    seeds (batch 48 x 2 images per pass, so 3 seeds take two chunks), and return the list each
    vectorised final evaluation appends (number of seeds, its other arguments, its result) to."""
    monkeypatch.setattr(GroupLoop, "vector_eval_on_cpu", True)
    monkeypatch.setattr(group_eval, "PASS_IMAGES", 96)
    calls: list[tuple] = []
    real = group_final.evaluate_seeds

    def spy(stacked, js, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        out = real(stacked, js, *args, **kwargs)
        calls.append((len(list(js)), args, out))
        return out

    monkeypatch.setattr(group_final, "evaluate_seeds", spy)
    return calls
