"""Quantize a Qwen3-VL checkpoint into a compressed-tensors checkpoint that vLLM loads as is.

A linear recipe, as llm-compressor's Qwen3-VL example: constants, the scheme as data, one
pass, save. Everything format-related is compressed-tensors' own API (the schemes are its
presets, the scales come from its ``calculate_qparams``, its ``ModelCompressor`` packs and
writes the config); nothing here writes the format by hand.

- ``w8a8-int8``: int8 weights, symmetric, per output channel; int8 activations, dynamic per token.
- ``w4a16``: int4 weights, symmetric, groups of 128 (``--group-size`` for narrow test models).
- ``fp8-dynamic``: fp8 (e4m3) weights per channel, dynamic per-token fp8 activations (GPU only
  in vLLM; on CPU it is produced and checked structurally).

All three are data-free (round-to-nearest from each weight's min/max): no calibration set.
The vision tower and ``lm_head`` stay in the original precision.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

SCHEMES = {"w8a8-int8": "W8A8", "w4a16": "W4A16", "fp8-dynamic": "FP8_DYNAMIC"}
# Both the HF names (model.visual.*) and vLLM's (visual.*) match these.
IGNORE = ["re:.*lm_head", "re:.*visual.*"]
WEIGHT_FILES = (".safetensors", ".bin")


def _weight_qparams(module, args) -> None:
    """Data-free scales: per-channel or per-group min/max of the weight, via compressed-tensors."""
    import torch
    from compressed_tensors.quantization.utils import calculate_qparams

    weight = module.weight.detach().float()
    if args.group_size:
        if weight.shape[1] % args.group_size:
            raise ValueError(
                f"{weight.shape[1]} input features do not split into groups of "
                f"{args.group_size}; pass a smaller --group-size"
            )
        grouped = weight.reshape(weight.shape[0], -1, args.group_size)
        low, high = grouped.amin(dim=2), grouped.amax(dim=2)
    else:
        low, high = weight.amin(dim=1, keepdim=True), weight.amax(dim=1, keepdim=True)
    scale, zero_point = calculate_qparams(low, high, args)
    with torch.no_grad():
        module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
        module.weight_zero_point.copy_(zero_point.reshape(module.weight_zero_point.shape))


def quantize(model_dir: Path, scheme: str, out_dir: Path, group_size: int | None = None) -> Path:
    """Write the ``scheme`` variant of ``model_dir`` to ``out_dir`` (with its manifest)."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from transformers import AutoModelForImageTextToText

    from export.manifest import write_manifest

    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; one of {sorted(SCHEMES)}")
    started = time.perf_counter()
    # 1. the base model, in its own precision
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16)
    # 2. the scheme as data
    preset = preset_name_to_scheme(SCHEMES[scheme], ["Linear"])
    if group_size and preset.weights.group_size:
        preset.weights.group_size = group_size
    config = QuantizationConfig(config_groups={"group_0": preset}, ignore=IGNORE)
    apply_quantization_config(model, config)
    # 3. one data-free pass: weight scales and zero points
    quantized = 0
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is not None:
            _weight_qparams(module, module.quantization_scheme.weights)
            module.quantization_status = QuantizationStatus.FROZEN
            quantized += 1
    if not quantized:
        raise ValueError("no Linear layer matched outside the ignore list")
    # 4. compress and save: weights, config.json with quantization_config, processor files
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    compressor.update_config(out_dir)
    for path in Path(model_dir).iterdir():
        if (
            path.is_file()
            and not path.name.endswith(WEIGHT_FILES)
            and path.name
            not in (
                "config.json",
                "model.safetensors.index.json",
                "manifest.json",
                "COMPLETE",
            )
        ):
            shutil.copy2(path, out_dir / path.name)
    write_manifest(
        out_dir,
        Path(model_dir),
        scheme,
        IGNORE,
        preset.weights.group_size,
        quantized_layers=quantized,
        seconds=time.perf_counter() - started,
    )
    return out_dir
