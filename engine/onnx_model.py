"""An exported Qwen3-VL (``python -m export onnx``) on ONNX Runtime: the graphs and how to
feed them, for one prefill or one batched decode step at a time.

The graph contract (what ``export/onnx.py`` writes, described in its module docstring):
``vision.onnx`` (one image's patches and its grid tables -> image embeddings and deepstack
features), ``embed.onnx`` (token ids -> embeddings) and ``decoder.onnx`` (embeddings, mask,
M-RoPE position ids, dense deepstack features, past key/values -> last-position logits and
present key/values), with ``onnx_config.json`` giving the sizes.

A prefill runs one request: the chat template and Qwen3-VL's image processor (the
checkpoint's own, through transformers), the vision encoder per image, the image embeddings
written over the ``<|image_pad|>`` positions, the deepstack features at the same positions,
Qwen3-VL's 3-D positions (``rope_positions``), then the decoder. A decode step runs every
running sequence at once: their caches left-padded to the longest, the padding masked.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CONFIG_FILE = "onnx_config.json"


def decoder_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """The decoder's input and output names, in order."""
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    inputs = ["inputs_embeds", "attention_mask", "position_ids", "deepstack_embeds", *past]
    return inputs, ["logits", *present]


def vision_tables(grid_thw: Any, config: dict[str, Any]) -> dict[str, np.ndarray]:
    """The vision graph's grid inputs for one image (``grid_thw`` [1, 3]): the bilinear
    resampling of the learned position grid and the (row, column) rotary positions, in the
    patch order of Qwen3-VL's processor, by the same transformers functions the PyTorch
    model calls (they exist to be precomputed outside a traced graph)."""
    import torch
    from transformers.vision_utils import (
        get_vision_interpolation_indices_and_weights,
        get_vision_position_ids,
    )

    grid = torch.as_tensor(np.asarray(grid_thw, dtype=np.int64).reshape(1, 3))
    merge = config["spatial_merge_size"]
    indices, weights = get_vision_interpolation_indices_and_weights(
        grid, config["num_grid_per_side"], "bilinear", True, merge
    )
    return {
        "interp_indices": indices.numpy().astype(np.int64),
        "interp_weights": weights.numpy().astype(np.float32),
        "rope_position_ids": get_vision_position_ids(grid, merge).numpy().astype(np.int64),
    }


def rope_positions(
    input_ids: np.ndarray, grids: list[np.ndarray], image_token_id: int, merge: int
) -> tuple[np.ndarray, int]:
    """Qwen3-VL's M-RoPE positions [3, seq] of one prompt and the next position after it:
    text advances all three axes together; an image's tokens take (time, row, column) of
    its merged grid, offset by the position reached before it; text after an image resumes
    one past the largest position used (as ``Qwen3VLModel.get_rope_index`` for images)."""
    positions = np.zeros((3, len(input_ids)), dtype=np.int64)
    start, i, image = 0, 0, 0
    while i < len(input_ids):
        if input_ids[i] != image_token_id:
            positions[:, i] = start
            start, i = start + 1, i + 1
            continue
        _, h, w = (int(v) for v in grids[image])
        rows, cols = h // merge, w // merge
        count = rows * cols
        positions[0, i : i + count] = start
        positions[1, i : i + count] = start + np.repeat(np.arange(rows), cols)
        positions[2, i : i + count] = start + np.tile(np.arange(cols), rows)
        start += max(rows, cols)
        i, image = i + count, image + 1
    return positions, start


@dataclass
class Sequence:
    """One request's decoder state: its cache, one [kv heads, length, head dim] per key and
    value of every layer, and the next M-RoPE position."""

    cache: list[np.ndarray]
    next_position: int
    tokens: list[int] = field(default_factory=list)  # generated so far

    @property
    def length(self) -> int:
        return self.cache[0].shape[1]


@dataclass
class Prompt:
    """A rendered request: token ids, and per image its patches and grid."""

    input_ids: np.ndarray  # [seq] int64
    pixel_values: list[np.ndarray]  # per image [patches, C*T*P*P] float32
    grids: list[np.ndarray]  # per image [3] (t, h, w)


