"""The ONNX variant: export of the tiny Qwen3-VL (FP32, INT8, INT4), its parity with PyTorch,
the runtime's pieces against transformers, and an image chat through the OpenAI API served
by the ONNX engine (a server of its own, the real CLI and Ray Serve)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from bench.launch import free_port
from engine.config import CONFIG_DIR
from export.manifest import verify_manifest
from export.onnx import export_onnx
from fixtures.images import draw_image
from fixtures.tiny_model import ensure_model
from tests.utils import LiveServer, data_url, encode, image_message, noise_image

pytestmark = pytest.mark.slow
ONNX_MODEL = "qwen3-vl-tiny-onnx"


@pytest.fixture(scope="module")
def base() -> Path:
    return ensure_model("tiny")


@pytest.fixture(scope="module")
def exports(base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx")
    return {
        kind: export_onnx(base, root / kind, None if kind == "fp32" else kind)
        for kind in ("fp32", "int8", "int4")
    }


def _chat(seed: int, text: str = "Tag this product.") -> list[dict]:
    image = draw_image("product", (224, 160), seed)
    return [
        {
            "role": "user",
            "content": [{"type": "image_pil", "image_pil": image}, {"type": "text", "text": text}],
        }
    ]


def test_export_writes_three_graphs_with_dynamic_shapes_and_a_manifest(exports):
    import onnx

    for kind, directory in exports.items():
        assert not verify_manifest(directory), kind
        manifest = json.loads((directory / "manifest.json").read_text())
        assert manifest["format"] == "onnx" and manifest["scheme"] == f"onnx-{kind}"
        for name in ("vision", "embed", "decoder"):
            onnx.checker.check_model(str(directory / f"{name}.onnx"))
        assert (directory / "tokenizer.json").exists() and (
            directory / "chat_template.jinja"
        ).exists()
    decoder = onnx.load(str(exports["fp32"] / "decoder.onnx"), load_external_data=False)
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in decoder.graph.input
    }
    assert dims["inputs_embeds"][:2] == ["batch", "seq"]
    assert dims["position_ids"] == [3, "batch", "seq"]  # M-RoPE: time, row, column
    assert dims["deepstack_embeds"][1:3] == ["batch", "seq"]
    assert dims["past_key_values.0.key"][2] == "past"
    ops = {
        kind: {n.op_type for n in onnx.load(str(d / "decoder.onnx")).graph.node}
        for kind, d in exports.items()
    }
    assert "MatMulInteger" in ops["int8"] and "MatMulNBits" in ops["int4"]
    assert not {"MatMulInteger", "MatMulNBits"} & ops["fp32"]
    sizes = {kind: (d / "decoder.onnx").stat().st_size for kind, d in exports.items()}
    assert sizes["int4"] < sizes["int8"] < sizes["fp32"]


@pytest.mark.parametrize("kind", ["fp32", "int8", "int4"])
def test_the_onnx_variant_agrees_with_pytorch_fp32(base, exports, kind, tmp_path):
    from export.compare import compare

    result = compare(base, exports[kind], tokens=32, out=tmp_path / "compare.json")
    assert result["reference"] == "pytorch-fp32" and result["onnx_quantization"] == kind
    diff = result["max_abs_logit_diff_first_step"]
    if kind == "fp32":
        assert diff <= 1e-3 and result["passed"], result
    else:
        assert 0 < diff < 0.5  # quantized: close, not equal
        assert result["mean_kl"] <= 0.05
    assert result["greedy_token_agreement"] >= 0.9


def test_rope_positions_are_transformers_get_rope_index(base):
    import torch
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    from engine.onnx_model import rope_positions

    processor = AutoProcessor.from_pretrained(base)
    model = Qwen3VLForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    images = [draw_image("product", (224, 160), 1), draw_image("phone", (96, 200), 2)]
    content = [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    inputs = processor(text=[text], images=images, return_tensors="pt", add_special_tokens=False)
    image_tokens = (inputs["input_ids"] == model.config.image_token_id).int()  # text 0, image 1
    expected, deltas = model.model.get_rope_index(
        inputs["input_ids"], image_tokens, inputs["image_grid_thw"], None, inputs["attention_mask"]
    )
    grids = [g.numpy() for g in inputs["image_grid_thw"]]
    ours, next_position = rope_positions(
        inputs["input_ids"][0].numpy(), grids, model.config.image_token_id, 2
    )
    np.testing.assert_array_equal(ours, expected[:, 0].numpy())
    assert next_position == inputs["input_ids"].shape[1] + int(deltas[0])


def test_a_batched_decode_step_with_padding_equals_each_sequence_alone(exports):
    from engine.onnx_model import OnnxModel

    model = OnnxModel(exports["fp32"])
    prompts = [model.render(_chat(3)), model.render(_chat(4, "Is the package damaged? " * 3))]
    assert len(prompts[0].input_ids) != len(prompts[1].input_ids)
    alone, batched = [], []
    for prompt in prompts:
        logits, seq = model.prefill(prompt)
        token = int(np.argmax(logits))
        alone.append(model.decode([seq], [token])[0])
    sequences = []
    tokens = []
    for prompt in prompts:
        logits, seq = model.prefill(prompt)
        sequences.append(seq)
        tokens.append(int(np.argmax(logits)))
    batched = model.decode(sequences, tokens)
    np.testing.assert_allclose(batched, np.stack(alone), atol=1e-4)


def test_the_sampler_is_greedy_at_zero_reproducible_by_seed_and_keeps_min_tokens():
    from engine.onnx_engine import OnnxRequest, Sampler

    logits = np.array([0.1, 2.0, 0.5, 1.9], np.float32)

    def request(**kw) -> OnnxRequest:
        base = dict(max_tokens=8, temperature=1.0, top_p=1.0, top_k=0, seed=7, stop=[],
                    min_tokens=0, ignore_eos=False, prompt=None)  # fmt: skip
        return OnnxRequest(**{**base, **kw})

    assert Sampler(request(temperature=0.0), {3})(logits, 5) == 1
    assert Sampler(request(top_k=1), {3})(logits, 5) == 1
    seeded = [Sampler(request(seed=11), {0}) for _ in range(3)]
    assert len({tuple(s(logits, 5) for _ in range(20)) for s in seeded}) == 1
    many = Sampler(request(seed=None), {0})
    assert len({many(logits, 5) for _ in range(200)}) >= 3  # sampling, not argmax
    nucleus = Sampler(request(seed=None, top_p=0.4), {0})  # token 1 alone has p = 0.44
    assert {nucleus(logits, 5) for _ in range(50)} == {1}
    eos_first = np.array([5.0, 0.0, 0.0, 0.0], np.float32)
    assert Sampler(request(temperature=0.0, min_tokens=2), {0})(eos_first, 0) != 0


# -- served behind the same API ------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_server(tmp_path_factory):
    import yaml

    tmp = tmp_path_factory.mktemp("onnx-server")
    profile = yaml.safe_load((CONFIG_DIR / "cpu-tiny-onnx.yaml").read_text())
    profile["server"]["port"] = free_port()
    path = tmp / "profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    live = LiveServer(path, profile["server"]["port"], tmp / "server.log")
    yield live
    assert live.stop() == 0, live.log_tail()


@pytest.fixture(scope="module")
def onnx_client(onnx_server):
    from openai import OpenAI

    return OpenAI(base_url=onnx_server.base_url + "/v1", api_key="x", max_retries=0, timeout=120)


IMAGE = data_url(encode(noise_image(160, 128, seed=5)))


def test_an_image_chat_streams_and_completes_through_the_openai_api_on_onnx(onnx_client):
    kwargs = dict(model=ONNX_MODEL, messages=image_message(IMAGE), max_tokens=12, temperature=0)
    answer = onnx_client.chat.completions.create(**kwargs, extra_body={"ignore_eos": True})
    assert answer.model == ONNX_MODEL and answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 12 and answer.usage.prompt_tokens > 20
    chunks = list(
        onnx_client.chat.completions.create(
            **kwargs,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.choices[0].message.content  # greedy: the same answer both ways
    assert chunks[-1].usage.completion_tokens == 12
    assert sum(1 for c in chunks if c.choices) >= 8  # token by token, not one blob


def _batched_steps(server) -> float:
    """Decode steps so far that advanced more than one sequence at once."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.base_url + "/metrics", timeout=30).text
    buckets = {
        s.labels["le"]: s.value
        for f in text_string_to_metric_families(text)
        if f.name == "qwen3vl_onnx_decode_batch_size"
        for s in f.samples
        if s.name.endswith("_bucket")
    }
    return buckets["+Inf"] - buckets["1.0"]


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(onnx_server, onnx_client):
    """Greedy answers of four different images, alone and all at once: batching (left-padded
    caches of different lengths) must not change any of them, and it did batch."""

    def ask(seed: int) -> str:
        image = data_url(encode(noise_image(128 + 32 * seed, 128, seed=seed)))
        return (
            onnx_client.chat.completions.create(
                model=ONNX_MODEL,
                messages=image_message(image, "Describe it. " * seed),
                max_tokens=48,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            .choices[0]
            .message.content
        )

    alone = [ask(seed) for seed in range(1, 5)]
    before = _batched_steps(onnx_server)
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(ask, range(1, 5)))
    assert together == alone
    assert _batched_steps(onnx_server) - before >= 10


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"logprobs": True}, "logprobs"),
        ({"n": 2}, "n"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_what_the_onnx_runtime_does_not_serve_is_a_400_naming_it(onnx_server, extra, param):
    import httpx

    body = {"model": ONNX_MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}
    response = httpx.post(f"{onnx_server.base_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    assert response.json()["error"]["code"] == "unsupported_parameter"
