"""The package's layering: stages depend one way, in flow order (docs/architecture.md).

Every import in mlm/ (module level and inside functions) is read with `ast`; a module may
import only modules of an earlier layer (or itself). No cycle, and no stage reaching a
later one: the benchmarks and the CLI sit on top, the helpers underneath."""

from __future__ import annotations

import ast
from pathlib import Path

import mlm

ROOT = Path(mlm.__file__).parent

# Flow order, lowest first. A module may import modules listed before it, never after.
LAYERS = [
    "config",     # typed configuration and presets
    "storage",    # local paths and object-store URIs; commit rules
    "runtime",    # work folder, the Ray instance, the MLflow store, quiet Ray Data
    "progress",   # one progress line per stage, on stderr
    "corpus",     # input files -> cleaned documents
    "masking",    # masking strategies (pure numpy)
    "tokenizer",  # train/load/fingerprint tokenizers; the document encoder
    "packing",    # documents -> fixed-length rows
    "shards",     # Parquet shards, the manifest, verification, batch plans
    "compute",    # tensors from shard rows, masked-position loss/scores, FLOPs, peak table
    "prepare",    # the data stage (Ray Data)
    "resolve",    # model references (dirs, s3://, models:/) -> local model dirs
    "model",      # build / save / load models, the training objective
    "loader",     # deterministic, resumable training input
    "step",       # the training step: objective (compiled), AdamW, accumulation, micro-batch auto
    "process_group",  # the training workers' torch.distributed group, on the node's address
    "engine",     # where a training loop runs: Ray Train's workers or this process
    "train",      # the training loop and the train stage
    "evaluate",   # held-out metrics (local or Ray Data)
    "report",     # what MLflow shows people: dataset input, curves figure, tables
    "registry",   # MLflow runs, registration, the gate, lifecycle
    "predict",    # fill-mask and batch inference
    "export",     # ONNX export with a parity check
    "finetune",   # package: labelled data, the classification loop, classifier metrics, the probe task
    "serve",      # package: the Ray Serve application (HTTP API, batching, alias following), its benchmark
    "pipeline",   # prepare -> train -> evaluate -> register
    "retrain",    # scheduled retraining on new files
    "jobs",       # Ray Jobs submission
    "bench",      # benchmark commands (package mlm.bench)
    "cli",        # the `mlm` command
    "__main__",
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(("mlm", *parts))] = path
    return out


MODULES = _modules()


def _targets(module: str, tree: ast.AST) -> set[str]:
    """The mlm modules `module` imports, anywhere in its code."""
    package = module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # `import mlm.bench.data as x`, `from mlm.x import func`
                name = name.rpartition(".")[0]
            if name.startswith("mlm") and name != module:
                found.add(name)
    return found


GRAPH = {m: _targets(m, ast.parse(p.read_text(encoding="utf-8"))) for m, p in MODULES.items()}


def _layer(module: str) -> int | None:
    """Index in LAYERS; None for the package itself (mlm/__init__.py is empty)."""
    name = module.split(".")[1] if "." in module else None
    return LAYERS.index(name) if name in LAYERS else None  # unknown: test_every_module_has_a_layer fails


def test_every_module_has_a_layer():
    unknown = sorted(m for m in MODULES if m != "mlm" and m.split(".")[1] not in LAYERS)
    assert not unknown, f"add these modules to LAYERS (and docs/architecture.md): {unknown}"
    assert (ROOT / "__init__.py").read_text().strip() == "", "mlm/__init__.py must stay empty (it imports nothing)"


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(GRAPH[m]):
            if state.get(t) == 1:
                cycle = path[path.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])


def test_stages_import_only_earlier_stages():
    wrong = []
    for m, targets in sorted(GRAPH.items()):
        here = _layer(m)
        for t in sorted(targets):
            there = _layer(t)
            if here is not None and there is not None and there > here:
                wrong.append(f"{m} imports {t} (a later stage)")
            same_package = m.count(".") >= 2 and t.split(".")[:2] == m.split(".")[:2]  # mlm.PKG.x -> mlm.PKG.y
            if here is not None and there is not None and there == here and not same_package:
                wrong.append(f"{m} imports {t} (the same layer)")
    assert not wrong, "\n".join(wrong)


def test_the_walk_sees_function_level_imports():
    """`from mlm.x import y` inside a function counts, as does `from mlm import a, b`."""
    assert "mlm.shards" in GRAPH["mlm.train"] and "mlm.storage" in GRAPH["mlm.train"]
    assert "mlm.model" in GRAPH["mlm.evaluate"]  # imported inside functions only


def test_the_design_document_lists_the_same_layers():
    """docs/architecture.md's module map is this order (the living design stays true)."""
    import re

    doc = (ROOT.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    listed = re.findall(r"^\| \d+ \| `(\w+)`", doc, flags=re.M)
    assert listed == [m for m in LAYERS if m != "__main__"], listed
