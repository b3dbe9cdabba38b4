"""Backends for fallback models: through a Ray Serve handle, or over HTTP.

The primary model's engine lives in the ingress replica (no hop per token). Fallback tiers
run as their own deployments (``ModelServer``) so each scales on its own; the ingress talks
to them through ``RayBackend``. Only overflow traffic pays the extra hop.

Where tiers are separate Kubernetes Deployments (one Ray instance per pod), a fallback with
``url`` is another server of this project, reached by ``HttpBackend``: the request forwarded
as sent (its images are not decoded here), strict (``allow_fallback: false``, so it never
cascades) and streaming.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import httpx
from ray import serve

from engine.backend import Accepted, GenerationDelta, Prepared, engine_backend
from engine.config import ModelConfig
from engine.errors import EngineError, RequestError
from engine.protocol import ChatCompletionRequest

logger = logging.getLogger("ray.serve")


@serve.deployment
class ModelServer:
    """Ray Serve replica holding one fallback model's engine (vLLM or ONNX Runtime)."""

    def __init__(self, config: ModelConfig) -> None:
        self.engine = engine_backend(config)

    async def generate(
        self, request_id: str, request: ChatCompletionRequest, conversation: list[dict[str, Any]]
    ) -> AsyncIterator[Accepted | GenerationDelta]:
        """First ``Accepted`` (rendered and valid), then deltas; a 4xx raises before it."""
        prepared = await self.engine.prepare(request_id, request, conversation)
        yield Accepted(self.engine.name, prepared.prompt_tokens)
        async with aclosing(self.engine.generate(prepared)) as deltas:
            async for delta in deltas:
                yield delta

    async def metrics_text(self) -> bytes:
        from engine.metrics import exposition

        return exposition()[0]

    async def check_health(self) -> None:
        await self.engine.check_health()


class RayBackend:
    """The ingress side of a ``ModelServer`` deployment; its handle is the response stream."""

    uses_conversation = True  # the deployment renders it: images travel decoded
    kv_cache_usage = None  # in the fallback's process

    def __init__(self, name: str, handle: Any) -> None:
        self.name = name
        self._handle = handle

    async def prepare(
        self, request_id: str, request: ChatCompletionRequest, conversation: list[dict[str, Any]]
    ) -> Prepared[Any]:
        stream = self._handle.options(stream=True).generate.remote(
            request_id, request, conversation
        )
        try:
            accepted: Accepted = await stream.__anext__()
        except RequestError as exc:  # Ray re-raises the replica's exception as a subclass
            stream.cancel()
            raise RequestError(
                exc.message, status_code=exc.status_code, code=exc.code, param=exc.param
            ) from None
        except BaseException:  # deadline or disconnect while the fallback renders
            stream.cancel()
            raise
        return Prepared(request_id, accepted.prompt_tokens, stream)

    async def generate(self, prepared: Prepared[Any]) -> AsyncIterator[GenerationDelta]:
        finished = False
        try:
            async for delta in prepared.handle:
                yield delta
            finished = True
        finally:
            if not finished:
                prepared.handle.cancel()  # aborts the request in the fallback's engine

    async def abort(self, prepared: Prepared[Any]) -> None:
        prepared.handle.cancel()  # a no-op for a finished stream

    async def check_health(self) -> None:
        await self._handle.check_health.remote()

    async def metrics_text(self) -> bytes:
        return await self._handle.metrics_text.remote()

    async def aclose(self) -> None:
        pass  # Ray Serve owns the deployment


