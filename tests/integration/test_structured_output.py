"""Structured output, log-probabilities, n choices and tool calls on the live stack (Ray
Serve + vLLM's structured-outputs backend + the tiny Qwen3-VL, random weights), through the
official openai SDK. With untrained weights the text means nothing; what is checked is that
the output obeys the constraint (it parses and validates), the shapes are OpenAI's, and the
server stays up after a bad constraint."""

from __future__ import annotations

import json
import threading

import httpx
import jsonschema
import pytest

from fixtures.schemas import PRODUCT_TAGS, PRODUCT_TAGS_ZH
from tests.conftest import FALLBACK, MODEL, PRIMARY_SEQS
from tests.utils import data_url, encode, image_message, noise_image

pytestmark = pytest.mark.slow
IMAGE = data_url(encode(noise_image(128, 128, seed=21)))
MAX_TOKENS = 400

PRODUCT_SCHEMA, PRODUCT_SCHEMA_ZH = PRODUCT_TAGS, PRODUCT_TAGS_ZH
PROMPTS = {
    "en": ("Tag this product: category, colours, material, attributes.", PRODUCT_SCHEMA),
    "zh": ("请给这个商品打标签：类别、颜色、材质、属性。", PRODUCT_SCHEMA_ZH),
}
TAG_TOOL = {
    "type": "function",
    "function": {
        "name": "tag_product",
        "description": "Record the tags of a product photo.",
        "parameters": PRODUCT_SCHEMA,
    },
}
ESCALATE_TOOL = {
    "type": "function",
    "function": {
        "name": "escalate",
        "description": "Hand the ticket to a person.",
        "parameters": {
            "type": "object",
            "properties": {"reason": {"enum": ["damaged", "late", "wrong_item"]}},
            "required": ["reason"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [TAG_TOOL, ESCALATE_TOOL]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "product_tags", "schema": schema}}


def _stream(client, **kwargs) -> list:
    return list(client.chat.completions.create(stream=True, **kwargs))


@pytest.mark.parametrize("stream", [False, True], ids=["completion", "stream"])
@pytest.mark.parametrize("lang", ["en", "zh"])
@pytest.mark.parametrize("seed", [1, 2])
def test_product_tags_from_an_image_follow_the_json_schema(client, stream, lang, seed):
    prompt, schema = PROMPTS[lang]
    kwargs = dict(
        model=MODEL,
        messages=image_message(IMAGE, prompt),
        max_tokens=MAX_TOKENS,
        temperature=1.0,
        seed=seed,
        response_format=_schema_format(schema),
    )
    if stream:
        chunks = _stream(client, stream_options={"include_usage": True}, **kwargs)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        tokens = chunks[-1].usage.completion_tokens
    else:
        answer = client.chat.completions.create(**kwargs)
        text, finish = answer.choices[0].message.content, answer.choices[0].finish_reason
        tokens = answer.usage.completion_tokens
    tags = json.loads(text)  # complete JSON, not cut off at max_tokens
    jsonschema.validate(tags, schema)
    assert finish == "stop" and tokens < MAX_TOKENS // 2, (finish, tokens, text)
    assert "\n" not in text and "  " not in text  # the compact grammar: no free whitespace


def test_json_object_is_one_json_object(client):
    answer = client.chat.completions.create(
        model=MODEL,
        messages=image_message(IMAGE, "Describe the product as JSON."),
        max_tokens=MAX_TOKENS,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert answer.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


@pytest.mark.parametrize(
    "constraint, check",
    [
        ({"choice": ["in_stock", "sold_out"]}, lambda text: text in ("in_stock", "sold_out")),
        ({"regex": "SKU-[0-9]{6}"}, lambda text: text.startswith("SKU-") and text[4:].isdigit()),
    ],
    ids=["choice", "regex"],
)
def test_vllm_structured_outputs_choice_and_regex(client, constraint, check):
    answer = client.chat.completions.create(
        model=MODEL,
        messages=image_message(IMAGE, "Which SKU is this?"),
        max_tokens=32,
        extra_body={"structured_outputs": constraint},
    )
    text = answer.choices[0].message.content
    assert check(text) and len(text) in (8, 10), text


@pytest.mark.parametrize(
    "extra, param",
    [
        (
            {"response_format": _schema_format({"type": "objekt"})},
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"structured_outputs": {"regex": "SKU-(["}}, "structured_outputs.regex"),
        ({"structured_outputs": {"choice": ["a"], "regex": "a"}}, "structured_outputs"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice.function.name",
        ),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"n": 9}, "n"),
    ],
)
def test_a_bad_constraint_is_a_400_naming_its_field_and_the_server_keeps_serving(
    server, client, extra, param
):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    ok = client.chat.completions.create(model=MODEL, messages=body["messages"], max_tokens=2)
    assert ok.choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True], ids=["completion", "stream"])
