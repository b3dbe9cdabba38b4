"""The chat service with fake backends: both response shapes, deadlines, disconnects,
fallback, 429 and metrics, in seconds, with no Ray and no vLLM (the live tests in
tests/integration prove the same path end to end)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from prometheus_client import REGISTRY

from engine.backend import Backend, GenerationDelta, Prepared
from engine.config import AppConfig
from engine.errors import EngineError, RequestError
from engine.protocol import ChatCompletionRequest
from engine.service import Call, ChatService, ClientGone
from tests.utils import data_url, encode, noise_image, two_tier_config


class FakeBackend:
    """Tokens "t0 t1 ..." at ``step_s`` apart; records what the service asked of it."""

    kv_cache_usage = None

    def __init__(self, name: str, tokens: int = 4, step_s: float = 0.0, uses_conversation=True):
        self.name = name
        self.tokens = tokens
        self.step_s = step_s
        self.uses_conversation = uses_conversation
        self.prepare_delay_s = 0.0
        self.fail_prepare: Exception | None = None
        self.fail_after: tuple[int, BaseException] | None = None  # (tokens, error)
        self.conversations: list[Any] = []
        self.aborted: list[str] = []
        self.generating = 0  # generate() calls under way right now
        self.healthy = True

    async def prepare(self, request_id: str, request, conversation) -> Prepared[dict]:
        self.conversations.append(conversation)
        await asyncio.sleep(self.prepare_delay_s)
        if self.fail_prepare is not None:
            raise self.fail_prepare
        return Prepared(request_id, 7, {"finished": False})

    async def generate(self, prepared: Prepared[dict]):
        self.generating += 1
        try:
            for i in range(self.tokens):
                if self.fail_after is not None and i == self.fail_after[0]:
                    raise self.fail_after[1]
                await asyncio.sleep(self.step_s)
                last = i == self.tokens - 1
                yield GenerationDelta(f"t{i} ", 1, "length" if last else None, 7)
            prepared.handle["finished"] = True
        finally:
            self.generating -= 1
            if not prepared.handle["finished"]:
                self.aborted.append(prepared.request_id)

    async def abort(self, prepared: Prepared[dict]) -> None:
        if not prepared.handle["finished"] and prepared.request_id not in self.aborted:
            self.aborted.append(prepared.request_id)

    async def check_health(self) -> None:
        if not self.healthy:
            raise RuntimeError("engine core died")

    async def metrics_text(self) -> bytes | None:
        return None

    async def aclose(self) -> None:
        pass


def _config() -> AppConfig:
    return two_tier_config((1, 1), (0, 0), admission={"retry_after_s": 2})


def _service(**backends: FakeBackend) -> ChatService:
    backends = backends or {"big": FakeBackend("big"), "small": FakeBackend("small")}
    return ChatService(_config(), backends)


def _call(timeout_s: float = 30, allow_fallback: bool = True, **body) -> Call:
    body = {"model": "big", "messages": [{"role": "user", "content": "hi"}], **body}
    now = time.perf_counter()
    return Call(
        ChatCompletionRequest.model_validate(body),
        f"req-{id(body)}",
        now,
        now + timeout_s,
        allow_fallback,
    )


def _count(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _requests(served: str, status: str, requested: str = "big") -> float:
    return _count(
        "qwen3vl_requests_total", requested_model=requested, served_model=served, status=status
    )


async def _events(service: ChatService, call: Call) -> list[dict | str]:
    source = await service.stream(call)
    try:
        lines = [line async for line in source.events]
    finally:
        await source.aclose()
    return [line if line == "data: [DONE]\n\n" else json.loads(line[6:]) for line in lines]


def test_fake_backend_keeps_the_declared_contract():
    assert isinstance(FakeBackend("m"), Backend)


def test_a_completion_is_one_body_counted_once_and_released():
    service = _service()
    before = _requests("big", "200")
    answer = asyncio.run(service.complete(_call()))
    assert answer.accepted.model == "big"
    assert answer.body["choices"][0]["message"]["content"] == "t0 t1 t2 t3 "
    assert answer.body["choices"][0]["finish_reason"] == "length"
    assert answer.body["usage"] == {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}
    assert _requests("big", "200") == before + 1
    assert service.in_flight() == 0


def test_a_stream_carries_one_event_per_delta_then_usage_and_done():
    service = _service()
    events = asyncio.run(
        _events(service, _call(stream=True, stream_options={"include_usage": True}))
    )
    chunks, usage, done = events[:-2], events[-2], events[-1]
    assert [c["choices"][0]["delta"].get("content") for c in chunks] == ["t0 ", "t1 ", "t2 ", "t3 "]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage["usage"]["completion_tokens"] == 4 and done == "data: [DONE]\n\n"
    assert service.in_flight() == 0


def test_a_stream_the_client_leaves_aborts_the_backend_request_and_counts_499():
    big = FakeBackend("big", tokens=1000, step_s=0.001)
    service = _service(big=big, small=FakeBackend("small"))
    before = _requests("big", "499")

    async def leave_after_three() -> None:
        source = await service.stream(_call(stream=True))
        seen = 0
        async for _ in source.events:
            seen += 1
            if seen == 3:
                break
        await source.events.aclose()  # what the HTTP layer does when the client is gone
        await source.aclose()

    asyncio.run(leave_after_three())
    assert len(big.aborted) == 1 and big.generating == 0
    assert _requests("big", "499") == before + 1 and service.in_flight() == 0


def test_a_stream_closed_before_it_started_still_releases():
    big = FakeBackend("big")
    service = _service(big=big, small=FakeBackend("small"))

    async def never_read() -> None:
        source = await service.stream(_call(stream=True))
        await source.aclose()

    asyncio.run(never_read())
    assert big.aborted and service.in_flight() == 0


def test_past_the_deadline_a_completion_is_a_504_and_the_backend_request_is_aborted():
    big = FakeBackend("big", tokens=1000, step_s=0.01)
    service = _service(big=big, small=FakeBackend("small"))
    rejected = _count("qwen3vl_rejections_total", requested_model="big", reason="deadline_exceeded")
    with pytest.raises(EngineError) as info:
        asyncio.run(service.complete(_call(timeout_s=0.2)))
    assert info.value.status_code == 504 and info.value.code == "deadline_exceeded"
    assert len(big.aborted) == 1 and big.generating == 0 and service.in_flight() == 0
    assert (
        _count("qwen3vl_rejections_total", requested_model="big", reason="deadline_exceeded")
        == rejected + 1
    )


def test_past_the_deadline_a_stream_ends_with_a_deadline_event_and_done():
    big = FakeBackend("big", tokens=1000, step_s=0.01)
    service = _service(big=big, small=FakeBackend("small"))
    events = asyncio.run(_events(service, _call(timeout_s=0.2, stream=True)))
    assert 1 < len(events) < 1000
    assert events[-2]["error"]["code"] == "deadline_exceeded" and events[-1] == "data: [DONE]\n\n"
    assert big.aborted and service.in_flight() == 0


def test_a_deadline_that_passes_while_preparing_is_a_504():
    big = FakeBackend("big")
    big.prepare_delay_s = 5
    service = _service(big=big, small=FakeBackend("small"))
    started = time.perf_counter()
    with pytest.raises(EngineError) as info:
        asyncio.run(service.complete(_call(timeout_s=0.1)))
    assert info.value.code == "deadline_exceeded" and time.perf_counter() - started < 2
    assert service.in_flight() == 0


def test_a_timeout_inside_the_backend_is_a_500_not_a_deadline():
    big = FakeBackend("big")
    big.fail_after = (2, TimeoutError("socket read timed out"))
    service = _service(big=big, small=FakeBackend("small"))
    with pytest.raises(TimeoutError):
        asyncio.run(service.complete(_call()))
    events = asyncio.run(_events(service, _call(stream=True)))
    assert events[-2]["error"]["code"] == "internal" and service.in_flight() == 0


def test_an_unexpected_failure_mid_stream_ends_with_an_error_event_without_internals():
    big = FakeBackend("big")
    big.fail_after = (1, RuntimeError("secret internal detail"))
    service = _service(big=big, small=FakeBackend("small"))
    before = _requests("big", "500")
    events = asyncio.run(_events(service, _call(stream=True)))
    assert events[0]["choices"][0]["delta"]["content"] == "t0 "
    assert events[-2]["error"]["code"] == "internal" and "secret" not in json.dumps(events[-2])
    assert events[-1] == "data: [DONE]\n\n"
    assert _requests("big", "500") == before + 1 and service.in_flight() == 0


def test_a_client_that_disconnects_cancels_a_completion_and_aborts_it():
    big = FakeBackend("big", tokens=1000, step_s=0.01)
    service = _service(big=big, small=FakeBackend("small"))
    before = _requests("big", "499")

    async def disconnect_soon() -> None:
        await service.complete(_call(), disconnected=asyncio.sleep(0.1))

    with pytest.raises(ClientGone):
        asyncio.run(disconnect_soon())
    assert big.aborted and big.generating == 0
    assert _requests("big", "499") == before + 1 and service.in_flight() == 0


def test_a_saturated_primary_falls_back_and_strict_requests_get_429():
    big, small = FakeBackend("big", tokens=50, step_s=0.01), FakeBackend("small")
    service = _service(big=big, small=small)
    fell_back = _count("qwen3vl_fallbacks_total", requested_model="big", served_model="small")

    async def scenario():
        first = asyncio.ensure_future(service.complete(_call()))
        await asyncio.sleep(0.05)  # big's only slot is taken
        second = await service.complete(_call())
        with pytest.raises(RequestError) as strict:
            await service.complete(_call(allow_fallback=False))
        return (await first).accepted.model, second.accepted.model, strict.value

    first, second, strict = asyncio.run(scenario())
    assert (first, second) == ("big", "small")
    assert (
        _count("qwen3vl_fallbacks_total", requested_model="big", served_model="small")
        == fell_back + 1
    )
    assert strict.status_code == 429 and strict.code == "saturated_strict"
    assert strict.headers == {"Retry-After": "2"}
    assert service.in_flight() == 0


def test_when_every_tier_is_full_the_answer_is_429_queue_full_counted_without_a_server():
    big, small = FakeBackend("big", tokens=50, step_s=0.01), FakeBackend("small", 50, 0.01)
    service = _service(big=big, small=small)
    before = _requests("", "429")

    async def scenario():
        running = [asyncio.ensure_future(service.complete(_call())) for _ in range(2)]
        await asyncio.sleep(0.05)
        try:
            await service.stream(_call(stream=True))
        finally:
            await asyncio.gather(*running)

    with pytest.raises(RequestError) as info:
        asyncio.run(scenario())
    assert info.value.status_code == 429 and info.value.code == "queue_full"
    assert _requests("", "429") == before + 1 and service.in_flight() == 0


def test_a_4xx_from_prepare_is_raised_before_any_output_and_counted():
    big = FakeBackend("big")
    big.fail_prepare = RequestError("prompt too long", code="context_length_exceeded")
    service = _service(big=big, small=FakeBackend("small"))
    before = _requests("big", "400")
    with pytest.raises(RequestError):
        asyncio.run(service.stream(_call(stream=True)))
    assert _requests("big", "400") == before + 1 and service.in_flight() == 0


def test_images_are_decoded_only_for_backends_that_read_them():
    image = data_url(encode(noise_image(32, 32, seed=1)))
    content = [
        {"type": "text", "text": "what is it?"},
        {"type": "image_url", "image_url": {"url": image}},
    ]
    messages = [{"role": "user", "content": content}]
    reads, forwards = FakeBackend("big"), FakeBackend("big", uses_conversation=False)
    for backend in (reads, forwards):
        service = _service(big=backend, small=FakeBackend("small"))
        asyncio.run(service.complete(_call(messages=messages)))
    (conversation,) = reads.conversations
    assert conversation[0]["content"][1]["type"] == "image_pil"
    assert forwards.conversations == [None]


class _CountingDecoder:
    """Stands in for the decode pool: runs the work at once and counts it."""

    def __init__(self) -> None:
        self.runs = 0

    async def run(self, fn, *args, small: bool = False):
        self.runs += 1
        return fn(*args)


def test_a_request_alone_on_the_replica_decodes_its_small_image_without_a_thread_hop():
    """A 336 px JPEG of noise (over the inline byte cap) goes to the decode threads while
    another request streams, and decodes on the loop when nothing else is in flight."""
    image = data_url(encode(noise_image(336, 336, seed=1), "JPEG"), "image/jpeg")
    content = [
        {"type": "text", "text": "what?"},
        {"type": "image_url", "image_url": {"url": image}},
    ]
    messages = [{"role": "user", "content": content}]
    service = _service(big=FakeBackend("big", tokens=3), small=FakeBackend("small"))
    decoder = _CountingDecoder()
    service.decoder = decoder

    async def main() -> list[int]:
        runs = []
        await service.complete(_call(messages=messages))  # alone
        runs.append(decoder.runs)
        source = await service.stream(_call())  # admitted, its stream open
        try:
            await service.complete(_call(messages=messages))
        finally:
            await source.aclose()
        runs.append(decoder.runs)
        await service.complete(_call(messages=messages))  # alone again
        runs.append(decoder.runs)
        return runs

    assert asyncio.run(main()) == [0, 1, 1]


def test_health_names_the_backend_that_cannot_serve():
    small = FakeBackend("small")
    small.healthy = False
    service = _service(big=FakeBackend("big"), small=small)
    with pytest.raises(EngineError) as info:
        asyncio.run(service.check_health())
    assert info.value.status_code == 503 and "small" in info.value.message


def test_metrics_merge_what_backends_keep_elsewhere():
    class Elsewhere(FakeBackend):
        async def metrics_text(self) -> bytes:
            return b"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 3.0\n"

    service = _service(big=FakeBackend("big"), small=Elsewhere("small"))
    text = asyncio.run(service.metrics_text()).decode()
    assert "vllm:num_requests_running 3.0" in text and "qwen3vl_requests_total" in text
