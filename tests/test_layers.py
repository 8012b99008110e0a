"""The package's layers point one way: models and their building blocks never import the
training, command-line or evaluation code (imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vocoder"
LOWER = ["models", "nn", "flows", "features.py", "errors.py", "checkpoint.py", "losses.py",
         "audio.py", "atomic.py", "config.py", "devices.py"]
UPPER = ("vocoder.training", "vocoder.cli", "vocoder.distill", "vocoder.bench",
         "vocoder.report", "vocoder.synthesis", "vocoder.evaluation", "vocoder.export")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _files(entry: str) -> list[Path]:
    path = PACKAGE / entry
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


@pytest.mark.parametrize("entry", LOWER)
def test_lower_layers_do_not_import_upper_ones(entry):
    for path in _files(entry):
        upward = sorted(name for name in _imports(path) if name.startswith(UPPER))
        assert not upward, f"{path.relative_to(PACKAGE)} imports {upward}"
