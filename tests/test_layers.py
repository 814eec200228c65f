"""The house rule: a lower layer of src/cnnlab never imports a higher one (at any depth, lazy
imports inside functions too), and training never sees MLflow, tracking or sweeps."""

from __future__ import annotations

import ast
from pathlib import Path

import cnnlab

PACKAGE = Path(cnnlab.__file__).parent

# Lowest first. bench/ (cnnlab-bench) sits under commands/ beside the recipe, train.py.
LAYERS = [
    ["__init__"], ["data"], ["models"], ["config"], ["training"], ["tracking"], ["inference"],
    ["sweeps"], ["train", "bench"], ["commands"],
]  # fmt: skip
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def layer(module_path: Path) -> str:
    """The first part of a module's path below cnnlab/: its folder, or the module's name."""
    first = module_path.relative_to(PACKAGE).parts[0]
    return first.removesuffix(".py")


def cnnlab_imports(path: Path) -> set[str]:
    """The cnnlab modules `path` imports, as 'folder' (or top-level module) names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "cnnlab":
                found.add(parts[1] if len(parts) > 1 else "__init__")
    return found & set(RANK)


def test_no_layer_imports_a_higher_one():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = layer(path)
        for there in cnnlab_imports(path):
            if RANK[there] > RANK[here]:
                upward.append(f"{path.relative_to(PACKAGE)} imports cnnlab.{there}")
    assert upward == []
    assert set(RANK) == {layer(p) for p in PACKAGE.rglob("*.py")} - {"conf"}  # all placed


def test_training_knows_nothing_of_mlflow():
    for path in (PACKAGE / "training").rglob("*.py"):
        text = path.read_text()
        assert "mlflow" not in cnnlab_imports(path) and "import mlflow" not in text, path
        assert "from mlflow" not in text, path
