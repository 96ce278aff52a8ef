"""pyproject.toml declares what mlm imports: every third-party module imported anywhere
in mlm/ (module level and inside functions, read with `ast`) comes from a distribution
of the core dependencies, or of the extra that the few optional features name; and the
`gpu` extra carries what MLflow's GPU system metrics import."""

from __future__ import annotations

import ast
import inspect
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import mlm

ROOT = Path(mlm.__file__).parent
PYPROJECT = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())

# Features that work without a core dependency, each telling the user what to install.
OPTIONAL = {
    "onnxruntime": "export",  # mlm export onnx
    "datasets": "hub",  # hf: corpus inputs
}


def _name(requirement: str) -> str:
    """The normalized distribution name of a requirement string (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)).lower()


def _imports() -> dict[str, set[str]]:
    """Top-level third-party module -> the mlm files that import it."""
    found: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for top in {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) - {"mlm"}:
                found.setdefault(top, set()).add(str(path.relative_to(ROOT.parent)))
    return found


def test_every_imported_module_is_declared():
    core = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    extras = {k: {_name(r) for r in v} for k, v in PYPROJECT["project"]["optional-dependencies"].items()}
    distributions = packages_distributions()
    imports = _imports()
    assert {"torch", "transformers", "mlflow", "tqdm", "psutil"} <= set(imports)  # the walk sees them
    missing = {}
    for module, files in imports.items():
        declared = extras[OPTIONAL[module]] if module in OPTIONAL else core
        if not {_name(d) for d in distributions.get(module, [module])} & declared:
            missing[module] = sorted(files)
    assert not missing, f"imported by mlm but not declared in pyproject.toml: {missing}"


def test_gpu_extra_provides_mlflows_gpu_monitor():
    """MLflow's NVIDIA monitor imports pynvml, which the nvidia-ml-py distribution ships
    (not the deprecated `pynvml` wrapper distribution)."""
    from mlflow.system_metrics.metrics import gpu_monitor

    assert re.search(r"^\s*import pynvml\b", inspect.getsource(gpu_monitor), re.M)
    assert "nvidia-ml-py" in {_name(r) for r in PYPROJECT["project"]["optional-dependencies"]["gpu"]}