def test_logprobs_come_per_token_with_the_top_alternatives(client, stream):
    kwargs = dict(
        model=MODEL,
        messages=image_message(IMAGE),
        max_tokens=6,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    if stream:
        entries = [
            entry
            for c in _stream(client, **kwargs)
            if c.choices and c.choices[0].logprobs
            for entry in c.choices[0].logprobs.content
        ]
    else:
        entries = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    assert len(entries) == 6
    for entry in entries:
        assert entry.logprob <= 0 and isinstance(entry.token, str)
        assert len(entry.top_logprobs) == 3
        assert all(alt.logprob <= 0 for alt in entry.top_logprobs)
        ranked = [alt.logprob for alt in entry.top_logprobs]
        assert ranked == sorted(ranked, reverse=True)
        assert entry.logprob <= ranked[0] + 1e-6  # nothing beats the most likely token


@pytest.mark.parametrize("stream", [False, True], ids=["completion", "stream"])
def test_n_choices_each_indexed_and_counted(client, stream):
    kwargs = dict(
        model=MODEL,
        messages=image_message(IMAGE),
        max_tokens=5,
        n=3,
        temperature=1.0,
        extra_body={"ignore_eos": True},
    )
    if stream:
        chunks = _stream(client, stream_options={"include_usage": True}, **kwargs)
        texts: dict[int, str] = {}
        finish: dict[int, str] = {}
        for chunk in chunks:
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
                if choice.finish_reason:
                    finish[choice.index] = choice.finish_reason
        usage = chunks[-1].usage
    else:
        answer = client.chat.completions.create(**kwargs)
        texts = {c.index: c.message.content for c in answer.choices}
        finish = {c.index: c.finish_reason for c in answer.choices}
        usage = answer.usage
    assert sorted(texts) == [0, 1, 2] and finish == {0: "length", 1: "length", 2: "length"}
    assert usage.completion_tokens == 15


def _tool_calls_of(client, stream: bool, **kwargs) -> tuple[list[dict], str, str | None]:
    """(calls as {id, name, arguments}, finish_reason, content) of one tool-call request."""
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        calls = [
            {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
            for c in choice.message.tool_calls or ()
        ]
        return calls, choice.finish_reason, choice.message.content
    calls: dict[int, dict] = {}
    finish, content = None, ""
    for chunk in _stream(client, **kwargs):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        finish = choice.finish_reason or finish
        for part in choice.delta.tool_calls or ():
            call = calls.setdefault(part.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = part.id or call["id"]
            if part.function:
                call["name"] += part.function.name or ""
                call["arguments"] += part.function.arguments or ""
    return [calls[i] for i in sorted(calls)], finish, content or None


@pytest.mark.parametrize("stream", [False, True], ids=["completion", "stream"])
def test_a_forced_function_call_has_arguments_that_validate(client, stream):
    calls, finish, content = _tool_calls_of(
        client,
        stream,
        model=MODEL,
        messages=image_message(IMAGE, "Tag this product."),
        max_tokens=MAX_TOKENS,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "tag_product"}},
    )
    (call,) = calls
    assert call["name"] == "tag_product" and call["id"].startswith("call_")
    jsonschema.validate(json.loads(call["arguments"]), PRODUCT_SCHEMA)
    assert finish == "stop" and content is None  # a forced function ends "stop", as OpenAI


@pytest.mark.parametrize("stream", [False, True], ids=["completion", "stream"])
def test_required_tool_calls_name_given_functions_with_valid_arguments(client, stream):
    calls, finish, _ = _tool_calls_of(
        client,
        stream,
        model=MODEL,
        messages=image_message(IMAGE, "The parcel arrived damaged."),
        max_tokens=MAX_TOKENS,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        seed=4,
    )
    (call,) = calls  # parallel_tool_calls: false
    jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
    assert finish == "tool_calls"


def test_a_conversation_with_tool_calls_and_tool_results_continues(client):
    arguments = json.dumps({"reason": "damaged"})
    messages = [
        *image_message(IMAGE, "The parcel arrived damaged."),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "escalate", "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "ticket 4711 opened"},
    ]
    plain = client.chat.completions.create(model=MODEL, messages=messages[:1], max_tokens=2)
    answer = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4, tools=TOOLS, extra_body={"ignore_eos": True}
    )
    assert answer.choices[0].finish_reason == "length"
    # the tool signatures, the call and its result are all in the prompt
    assert answer.usage.prompt_tokens > plain.usage.prompt_tokens + 200


def test_a_request_that_falls_back_gets_its_schema_enforced_there(server, client):
    """The primary saturates at PRIMARY_SEQS in flight: hold it there with long streams, and
    the structured request is served by the fallback tier (a Ray Serve deployment)."""
    stop = threading.Event()
    started = threading.Barrier(PRIMARY_SEQS + 1, timeout=120)

    def hold() -> None:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hold"}],
            "max_tokens": 6000,
            "ignore_eos": True,
            "stream": True,
            "allow_fallback": False,
        }
        with httpx.stream(
            "POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=120
        ) as response:
            first = True
            for _ in response.iter_lines():
                if first:
                    started.wait()
                    first = False
                if stop.is_set():
                    break

    holders = [threading.Thread(target=hold) for _ in range(PRIMARY_SEQS)]
    for thread in holders:
        thread.start()
    try:
        started.wait()
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=image_message(IMAGE, PROMPTS["en"][0]),
            max_tokens=MAX_TOKENS,
            response_format=_schema_format(PRODUCT_SCHEMA),
        )
    finally:
        stop.set()
        for thread in holders:
            thread.join(60)
    assert raw.headers["x-served-model"] == FALLBACK
    answer = raw.parse()
    assert answer.model == FALLBACK and answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].message.content), PRODUCT_SCHEMA)
