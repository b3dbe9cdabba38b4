"""``generated:`` models: the checkpoints ``fixtures.tiny_model`` writes, and their quantized
variants, built on first use.

Registered as the ``generated`` model source (``[project.entry-points]`` in pyproject.toml):
``engine.config`` finds it by name when a profile says ``model: generated:SPEC``, so the
serving code imports neither the fixtures nor the exporter.
"""

from __future__ import annotations

from pathlib import Path

from fixtures.tiny_model import build_once, ensure_model


def resolve(spec: str) -> Path:
    """``'tiny'``, ``'small'``: a generated checkpoint; ``'small+w8a8-int8'``: its variant."""
    return ensure_variant(spec) if "+" in spec else ensure_model(spec)


def ensure_variant(spec: str, cache_dir: Path | None = None) -> Path:
    """``'small+w8a8-int8'``: the generated ``small`` checkpoint quantized with that scheme
    (``python -m export quantize``); ``'small+onnx-int8'`` (``onnx-fp32``, ``onnx-int4``): its
    ONNX export (``python -m export onnx``); built once into the cache."""
    preset, _, scheme = spec.partition("+")
    base = ensure_model(preset, cache_dir)

    def build(staging: Path) -> None:
        if scheme.startswith("onnx-"):  # onnx-fp32, onnx-int8, onnx-int4
            from export.onnx import export_onnx

            quantization = scheme.removeprefix("onnx-")
            export_onnx(base, staging, None if quantization == "fp32" else quantization)
            return
        from export.quantize import quantize

        # the tiny preset is 64 wide: groups of 128 do not fit, 32 do
        quantize(base, scheme, staging, group_size=32 if preset == "tiny" else None)

    return build_once(base.parent / f"{base.name}-{scheme}", "manifest.json", build)
