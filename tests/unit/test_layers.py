"""The packages import one way: serving code stands alone; the harness and the exporter
build on it, the fixtures on nothing; the GPU image holds only what serving needs."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROJECT = {"engine", "bench", "export", "fixtures"}
# package -> the project packages it may import (itself included)
ALLOWED = {
    "engine": {"engine"},
    "fixtures": {"fixtures"},
    "export": {"export", "fixtures", "engine"},  # an ONNX variant is checked on our runtime
    "bench": {"bench", "engine", "fixtures"},
}
HARNESS_ONLY = {"aiohttp", "tqdm", "matplotlib"}
# numpy: the harness's, and the ONNX runtime's (its own extra), nothing else in serving
ONNX_RUNTIME_MODULES = {"onnx_model.py", "onnx_engine.py"}


def _imports(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, at any depth (lazy ones too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_only_the_layers_below_it(package):
    wrong = {
        str(path.relative_to(REPO)): sorted((_imports(path) & PROJECT) - ALLOWED[package])
        for path in (REPO / package).rglob("*.py")
    }
    assert not {k: v for k, v in wrong.items() if v}


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=\[ ]", d)[0] for d in requirements}


def test_serving_code_needs_none_of_the_harness_dependencies():
    modules = list((REPO / "engine").rglob("*.py"))
    used = set().union(*(_imports(p) for p in modules))
    assert not used & HARNESS_ONLY
    numpy_users = {p.name for p in modules if "numpy" in _imports(p)}
    assert numpy_users <= ONNX_RUNTIME_MODULES, numpy_users
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert not _names(project["dependencies"]) & (HARNESS_ONLY | {"numpy"})
    assert _names(extras["bench"]) >= HARNESS_ONLY | {"numpy"}
    assert _names(extras["onnx"]) >= {"numpy", "onnxruntime"}


def test_the_gpu_image_copies_only_serving_code():
    dockerfile = (REPO / "Dockerfile").read_text()
    stage = dockerfile.split("AS gpu-app", 1)[1].split("\nFROM ", 1)[0]
    copied = {line.split()[1] for line in stage.splitlines() if line.startswith("COPY ")}
    assert copied == {"README.md", "engine", "configs"}


def test_generated_models_resolve_through_the_registered_source():
    from engine.config import resolve_model

    assert resolve_model("Qwen/Qwen3-VL-8B-Instruct") == "Qwen/Qwen3-VL-8B-Instruct"
    assert resolve_model("/models/qwen3-vl") == "/models/qwen3-vl"
    with pytest.raises(ValueError, match="no model source 'nowhere'"):
        resolve_model("nowhere:tiny")
    from fixtures.tiny_model import ensure_model

    with pytest.raises(ValueError, match="unknown preset"):
        resolve_model("generated:huge")  # reached the fixtures through the entry point
    assert resolve_model("generated:tiny") == str(ensure_model("tiny"))
