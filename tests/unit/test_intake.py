"""Request intake: every malformed or oversized body is a named 4xx before any work."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config import RequestLimits
from engine.errors import RequestError
from engine.intake import check_body_size, parse_request

USER = [{"role": "user", "content": "hi"}]


def _body(**fields) -> bytes:
    return json.dumps({"model": "m", "messages": USER, **fields}).encode()


def _refused(body: bytes, limits: RequestLimits | None = None) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_request(body, limits)
    return info.value


@pytest.mark.parametrize(
    "body, words",
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (_body()[:-1] + b', "ignored": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
        (_body()[:-1] + b', "max_tokens": 1' + b"0" * 5000 + b"}", "not valid JSON"),
        (_body()[:-1] + b', "temperature": NaN}', "not valid JSON"),
        (b'{"model": "m", "messages": [}', "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
    ],
    ids=["deep", "deep-in-ignored-field", "int-digits", "nan", "syntax", "not-utf8"],
)
def test_json_that_python_cannot_or_should_not_parse_is_a_400(body, words):
    error = _refused(body)
    assert error.status_code == 400 and error.code == "invalid_json" and words in error.message


@pytest.mark.parametrize(
    "body, param",
    [
        (_body(stop="\\ud800").replace(b"\\\\ud800", b"\\ud800"), "stop"),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "a\\udc00b"}]}',
            "messages.0.content",
        ),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_its_field(body, param):
    error = _refused(body)
    assert error.param == param and "surrogate" in error.message


def test_a_surrogate_pair_is_an_emoji_not_an_error():
    request = parse_request(
        b'{"model": "m", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}'
    )
    assert request.messages[0].content == "\U0001f600"


@pytest.mark.parametrize(
    "field, value",
    [
        ("seed", 2**64),
        ("seed", -(2**63) - 1),
        ("top_k", 2**64),
        ("stop", "x" * 513),
        ("stop", ["a"] * 9),
        ("max_tokens", 0),
        ("n", 9),  # the default limits.max_n is 8
        ("top_logprobs", 21),
    ],
)
def test_values_the_engine_would_choke_on_are_refused_here(field, value):
    error = _refused(_body(**{field: value}))
    assert error.status_code == 400 and error.param == field


def test_int64_seed_and_int32_top_k_pass():
    request = parse_request(_body(seed=2**63 - 1, top_k=2**31 - 1))
    assert request.seed == 2**63 - 1


def test_body_over_the_cap_is_a_413_before_and_after_reading():
    limits = RequestLimits(max_body_bytes=1000)
    with pytest.raises(RequestError) as info:
        check_body_size({"content-length": "1001"}, limits)
    assert info.value.status_code == 413 and info.value.code == "request_too_large"
    check_body_size({"content-length": "1000"}, limits)  # at the cap: fine
    error = _refused(_body(pad="x" * 1000), limits)  # chunked: no content-length
    assert error.status_code == 413


@pytest.mark.parametrize(
    "messages, limits, code",
    [
        (USER * 4, RequestLimits(max_messages=3), "too_many_messages"),
        (
            [{"role": "user", "content": [{"type": "text", "text": "a"}] * 4}],
            RequestLimits(max_content_parts=3),
            "too_many_content_parts",
        ),
        (
            [
                {"role": "user", "content": "abc"},
                {"role": "user", "content": [{"type": "text", "text": "d"}]},
            ],
            RequestLimits(max_text_chars=3),
            "text_too_long",
        ),
    ],
)
def test_request_shape_limits(messages, limits, code):
    error = _refused(json.dumps({"model": "m", "messages": messages}).encode(), limits)
    assert error.status_code == 400 and error.code == code and error.param == "messages"


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "m", "messages": [{"role": "user", "content": "x\xed\xa0\x80"}]}',
        '{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'.encode("utf-16"),
    ],
    ids=["encoded-surrogate", "utf-16"],
)
def test_bodies_that_are_not_strict_utf8_are_a_400(body):
    error = _refused(body)
    assert error.code == "invalid_json" and "UTF-8" in error.message


# A value that asks for each field's feature (a neutral value is accepted instead).
_ASKING = {
    "functions": [{"name": "tag_product", "parameters": {}}],
    "function_call": "auto",
    "modalities": ["text", "audio"],
    "service_tier": "priority",
    "audio": {"voice": "alloy", "format": "mp3"},
    "prediction": {"type": "content", "content": "x"},
    "web_search_options": {},
    "reasoning_effort": "high",
    "verbosity": "low",
    "moderation": {"mode": "block"},
    "prompt_cache_options": {},
    "prompt_cache_retention": "24h",
}


def _with(**fields) -> bytes:
    return json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], **fields}
    ).encode()


def test_every_openai_request_field_is_honoured_metadata_or_a_400_naming_it():
    """Walks the official SDK's request fields: a field a new SDK adds fails here until it is
    honoured, listed as metadata, or refused by name."""
    import typing

    from openai.types.chat.completion_create_params import CompletionCreateParamsBase

    from engine.protocol import METADATA_ONLY, NOT_SERVED, ChatCompletionRequest

    honoured = set(ChatCompletionRequest.model_fields)
    for name in typing.get_type_hints(CompletionCreateParamsBase):
        assert name in honoured | METADATA_ONLY | NOT_SERVED.keys(), f"unclassified field {name!r}"
    assert set(_ASKING) == set(NOT_SERVED)
    for name, value in _ASKING.items():
        with pytest.raises(RequestError) as info:
            parse_request(_with(**{name: value}))
        assert info.value.code == "unsupported_parameter" and info.value.param == name
        assert name in info.value.message
        for neutral in NOT_SERVED[name]:
            parse_request(_with(**{name: neutral}))
    for name in METADATA_ONLY:
        parse_request(_with(**{name: "x"}))


@pytest.mark.parametrize("name", ["guided_json", "best_of", "use_beam_search", "temprature"])
def test_fields_nobody_defined_here_are_a_400_naming_them(name):
    with pytest.raises(RequestError) as info:
        parse_request(_with(**{name: 1}))
    assert info.value.code == "unsupported_parameter" and info.value.param == name


def _stdlib_parse(body: bytes):
    return json.loads(body.decode("utf-8"))


_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)  # past 64 bits: the stdlib's answer
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(extra=_JSON_VALUES, text=st.text())
def test_the_fast_parser_reads_every_body_as_the_stdlib_does(extra, text):
    """msgspec parses bodies on the hot path; what it yields, and what it falls back on, is
    the stdlib's reading of the same bytes, so no request means something else here."""
    body = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": text}], "metadata": extra},
        ensure_ascii=False,
    ).encode()
    from engine import intake

    try:
        fast = intake._JSON.decode(body)
    except Exception:  # noqa: BLE001 - refused: the stdlib path answers instead
        fast = intake._parse_slowly(body)
    assert fast == _stdlib_parse(body)
    assert parse_request(body).messages[0].content == text


def test_numbers_only_the_stdlib_reads_get_the_stdlib_answer():
    # msgspec refuses 1e400 and integers of 100 digits; the stdlib reads them (inf, an int),
    # so the answer is the field's own range error, not "invalid JSON"
    error = _refused(_body()[:-1] + b', "temperature": 1e400}')
    assert error.param == "temperature" and error.code != "invalid_json"
    error = _refused(_body()[:-1] + b', "seed": 1' + b"0" * 100 + b"}")
    assert error.param == "seed" and error.code != "invalid_json"
