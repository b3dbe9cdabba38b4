"""Fallback models: a Ray Serve deployment per model, reached through a streaming handle.

The primary model's engine lives in the ingress replica (no hop per token). Fallback tiers
run as their own deployments (``ModelServer``) so each scales on its own; the ingress talks
to them through ``RemoteModel``, which has the same ``prepare``/``generate`` surface as
``ModelEngine``. Only overflow traffic pays the extra hop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from engine.config import ModelConfig
from engine.errors import RequestError
from engine.llm import GenerationDelta, ModelEngine, PreparedRequest
from engine.protocol import ChatCompletionRequest


@serve.deployment
class ModelServer:
    """Ray Serve replica holding one fallback model's vLLM engine."""

    def __init__(self, config: ModelConfig) -> None:
        self.engine = ModelEngine(config)

    async def generate(
        self, request_id: str, request: ChatCompletionRequest, conversation: list[dict[str, Any]]
    ) -> AsyncIterator[int | GenerationDelta]:
        """First item: the prompt's token count (the request was accepted); then deltas."""
        prepared = await self.engine.prepare(request_id, request, conversation)
        yield prepared.prompt_tokens
        async for delta in self.engine.generate(prepared):
            yield delta

    async def metrics_text(self) -> bytes:
        from engine.metrics import exposition

        return exposition()[0]

    async def check_health(self) -> None:
        await self.engine.check_health()


class RemoteModel:
    """The ingress side of a ``ModelServer`` deployment."""

    def __init__(self, name: str, handle: Any) -> None:
        self.name = name
        self._handle = handle

    async def prepare(
        self, request_id: str, request: ChatCompletionRequest, conversation: list[dict[str, Any]]
    ) -> PreparedRequest:
        stream = self._handle.options(stream=True).generate.remote(
            request_id, request, conversation
        )
        try:
            prompt_tokens = await stream.__anext__()
        except RequestError as exc:  # Ray re-raises the replica's exception as a subclass
            stream.cancel()
            raise RequestError(
                exc.message, status_code=exc.status_code, code=exc.code, param=exc.param
            ) from None
        except BaseException:  # deadline or disconnect while the fallback renders
            stream.cancel()
            raise
        return PreparedRequest(request_id, stream, None, prompt_tokens)

    async def generate(self, prepared: PreparedRequest) -> AsyncIterator[GenerationDelta]:
        stream = prepared.engine_input
        finished = False
        try:
            async for delta in stream:
                yield delta
            finished = True
        finally:
            if not finished:
                stream.cancel()  # aborts the request in the fallback's engine

    async def check_health(self) -> None:
        await self._handle.check_health.remote()

    async def metrics_text(self) -> bytes:
        return await self._handle.metrics_text.remote()
