"""Request parsing, stream chunk encoding and profile validation."""

from __future__ import annotations

import json

import pytest

from engine.config import CONFIG_DIR, AppConfig, RequestLimits, load_config
from engine.errors import RequestError
from engine.intake import parse_request
from engine.protocol import ChunkEncoder, Usage


def test_parse_request_accepts_openai_image_parts():
    body = {
        "model": "m",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hi"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            }
        ],
        "stop": "END",
        "user": "ignored-field",
    }
    request = parse_request(json.dumps(body).encode())
    assert request.messages[0].content[1].image_url.url.startswith("data:")
    assert request.stop == ["END"]


def test_parse_request_names_the_deepest_field():
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}
    with pytest.raises(RequestError) as info:
        parse_request(json.dumps(body).encode())
    assert info.value.param == "messages.0.content.0.image_url.image_url"


@pytest.mark.parametrize("n, accepted", [(0, False), (1, True), (8, True), (9, False)])
def test_n_is_bounded_by_the_profile(n, accepted):
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": n})
    if accepted:
        assert parse_request(body.encode(), RequestLimits(max_n=8)).n == n
        return
    with pytest.raises(RequestError) as info:
        parse_request(body.encode(), RequestLimits(max_n=8))
    assert info.value.param == "n"


def test_chunks_are_valid_sse_json():
    encoder = ChunkEncoder("chatcmpl-1", "model-a")
    first, middle, last = encoder.delta("你好"), encoder.delta('"x"'), encoder.delta("", "stop")
    usage = encoder.usage(Usage(prompt_tokens=3, completion_tokens=2))
    parsed = [json.loads(c.removeprefix("data: ").strip()) for c in (first, middle, last, usage)]
    assert parsed[0]["choices"][0]["delta"] == {"role": "assistant", "content": "你好"}
    assert parsed[1]["choices"][0]["delta"] == {"content": '"x"'}
    assert parsed[2]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert parsed[3]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert all(p["model"] == "model-a" and p["id"] == "chatcmpl-1" for p in parsed)


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_profile_validates_and_sizes_its_engines(path):
    """Loading validates (unknown keys, routing names, limits); on top, no engine is sized by
    vLLM's defaults (context and batch are what capacity and admission are computed from),
    and a generated model names a preset and scheme that exist."""
    from export.onnx import SCHEMES as ONNX_SCHEMES
    from export.quantize import SCHEMES
    from fixtures.tiny_model import PRESETS

    config = load_config(path)
    for model in config.models:
        assert {"max_model_len", "max_num_seqs"} <= model.engine_kwargs.keys(), model.name
        if model.model.startswith("generated:"):
            preset, _, scheme = model.model.removeprefix("generated:").partition("+")
            assert preset in PRESETS, model.model
            assert not scheme or scheme in (*SCHEMES, *ONNX_SCHEMES), model.model
            assert (model.runtime == "onnx") == scheme.startswith("onnx-"), model.model


def test_gpu_profile_uses_flash_attention_and_names_a_fallback():
    config = load_config(CONFIG_DIR / "gpu-qwen3-vl-8b.yaml")
    assert config.primary.model == "Qwen/Qwen3-VL-8B-Instruct"
    assert config.primary.engine_kwargs["attention_backend"] == "FLASH_ATTN"
    assert config.primary.ray_actor_options["num_gpus"] == 1
    assert config.routing.fallbacks and config.routing.fallbacks[0] != config.primary.name


def test_routing_must_name_configured_models():
    with pytest.raises(ValueError, match="not in models"):
        AppConfig.model_validate(
            {"models": [{"name": "a", "model": "x"}], "routing": {"primary": "b"}}
        )


def test_unknown_profile_keys_are_rejected():
    with pytest.raises(ValueError, match="Extra inputs"):
        AppConfig.model_validate({"models": [{"name": "a", "model": "x", "engine_kwrags": {}}]})


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_deployment_options_are_valid_ray_serve_options(path):
    from ray.serve.config import AutoscalingConfig

    config = load_config(path)
    for model in config.models:
        options = model.deployment_options(config.drain_timeout_s)
        assert options["graceful_shutdown_timeout_s"] >= config.admission.max_request_timeout_s
        if "autoscaling_config" in options:
            assert "num_replicas" not in options
            scaling = AutoscalingConfig(**options["autoscaling_config"])
            assert scaling.min_replicas <= scaling.max_replicas
        assert model.saturation_policy().max_running_requests >= 1


def test_gpu_primary_autoscales_and_saturates_before_its_queue():
    primary = load_config(CONFIG_DIR / "gpu-qwen3-vl-8b.yaml").primary
    policy = primary.saturation_policy()
    assert policy.max_running_requests == primary.engine_kwargs["max_num_seqs"]
    assert primary.autoscaling_config["target_ongoing_requests"] < policy.max_running_requests
