"""HttpBackend: a fallback tier in another pod, reached over HTTP (bench.fake_server stands in)."""

from __future__ import annotations

import asyncio
import sys

import pytest

from bench.launch import ServerProcess, free_port
from engine.config import AppConfig
from engine.errors import EngineError, RequestError
from engine.protocol import ChatCompletionRequest
from engine.remote import HttpBackend


@pytest.fixture(scope="module")
def tier(tmp_path_factory):
    """Every 3rd request is refused with 429, as a saturated strict tier would."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "bench.fake_server",
        "--port",
        str(port),
        "--served-models",
        "small-vl",
        "--error-every",
        "3",
    ]
    log = tmp_path_factory.mktemp("tier") / "tier.log"
    with ServerProcess(command, f"http://127.0.0.1:{port}", log, timeout_s=30) as server:
        yield server


def _request(max_tokens: int) -> ChatCompletionRequest:
    return ChatCompletionRequest(
        model="big-vl", max_tokens=max_tokens, messages=[{"role": "user", "content": "hi"}]
    )


async def _serve(model: HttpBackend, max_tokens: int) -> tuple[str, int, int, list[str | None]]:
    prepared = await model.prepare("req-1", _request(max_tokens), None)
    # the tier got this tier's request id (it echoes what it received)
    assert prepared.handle.headers.get_list("x-request-id") == ["req-1"]
    text, tokens, prompt, reasons = "", 0, 0, []
    async for delta in model.generate(prepared):
        text += delta.text
        tokens += delta.num_tokens
        prompt = delta.prompt_tokens or prompt
        reasons.append(delta.finish_reason)
    return text, tokens, prompt, reasons


def test_forwarded_request_streams_back_with_exact_usage_and_strict_refusals_stay_4xx(tier):
    async def go():
        model = HttpBackend("small-vl", tier.base_url)
        try:
            first = await _serve(model, 5)  # request 1
            second = await _serve(model, 2)  # request 2
            with pytest.raises(RequestError) as refused:  # request 3: the tier says 429
                await _serve(model, 2)
            return first, second, refused.value
        finally:
            await model.aclose()

    first, second, refused = asyncio.run(go())
    assert first == ("tok" * 5, 5, 100, [None, None, None, None, "length"])
    assert second[:3] == ("tok" * 2, 2, 100)
    assert refused.status_code == 429 and "request 3 refused" in refused.message


def test_unreachable_tier_is_a_503_not_a_hang():
    async def go():
        model = HttpBackend("small-vl", f"http://127.0.0.1:{free_port()}")
        try:
            await model.prepare("req-1", _request(2), None)
        finally:
            await model.aclose()

    with pytest.raises(EngineError) as failed:
        asyncio.run(go())
    assert failed.value.status_code == 503 and failed.value.code == "fallback_unreachable"


def test_profile_takes_a_url_fallback_but_not_a_url_primary():
    models = [
        {"name": "big", "model": "generated:tiny"},
        {"name": "small", "url": "http://qwen3vl-fallback:8000"},
    ]
    config = AppConfig.model_validate({"models": models})
    assert [m.url for m in config.fallbacks] == ["http://qwen3vl-fallback:8000"]
    with pytest.raises(ValueError, match="primary"):
        AppConfig.model_validate({"models": models[::-1]})
    with pytest.raises(ValueError, match="exactly one"):
        AppConfig.model_validate({"models": [{"name": "x", "model": "m", "url": "http://h"}]})
