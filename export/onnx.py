"""Qwen3-VL to ONNX: a vision encoder, a token embedding and a decoder with past key/values,
deepstack kept, plus ONNX Runtime's INT8 and INT4 quantization of them.

The three graphs (the split the ONNX community uses for VLMs), all float32:

| graph          | inputs                                                         | outputs |
|----------------|----------------------------------------------------------------|---------|
| ``vision``     | ``pixel_values`` [patches, C*T*P*P] of one image, and the tables its grid gives: ``interp_indices``/``interp_weights`` [patches, 4] (the learned position grid resampled bilinearly) and ``rope_position_ids`` [patches, 2] (row, column) | ``image_embeds`` [tokens, hidden], ``deepstack_embeds`` [deepstack layers, tokens, hidden] |
| ``embed``      | ``input_ids`` [batch, seq]                                     | ``inputs_embeds`` [batch, seq, hidden] |
| ``decoder``    | ``inputs_embeds``, ``attention_mask`` [batch, past+seq], ``position_ids`` [3, batch, seq] (M-RoPE: time, row, column), ``deepstack_embeds`` [deepstack layers, batch, seq, hidden] (zero off the image), ``past_key_values.N.key/value`` [batch, kv heads, past, head dim] | ``logits`` [batch, vocab] of the last position, ``present.N.key/value`` |

Why the vision encoder takes its grid as tables: Qwen3-VL computes the bilinear position
resampling, the 2-D rotary positions and the per-image attention spans from ``grid_thw``
with Python loops, which tracing cannot follow. transformers factors exactly these out
(``transformers.vision_utils``, "pre-computing ... data-dependent tensors that can break
model graph capturing"); the runtime computes them from the grid with those same functions
(``engine.onnx_model.vision_tables``) and the graph holds everything that has weights. One image per call, so
attention spans the whole input.

Deepstack: Qwen3-VL adds the vision tower's intermediate features to the hidden states of the
image positions after each of the first decoder layers; the decoder takes them dense
(``deepstack_embeds``, zero at text positions), so no scatter runs in the graph.

The graphs are written from the checkpoint's own modules (``transformers``'
``Qwen3VLForConditionalGeneration``) with export-friendly attention, rotary and mask code,
and traced with ``torch.onnx.export`` (TorchScript, opset 17). ``--int8``:
``onnxruntime.quantization.quantize_dynamic`` (MatMul weights int8 per channel, activations
quantized per batch at run time) on the decoder and the vision encoder. ``--int4``:
``MatMulNBitsQuantizer`` (weight-only int4, symmetric, blocks of ``block_size``) on the
decoder; the vision encoder stays float32.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

GRAPHS = ("vision", "embed", "decoder")
SCHEMES = ("onnx-fp32", "onnx-int8", "onnx-int4")  # as variants: generated:small+onnx-int8
OPSET = 17
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
    "config.json",
)


def export_onnx(
    model_dir: Path, out_dir: Path, quantization: str | None = None, block_size: int = 32
) -> Path:
    """Write the three graphs of ``model_dir`` (float32, or ``int8`` / ``int4``), its
    tokenizer and processor files, ``onnx_config.json`` and the manifest to ``out_dir``."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from export.manifest import write_manifest

    if quantization not in (None, "int8", "int4"):
        raise ValueError(f"quantization is int8 or int4, not {quantization!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = _graph_config(model)
    fp32 = out_dir / "fp32" if quantization else out_dir
    fp32.mkdir(exist_ok=True)
    with torch.no_grad():
        _export_vision(model, fp32 / "vision.onnx")
        _export_embed(model, fp32 / "embed.onnx")
        _export_decoder(model, config, fp32 / "decoder.onnx")
    if quantization == "int8":
        for name in ("decoder", "vision"):
            _quantize_int8(fp32 / f"{name}.onnx", out_dir / f"{name}.onnx")
        shutil.copy(fp32 / "embed.onnx", out_dir / "embed.onnx")
    elif quantization == "int4":
        _quantize_int4(fp32 / "decoder.onnx", out_dir / "decoder.onnx", block_size)
        for name in ("vision", "embed"):
            shutil.copy(fp32 / f"{name}.onnx", out_dir / f"{name}.onnx")
    if quantization:
        shutil.rmtree(fp32)
    for name in PROCESSOR_FILES:
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, out_dir / name)
    config["quantization"] = quantization or "fp32"
    (out_dir / "onnx_config.json").write_text(json.dumps(config, indent=1))
    write_manifest(
        out_dir,
        model_dir,
        scheme=f"onnx-{quantization or 'fp32'}",
        ignore=[] if quantization != "int4" else ["vision", "embed"],
        group_size=block_size if quantization == "int4" else None,
        format="onnx",
        graphs={name: f"{name}.onnx" for name in GRAPHS},
    )
    return out_dir


