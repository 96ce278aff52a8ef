"""Rules of the code base that no single behaviour test would notice being broken
(docs/architecture.md, "Conventions")."""

from __future__ import annotations

import re
from pathlib import Path

import mlm

ROOT = Path(mlm.__file__).parent
SOURCES = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in ROOT.rglob("*.py")}


def _holders(pattern: str) -> list[str]:
    return sorted(name for name, text in SOURCES.items() if re.search(pattern, text))


def test_one_peak_flops_table():
    """FLOP/s figures (...e12) are in mlm.compute.PEAK_FLOPS only; the rest asks it."""
    assert _holders(r"\b\d+(\.\d+)?e12\b") == ["compute.py"]


def test_one_masked_position_loss():
    """The masked-LM cross entropy is written once: mlm.compute."""
    assert _holders(r"cross_entropy\(") == ["compute.py"]


def test_commits_go_through_storage():
    """Temporary name then rename is mlm.storage's job (write_bytes, output_file,
    put_dir): nobody else renames files into place."""
    assert _holders(r"\bos\.(replace|rename)\(") == ["storage.py"]


def test_dead_code_stays_gone():
    assert "def fill_mask(text: str, model" not in SOURCES["predict.py"]
    assert '"system_metrics"' not in SOURCES["train.py"]
    assert "atomic_write_bytes" not in "".join(SOURCES.values())


MAX_FUNCTION_LINES = 60


def test_functions_read_in_one_screen():
    """No function over 60 lines (docstring included): long ones are split into named
    steps that read top to bottom."""
    import ast

    long = []
    for name, text in SOURCES.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_the_manifest_is_read_through_its_class():
    """Stages read datasets through shards.Manifest (typed), not the raw JSON dict."""
    assert _holders(r"\bread_manifest\(") == ["shards.py"]
    assert _holders(r"manifest\[[\"']") == []


def test_no_blanket_warning_filters():
    """Deprecations from mlm code are errors in the test suite; nothing silences whole
    warning categories (third-party noise, if any, is filtered by module)."""
    import tomllib

    pyproject = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())
    filters = pyproject["tool"]["pytest"]["ini_options"]["filterwarnings"]
    assert {"error::DeprecationWarning:mlm", "error::FutureWarning:mlm"} <= set(filters)
    assert not [f for f in filters if f.startswith("ignore::") and f.count(":") < 3], filters


def test_private_ray_names_come_with_a_pinned_ray():
    """mlm uses a few Ray names outside its public API (ray._private...); a minor Ray
    release may move them, so the Ray requirement admits one minor series only."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    private = _holders(r"ray\._private|ray\.train\.torch\.config\._|from ray\._")
    (ray,) = [Requirement(r) for r in tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["project"]
              ["dependencies"] if Requirement(r).name == "ray"]
    lowest = min(Version(s.version) for s in ray.specifier if s.operator == ">=")
    if private:
        next_minor = Version(f"{lowest.major}.{lowest.minor + 1}")
        assert not ray.specifier.contains(next_minor), (private, str(ray.specifier))
