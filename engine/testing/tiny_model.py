"""Generate a randomly initialised Qwen3-VL checkpoint that vLLM serves like the real one.

Model hubs are out of reach in CI, so tests and benchmarks run on a checkpoint we write
ourselves: the real ``Qwen3VLForConditionalGeneration`` architecture with random weights
(fixed seed), a byte-level BPE tokenizer carrying Qwen3-VL's special tokens, Qwen3-VL's
chat format, an image-processor config and a generation config.

Presets:
  tiny   tests; well under 1M parameters.
  small  benchmarks; ~170M parameters, hidden/intermediate sizes multiples of 128 so
         vLLM's INT8/INT4 CPU kernels apply to its linear layers.
head_dim is 64 in both (vLLM's CPU attention backend rejects 16).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

# Qwen3-VL's special tokens, in the real tokenizer's order.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<tool_call>", "</tool_call>", "<think>", "</think>",
]  # fmt: skip
TEMPLATE_PATH = Path(__file__).with_name("chat_template.jinja")
SEED = 1234
FORMAT_VERSION = "2"  # bump to invalidate every cached checkpoint

# A small bilingual corpus (product tagging, customer service) to train the BPE merges on.
_CORPUS = [
    "What colour is this product? Describe the item in the picture.",
    "Is the package damaged in this photo? Please check the screenshot.",
    "Tag this product: category, material, colour, style, season.",
    "The customer says the order has not arrived. What does the screenshot show?",
    "Does this image contain anything that violates the content policy?",
    "这是什么商品？请描述图片中的物品。",
    "这个包裹在照片里有损坏吗？请查看截图。",
    "请给这个商品打标签：类别、材质、颜色、风格、季节。",
    "顾客说订单还没有到，截图显示了什么？",
    "这张图片是否包含违反内容规范的内容？",
    "The quick brown fox jumps over the lazy dog 0123456789.",
]


@dataclasses.dataclass(frozen=True)
class Preset:
    """Sizes of one generated checkpoint."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_depth: int
    vocab_size: int = 2048
    head_dim: int = 64
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=1, num_key_value_heads=1,
        vision_hidden_size=64, vision_intermediate_size=128, vision_depth=2,
    ),
    "small": Preset(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=16, num_key_value_heads=4,
        vision_hidden_size=512, vision_intermediate_size=1536, vision_depth=4,
        vocab_size=8192, tie_word_embeddings=False,
    ),
}  # fmt: skip


def default_cache_dir() -> Path:
    """Where generated checkpoints live (``QWEN3VL_MODEL_CACHE`` overrides)."""
    root = os.environ.get("QWEN3VL_MODEL_CACHE") or Path.home() / ".cache" / "qwen3vl-serve"
    return Path(root) / "models"


def ensure_model(preset: str = "tiny", cache_dir: Path | None = None) -> Path:
    """Return the checkpoint directory for ``preset``, generating it only when missing."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    target = (cache_dir or default_cache_dir()) / f"qwen3-vl-{preset}-v{FORMAT_VERSION}"

    def build(staging: Path) -> None:
        _write_checkpoint(PRESETS[preset], staging)
        (staging / "COMPLETE").write_text(FORMAT_VERSION)

    return _build_once(target, "COMPLETE", build)


def ensure_variant(spec: str, cache_dir: Path | None = None) -> Path:
    """``'small+w8a8-int8'``: the generated ``small`` checkpoint quantized with that scheme
    (``python -m export quantize``), built once into the cache."""
    preset, _, scheme = spec.partition("+")
    base = ensure_model(preset, cache_dir)

    def build(staging: Path) -> None:
        from export.quantize import quantize

        # the tiny preset is 64 wide: groups of 128 do not fit, 32 do
        quantize(base, scheme, staging, group_size=32 if preset == "tiny" else None)

    return _build_once(base.parent / f"{base.name}-{scheme}", "manifest.json", build)


def _build_once(target: Path, marker: str, build) -> Path:
    """``target``, built by ``build(staging_dir)`` unless ``target/marker`` exists. Built in a
    temporary folder and renamed: concurrent callers never see half a checkpoint."""
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        try:
            staging.rename(target)
        except OSError:  # another process won the race
            if not (target / marker).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
        model_max_length=131072,
    )
    tokenizer.chat_template = TEMPLATE_PATH.read_text()
    return tokenizer


def _write_checkpoint(preset: Preset, out: Path) -> None:
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    tokenizer = _build_tokenizer(preset.vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = -(-len(tokenizer) // 64) * 64  # pad rows to a multiple of 64
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=preset.hidden_size,
            intermediate_size=preset.intermediate_size,
            num_hidden_layers=preset.num_hidden_layers,
            num_attention_heads=preset.num_attention_heads,
            num_key_value_heads=preset.num_key_value_heads,
            head_dim=preset.head_dim,
            max_position_embeddings=preset.max_position_embeddings,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                "mrope_section": [8, 12, 12],
                "mrope_interleaved": True,
            },
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            tie_word_embeddings=preset.tie_word_embeddings,
            dtype="bfloat16",
        ),
        vision_config=dict(
            depth=preset.vision_depth,
            hidden_size=preset.vision_hidden_size,
            intermediate_size=preset.vision_intermediate_size,
            num_heads=preset.vision_hidden_size // 64,
            out_hidden_size=preset.hidden_size,
            num_position_embeddings=256,
            deepstack_visual_indexes=[0],
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=preset.tie_word_embeddings,
    )
    config.architectures = ["Qwen3VLForConditionalGeneration"]
    torch.manual_seed(SEED)
    model = Qwen3VLForConditionalGeneration(config).to(torch.bfloat16).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=True, temperature=0.7, top_p=0.8, top_k=20,
    )  # fmt: skip
    model.save_pretrained(out, safe_serialization=True)

    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            patch_size=16, merge_size=2, temporal_patch_size=2,
            size={"shortest_edge": 64 * 64, "longest_edge": 1280 * 1280},
            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        ),
        video_processor=Qwen3VLVideoProcessor(
            patch_size=16, merge_size=2, temporal_patch_size=2,
            size={"shortest_edge": 128 * 32 * 32, "longest_edge": 768 * 32 * 32},
        ),
        tokenizer=tokenizer,
        chat_template=TEMPLATE_PATH.read_text(),
    )  # fmt: skip
    processor.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    (out / "generated.json").write_text(
        json.dumps({"preset": dataclasses.asdict(preset), "parameters": n_params, "seed": SEED})
    )


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", nargs="?", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    print(ensure_model(args.preset, args.cache_dir))


if __name__ == "__main__":
    main()