def _graph_config(model: Any) -> dict[str, Any]:
    """What the runtime needs to feed the graphs (``onnx_config.json``)."""
    text = model.config.text_config
    vision = model.config.vision_config
    return {
        "format": "qwen3-vl-onnx/1",
        "num_layers": text.num_hidden_layers,
        "num_kv_heads": text.num_key_value_heads,
        "head_dim": text.head_dim,
        "hidden_size": text.hidden_size,
        "vocab_size": text.vocab_size,
        "num_deepstack": len(vision.deepstack_visual_indexes),
        "spatial_merge_size": vision.spatial_merge_size,
        "num_grid_per_side": int(vision.num_position_embeddings**0.5),
        "image_token_id": model.config.image_token_id,
        "vision_start_token_id": model.config.vision_start_token_id,
        "max_position_embeddings": text.max_position_embeddings,
    }


# -- vision encoder ----------------------------------------------------------------------------
def _vision_module(model: Any):
    import torch

    visual = model.model.visual

    class Vision(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual = visual
            # The patch embedding is a Conv3d whose stride is its kernel: a linear map of each
            # flattened patch (a MatMul, which the INT8 pass quantizes).
            proj = visual.patch_embed.proj
            self.patch_weight = torch.nn.Parameter(proj.weight.reshape(proj.out_channels, -1).T)
            self.patch_bias = torch.nn.Parameter(proj.bias.clone())
            self.deepstack = list(visual.deepstack_visual_indexes)

        def forward(self, pixel_values, interp_indices, interp_weights, rope_position_ids):
            x = (pixel_values @ self.patch_weight + self.patch_bias)[None]  # [1, N, E]
            pos = (self.visual.pos_embed(interp_indices) * interp_weights[:, :, None]).sum(1)
            x = x + pos[None]
            cos, sin = self.visual.rotary_pos_emb(x, rope_position_ids)
            features = []
            for index, block in enumerate(self.visual.blocks):
                x = x + _vision_attention(block.attn, block.norm1(x), cos, sin)
                x = x + block.mlp(block.norm2(x))
                if index in self.deepstack:
                    merger = self.visual.deepstack_merger_list[self.deepstack.index(index)]
                    features.append(_merge(merger, x))
            return _merge(self.visual.merger, x), torch.stack(features)

    return Vision().eval()


def _merge(merger: Any, x: Any) -> Any:
    """Qwen3VLVisionPatchMerger on [1, N, E]: 2x2 patches to one token (as 3-D MatMuls)."""
    size = merger.hidden_size
    if merger.use_postshuffle_norm:
        x = merger.norm(x.reshape(1, -1, size))
    else:
        x = merger.norm(x).reshape(1, -1, size)
    return merger.linear_fc2(merger.act_fn(merger.linear_fc1(x)))[0]


def _vision_attention(attn: Any, x: Any, cos: Any, sin: Any) -> Any:
    """Full self-attention over one image's patches, rotary as ``apply_rotary_pos_emb_vision``."""
    import torch

    n = x.shape[1]
    qkv = attn.qkv(x).reshape(n, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
    q, k, v = qkv[0], qkv[1], qkv[2]  # [heads, N, D]
    q = q * cos[None] + _rotate_half(q) * sin[None]
    k = k * cos[None] + _rotate_half(k) * sin[None]
    weights = torch.softmax((q @ k.transpose(1, 2)) * attn.scaling, dim=-1)
    out = (weights @ v).transpose(0, 1).reshape(1, n, -1)
    return attn.proj(out)


def _rotate_half(x: Any) -> Any:
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _export_vision(model: Any, path: Path) -> None:
    import torch

    from engine.onnx_model import vision_tables

    module = _vision_module(model)
    grid = torch.tensor([[1, 4, 6]])
    config = _graph_config(model)
    tables = {k: torch.from_numpy(v) for k, v in vision_tables(grid, config).items()}
    patch = model.config.vision_config
    dim = patch.in_channels * patch.temporal_patch_size * patch.patch_size**2
    pixels = torch.randn(24, dim)
    args = (pixels, tables["interp_indices"], tables["interp_weights"], tables["rope_position_ids"])
    torch.onnx.export(
        module,
        args,
        str(path),
        input_names=["pixel_values", "interp_indices", "interp_weights", "rope_position_ids"],
        output_names=["image_embeds", "deepstack_embeds"],
        dynamic_axes={
            "pixel_values": {0: "patches"},
            "interp_indices": {0: "patches"},
            "interp_weights": {0: "patches"},
            "rope_position_ids": {0: "patches"},
            "image_embeds": {0: "tokens"},
            "deepstack_embeds": {1: "tokens"},
        },
        opset_version=OPSET,
        dynamo=False,
    )


# -- token embedding ---------------------------------------------------------------------------
def _export_embed(model: Any, path: Path) -> None:
    import torch

    class Embed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = model.model.language_model.embed_tokens

        def forward(self, input_ids):
            return self.embed(input_ids)

    torch.onnx.export(
        Embed().eval(),
        (torch.tensor([[1, 2, 3]]),),
        str(path),
        input_names=["input_ids"],
        output_names=["inputs_embeds"],
        dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "inputs_embeds": {0: "batch", 1: "seq"}},
        opset_version=OPSET,
        dynamo=False,
    )


# -- decoder with past key/values --------------------------------------------------------------
def _decoder_module(model: Any, config: dict[str, Any]):
    import torch

    text = model.model.language_model
    rotary = text.rotary_emb
    half = rotary.inv_freq.shape[0]
    # Interleaved M-RoPE: frequency d rotates by the row position where d % 3 == 1 and by the
    # column position where d % 3 == 2 (within their sections), else by time
    # (Qwen3VLTextRotaryEmbedding.recomposition_frequencies), as a constant one-hot per axis.
    axis = torch.zeros(3, half)
    axis[0] = 1
    for dim, offset in ((1, 1), (2, 2)):
        for d in range(offset, min(rotary.mrope_section[dim] * 3, half), 3):
            axis[0, d], axis[dim, d] = 0, 1

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = text.layers
            self.norm = text.norm
            self.lm_head = model.lm_head
            self.register_buffer("inv_freq", rotary.inv_freq.float().clone())
            self.register_buffer("axis", axis)
            self.num_deepstack = config["num_deepstack"]

        def forward(self, inputs_embeds, attention_mask, position_ids, deepstack_embeds, *past):
            seq = inputs_embeds.shape[1]
            past_len = past[0].shape[2]
            # rotary angles [B, S, D] from the three position rows
            freqs = position_ids.float()[..., None] * self.inv_freq  # [3, B, S, D/2]
            freqs = (freqs * self.axis[:, None, None, :]).sum(0)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos()[:, None], emb.sin()[:, None]  # [B, 1, S, D]
            # causal within the new tokens, all of the (unpadded) past visible
            total = past_len + seq
            query_pos = torch.arange(seq)[:, None] + past_len
            causal = torch.arange(total)[None, :] <= query_pos  # [S, T]
            keep = causal[None] & attention_mask.bool()[:, None, :]  # [B, S, T]
            bias = torch.where(keep, 0.0, torch.finfo(torch.float32).min)[:, None]  # [B,1,S,T]
            hidden = inputs_embeds
            presents = []
            for index, layer in enumerate(self.layers):
                residual = hidden
                hidden = layer.input_layernorm(hidden)
                hidden, key, value = _text_attention(
                    layer.self_attn, hidden, cos, sin, bias, past[2 * index], past[2 * index + 1]
                )
                hidden = residual + hidden
                hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
                if index < self.num_deepstack:
                    hidden = hidden + deepstack_embeds[index]
                presents += [key, value]
            last = self.norm(hidden[:, -1:, :])
            return (self.lm_head(last)[:, 0, :], *presents)

    return Decoder().eval()


def _text_attention(attn: Any, x: Any, cos: Any, sin: Any, bias: Any, past_k: Any, past_v: Any):
    """Qwen3VLTextAttention with the past concatenated in: q/k RMSNorm, rotary, GQA."""
    import torch

    batch, seq = x.shape[0], x.shape[1]
    shape = (batch, seq, -1, attn.head_dim)
    q = attn.q_norm(attn.q_proj(x).view(shape)).transpose(1, 2)
    k = attn.k_norm(attn.k_proj(x).view(shape)).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    k = torch.cat((past_k, k), dim=2)
    v = torch.cat((past_v, v), dim=2)
    groups = attn.num_key_value_groups
    k_all = k.repeat_interleave(groups, dim=1) if groups > 1 else k
    v_all = v.repeat_interleave(groups, dim=1) if groups > 1 else v
    weights = torch.softmax((q @ k_all.transpose(2, 3)) * attn.scaling + bias, dim=-1)
    out = (weights @ v_all).transpose(1, 2).reshape(batch, seq, -1)
    return attn.o_proj(out), k, v


def _export_decoder(model: Any, config: dict[str, Any], path: Path) -> None:
    import torch

    from engine.onnx_model import decoder_io_names

    module = _decoder_module(model, config)
    layers, kv, head = config["num_layers"], config["num_kv_heads"], config["head_dim"]
    batch, seq, past_len, hidden = 2, 3, 4, config["hidden_size"]
    inputs, outputs = decoder_io_names(layers)
    past = [torch.randn(batch, kv, past_len, head) for _ in range(2 * layers)]
    args = (
        torch.randn(batch, seq, hidden),
        torch.ones(batch, past_len + seq, dtype=torch.int64),
        torch.arange(seq).expand(3, batch, seq).contiguous(),
        torch.zeros(config["num_deepstack"], batch, seq, hidden),
        *past,
    )
    axes: dict[str, dict[int, str]] = {
        "inputs_embeds": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {1: "batch", 2: "seq"},
        "deepstack_embeds": {1: "batch", 2: "seq"},
        "logits": {0: "batch"},
    }
    for name in inputs[4:]:
        axes[name] = {0: "batch", 2: "past"}
    for name in outputs[1:]:
        axes[name] = {0: "batch", 2: "total"}
    torch.onnx.export(
        module,
        args,
        str(path),
        input_names=inputs,
        output_names=outputs,
        dynamic_axes=axes,
        opset_version=OPSET,
        dynamo=False,
    )


# -- quantization --------------------------------------------------------------------------------
def _quantize_int8(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(source),
        str(target),
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        weight_type=QuantType.QInt8,
    )


def _quantize_int4(source: Path, target: Path, block_size: int) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(source)), block_size=block_size, is_symmetric=True, accuracy_level=4
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), False)