class HttpBackend:
    """A fallback tier behind a URL (e.g. ``http://qwen3vl-fallback:8000``); its handle is
    the open streaming response."""

    uses_conversation = False  # forwarded as sent; the other tier decodes the images
    kv_cache_usage = None

    def __init__(self, name: str, url: str) -> None:
        self.name = name
        self.url = url.rstrip("/")
        # No read timeout: the ingress enforces each request's deadline.
        self._client = httpx.AsyncClient(
            base_url=self.url,
            timeout=httpx.Timeout(10.0, read=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )

    async def prepare(
        self, request_id: str, request: ChatCompletionRequest, conversation: None = None
    ) -> Prepared[httpx.Response]:
        """Send the request; returns once the other tier accepted it (200 and headers)."""
        body = request.model_dump(mode="json", exclude_none=True, by_alias=True)
        body |= {
            "model": self.name,
            "stream": True,
            "stream_options": {"include_usage": True},
            "allow_fallback": False,
        }
        outgoing = self._client.build_request(
            "POST", "/v1/chat/completions", json=body, headers={"x-request-id": request_id}
        )
        try:
            response = await self._client.send(outgoing, stream=True)
        except httpx.HTTPError as exc:
            logger.warning("fallback %s at %s unreachable: %r", self.name, self.url, exc)
            raise EngineError(
                f"fallback {self.name} is unreachable", status_code=503, code="fallback_unreachable"
            ) from None
        if response.status_code != 200:
            payload = await response.aread()
            await response.aclose()
            raise _upstream_error(self.name, response, payload)
        return Prepared(request_id, 0, response)

    async def generate(self, prepared: Prepared[httpx.Response]) -> AsyncIterator[GenerationDelta]:
        """Deltas from the SSE stream, every choice's, with their tool calls and logprobs as
        the other tier sent them. Token counts come from the closing usage message, so the
        deltas carrying ``finish_reason`` are held back until usage arrives."""
        response = prepared.handle
        tokens_so_far, held = 0, []
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    message = chunk["error"].get("message")
                    raise EngineError(
                        f"fallback {self.name}: {message}", status_code=502, code="fallback_failed"
                    )
                for choice in chunk.get("choices") or ():
                    delta = _delta_of(choice)
                    if delta.finish_reason is None:
                        tokens_so_far += 1
                        yield delta
                    else:
                        held.append(delta)
                if (usage := chunk.get("usage")) and held:
                    for delta in held:  # the tokens not counted yet go on the first
                        delta.num_tokens = 0
                        delta.prompt_tokens = usage["prompt_tokens"]
                    held[0].num_tokens = max(0, usage["completion_tokens"] - tokens_so_far)
                    for delta in held:
                        yield delta
                    held = []
            for delta in held:  # the other side sent no usage
                yield delta
        finally:
            await response.aclose()  # closing early drops the connection: the tier aborts it

    async def abort(self, prepared: Prepared[httpx.Response]) -> None:
        await prepared.handle.aclose()  # dropping the connection aborts it in the other tier

    async def check_health(self) -> None:
        """Never gates this pod: the other tier has its own probes, and its absence shows as
        503 ``fallback_unreachable`` on overflow requests, not as this pod being unready."""

    async def metrics_text(self) -> None:
        return None  # the other tier is scraped on its own

    async def aclose(self) -> None:
        await self._client.aclose()


def _delta_of(choice: dict[str, Any]) -> GenerationDelta:
    """One choice of a stream chunk (one token, until usage says otherwise)."""
    delta = choice.get("delta") or {}
    logprobs = choice.get("logprobs")
    return GenerationDelta(
        delta.get("content") or "",
        1,
        choice.get("finish_reason"),
        0,
        choice.get("index", 0),
        delta.get("tool_calls"),
        logprobs.get("content") if logprobs else None,
    )


def _upstream_error(name: str, response: httpx.Response, payload: bytes) -> Exception:
    try:
        error = json.loads(payload)["error"]
        message, code, param = error.get("message"), error.get("code"), error.get("param")
    except (ValueError, KeyError, TypeError):
        message, code, param = payload[:200].decode(errors="replace"), None, None
    status = response.status_code
    if 400 <= status < 500:
        headers = {k: v for k, v in response.headers.items() if k.lower() == "retry-after"}
        return RequestError(
            f"fallback {name}: {message}",
            status_code=status,
            code=str(code or "fallback_rejected"),
            param=param,
            headers=headers,
        )
    return EngineError(
        f"fallback {name} answered {status}: {message}", status_code=503, code="fallback_failed"
    )
