"""The walls between the parts (docs/architecture.md): the model core imports nothing of the
harness, and the report reads results only: no model, variant code, data generator or torch.

Checked twice: statically (every import statement of the package files, function-level ones
included, parsed with ast) and dynamically (importing the package in a fresh interpreter and
looking at sys.modules)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPORT_FORBIDDEN = ("torch", "implementations", "bench.variants", "bench.api", "bench.data",
                    "bench.trainer", "bench.config", "bench.grid")  # fmt: skip
CORE_FORBIDDEN = ("bench",)


def imported_modules(package: Path) -> dict[str, list[str]]:
    """module name imported -> the files (relative to `package`) whose import statements name it."""
    out: dict[str, list[str]] = {}
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                out.setdefault(name, []).append(str(path.relative_to(package)))
    return out


def _hits(imports: dict[str, list[str]], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    return {m: f for m, f in imports.items()
            if any(m == x or m.startswith(x + ".") for x in forbidden)}  # fmt: skip


def test_static_walls() -> None:
    report = imported_modules(ROOT / "bench" / "report")
    assert "bench.grid_record" in report  # the scan sees the package's imports at all
    assert _hits(report, REPORT_FORBIDDEN) == {}
    core = imported_modules(ROOT / "implementations" / "core")
    assert "torch" in core
    assert _hits(core, CORE_FORBIDDEN) == {}


def test_static_scan_catches_a_function_level_import(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text("def f():\n    from bench.api import load_run\n    import torch\n")
    hits = _hits(imported_modules(pkg), REPORT_FORBIDDEN)
    assert set(hits) >= {"bench.api", "torch", "bench.api.load_run"}


def _loaded_after(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport json, sys\n"
                          "print(json.dumps(sorted(sys.modules)))"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_dynamic_walls() -> None:
    loaded = _loaded_after("import bench.report, bench.report.samples, bench.report.figures")
    assert "bench.report.samples" in loaded
    assert [m for m in loaded if any(m == x or m.startswith(x + ".") for x in REPORT_FORBIDDEN)
            ] == []  # fmt: skip
    core = _loaded_after("import implementations.core.model, implementations.core.estimators")
    assert [m for m in core if m == "bench" or m.startswith("bench.")] == []


def test_building_a_report_imports_no_model(tmp_path: Path) -> None:
    """The whole report of a results folder (gathering included) runs without torch."""
    run = tmp_path / "results" / "count" / "v" / "h" / "seed_0"
    run.mkdir(parents=True)
    (run / "result.json").write_text(json.dumps({"status": "complete", "outcome": "converged",
                                                 "iterations": 10, "final": {
                                                     "count_accuracy": 0.9}}))  # fmt: skip
    loaded = _loaded_after(f"from bench.report import build_all\n"
                           f"build_all({str(tmp_path / 'results')!r}, "
                           f"{str(tmp_path / 'reports')!r})")  # fmt: skip
    assert (tmp_path / "reports" / "index.html").is_file()
    assert [m for m in loaded if any(m == x or m.startswith(x + ".") for x in REPORT_FORBIDDEN)
            ] == []  # fmt: skip