class OnnxModel:
    """The three sessions of one exported model, with its tokenizer and image processor."""

    def __init__(
        self,
        model_dir: str | Path,
        providers: list[str] | None = None,
        threads: int | None = None,
    ) -> None:
        import onnxruntime as ort
        from transformers import AutoProcessor

        self.dir = Path(model_dir)
        self.config = json.loads((self.dir / CONFIG_FILE).read_text())
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # No busy-waiting between calls: the threads would spin on cores the event loop, the
        # image decoding and (on a small node) everything else need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        providers = providers or ["CPUExecutionProvider"]
        self.sessions = {
            name: ort.InferenceSession(str(self.dir / f"{name}.onnx"), options, providers=providers)
            for name in ("vision", "embed", "decoder")
        }
        self.providers = self.sessions["decoder"].get_providers()
        self.processor = AutoProcessor.from_pretrained(self.dir)
        self.tokenizer = self.processor.tokenizer
        self._inputs, self._outputs = decoder_io_names(self.config["num_layers"])
        generation = json.loads((self.dir / "generation_config.json").read_text())
        eos = generation.get("eos_token_id", self.tokenizer.eos_token_id)
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos])
        self.generation_defaults = {
            k: generation[k] for k in ("temperature", "top_p", "top_k") if k in generation
        }

    # -- prompts -----------------------------------------------------------------------------
    def render(self, conversation: list[dict[str, Any]], tools: list[dict] | None = None) -> Prompt:
        """Chat template and image processor, as transformers applies them for this model.
        ``conversation`` is in vLLM's message format (decoded images as ``image_pil`` parts)."""
        messages, images = [], []
        for message in conversation:
            content = message["content"]
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part.get("type") == "image_pil":
                        images.append(part["image_pil"])
                        parts.append({"type": "image"})
                    else:
                        parts.append(part)
                message = {**message, "content": parts}
            messages.append(message)
        text = self.processor.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=False
        )
        encoded = self.processor(
            text=[text], images=images or None, return_tensors="np", add_special_tokens=False
        )
        input_ids = np.asarray(encoded["input_ids"][0], dtype=np.int64)
        if not images:
            return Prompt(input_ids, [], [])
        grids = [np.asarray(g, dtype=np.int64) for g in encoded["image_grid_thw"]]
        merge = self.config["spatial_merge_size"]
        expected = sum(int(np.prod(g)) // merge**2 for g in grids)
        found = int((input_ids == self.config["image_token_id"]).sum())
        if found != expected:
            raise ValueError(
                f"the prompt has {found} image tokens where its images need {expected}"
            )
        pixels = np.asarray(encoded["pixel_values"], dtype=np.float32)
        counts = [int(np.prod(g)) for g in grids]
        bounds = np.cumsum([0, *counts])
        pieces = [pixels[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        return Prompt(input_ids, pieces, grids)

    # -- one request's prefill ---------------------------------------------------------------
    def prefill(self, prompt: Prompt) -> tuple[np.ndarray, Sequence]:
        """Logits [vocab] of the prompt's last position, and its decoder state."""
        config = self.config
        ids = prompt.input_ids
        embeds = self.sessions["embed"].run(None, {"input_ids": ids[None]})[0]
        deepstack = np.zeros((config["num_deepstack"], 1, len(ids), embeds.shape[-1]), np.float32)
        image_at = np.flatnonzero(ids == config["image_token_id"])
        if len(prompt.grids):
            features, stacks = [], []
            for pixels, grid in zip(prompt.pixel_values, prompt.grids, strict=True):
                inputs = {"pixel_values": pixels, **vision_tables(grid, config)}
                image, stack = self.sessions["vision"].run(None, inputs)
                features.append(image)
                stacks.append(stack)
            embeds[0, image_at] = np.concatenate(features)
            deepstack[:, 0, image_at] = np.concatenate(stacks, axis=1)
        positions, next_position = rope_positions(
            ids, prompt.grids, config["image_token_id"], config["spatial_merge_size"]
        )
        empty = np.zeros((1, config["num_kv_heads"], 0, config["head_dim"]), np.float32)
        feed = {
            "inputs_embeds": embeds,
            "attention_mask": np.ones((1, len(ids)), np.int64),
            "position_ids": positions[:, None, :],
            "deepstack_embeds": deepstack,
            **{name: empty for name in self._inputs[4:]},
        }
        logits, *present = self.sessions["decoder"].run(self._outputs, feed)
        return logits[0], Sequence([p[0] for p in present], next_position)

    # -- a batched decode step ---------------------------------------------------------------
    def decode(self, sequences: list[Sequence], tokens: list[int]) -> np.ndarray:
        """One token for each sequence (its cache grows by one); logits [batch, vocab]."""
        config = self.config
        batch, longest = len(sequences), max(s.length for s in sequences)
        kv, head = config["num_kv_heads"], config["head_dim"]
        mask = np.zeros((batch, longest + 1), np.int64)
        mask[:, -1] = 1
        feed: dict[str, np.ndarray] = {}
        for j, name in enumerate(self._inputs[4:]):
            past = np.zeros((batch, kv, longest, head), np.float32)
            for b, seq in enumerate(sequences):
                if seq.length:
                    past[b, :, longest - seq.length :] = seq.cache[j]
            feed[name] = past
        for b, seq in enumerate(sequences):
            mask[b, longest - seq.length : longest] = 1
        ids = np.asarray(tokens, np.int64)[:, None]
        embeds = self.sessions["embed"].run(None, {"input_ids": ids})[0]
        positions = np.asarray([s.next_position for s in sequences], np.int64)
        feed |= {
            "inputs_embeds": embeds,
            "attention_mask": mask,
            "position_ids": np.broadcast_to(positions[None, :, None], (3, batch, 1)).copy(),
            "deepstack_embeds": np.zeros(
                (config["num_deepstack"], batch, 1, embeds.shape[-1]), np.float32
            ),
        }
        logits, *present = self.sessions["decoder"].run(self._outputs, feed)
        for b, seq in enumerate(sequences):
            start = longest - seq.length
            seq.cache = [np.ascontiguousarray(p[b, :, start:]) for p in present]
            seq.next_position += 1
        return logits
