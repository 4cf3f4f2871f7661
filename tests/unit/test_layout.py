"""The layout rules, read from the imports: pipelines -> alexnet/tuning, tuning -> alexnet, never back;
the model needs torch only; no private Ray API; MLflow's process-wide state set in one module."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 380


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).glob("*.py"))


def _imports(path: Path) -> set[str]:
    """Every module imported anywhere in the file (function-level imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def _calls(path: Path) -> set[str]:
    return {node.func.attr for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}


@pytest.mark.parametrize("package, forbidden", [("alexnet", ("tuning", "pipelines")), ("tuning", ("pipelines",))])
def test_imports_point_one_way(package, forbidden):
    for path in _modules(package):
        bad = {m for m in _imports(path) if m.split(".")[0] in forbidden}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_the_sweep_entry_point_uses_the_tuning_package():
    assert "tuning.sweep" in _imports(ROOT / "pipelines" / "tune.py")


def test_the_model_needs_torch_and_the_standard_library_only():
    for name in _imports(ROOT / "alexnet" / "model.py"):
        top = name.split(".")[0]
        assert top in sys.stdlib_module_names or top in ("torch", "__future__"), name


def test_no_private_ray_module_or_method_is_used():
    for package in ("alexnet", "tuning", "pipelines"):
        for path in _modules(package):
            private = {m for m in _imports(path) if m.startswith("ray") and any(p.startswith("_") for p in m.split("."))}
            # a private method called but defined nowhere in the file: someone else's (Ray's) internals
            defined = {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}
            if any(m.split(".")[0] == "ray" for m in _imports(path)):
                private |= {c for c in _calls(path) if c.startswith("_") and not c.startswith("__") and c not in defined}
            assert not private, f"{path.relative_to(ROOT)}: {private}"


def test_mlflow_process_wide_state_is_set_in_one_module():
    setters = {"set_tracking_uri", "set_experiment", "set_registry_uri"}
    users = sorted(str(p.relative_to(ROOT)) for package in ("alexnet", "tuning", "pipelines")
                   for p in _modules(package) if _calls(p) & setters)
    assert users == ["alexnet/tracking.py"], users


def test_no_library_module_is_a_hub():
    for package in ("alexnet", "tuning"):
        for path in _modules(package):
            lines = len(path.read_text().splitlines())
            assert lines <= MAX_LINES, f"{path.relative_to(ROOT)}: {lines} lines"
