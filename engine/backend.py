"""The contract every model backend keeps, and the types that cross it.

A backend serves one model: ``VllmBackend`` (an in-process vLLM engine, ``engine.llm``),
``OnnxBackend`` (an in-process ONNX export on ONNX Runtime, ``engine.onnx_engine``),
``RayBackend`` (a fallback deployment behind a Ray Serve handle) and ``HttpBackend`` (a
fallback tier behind a URL, ``engine.remote``). The chat service (``engine.service``) sees
only this protocol, so it is tested with a fake backend and no Ray or vLLM.

A request crosses a backend in two steps, as in vLLM's own server:

1. ``prepare`` renders and validates it (4xx ``RequestError`` on a bad request) and returns
   a ``Prepared`` whose ``handle`` only that backend reads: a vLLM engine input and sampling
   parameters, a Ray object-ref stream, an open HTTP response.
2. ``generate`` streams ``GenerationDelta``s for it. Leaving it early (close, cancel, an
   error in the consumer) aborts the request in the engine.

``abort`` releases a prepared request that will not be (or no longer is) generated; it is
idempotent and never raises.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from engine.config import ModelConfig
from engine.protocol import ChatCompletionRequest

H = TypeVar("H")


@dataclass(slots=True)
class GenerationDelta:
    """New output of one choice of a request since its previous delta (vLLM DELTA output
    mode), already in OpenAI's terms: content text, tool-call deltas, log-probabilities."""

    text: str  # content (text that a tool call consumed is in ``tool_calls`` instead)
    num_tokens: int
    finish_reason: str | None
    prompt_tokens: int
    index: int = 0  # which choice (n > 1)
    # OpenAI stream-delta entries: {"index", "id"?, "type"?, "function": {"name"?, "arguments"}}
    tool_calls: list[dict[str, Any]] | None = None
    # OpenAI ``logprobs.content`` entries for this delta's tokens
    logprobs: list[dict[str, Any]] | None = None


@dataclass(slots=True)
class Accepted:
    """A backend took the request: the first thing a stream of it carries."""

    model: str  # the model that serves it (a fallback's name if it fell back)
    prompt_tokens: int


@dataclass(slots=True)
class Prepared(Generic[H]):
    """A request a backend accepted: rendered, validated, ready to generate."""

    request_id: str  # the public id (body ``id``, x-request-id)
    prompt_tokens: int  # 0 where the backend learns it only at the end (HTTP)
    handle: H  # the backend's own; nobody else reads it


@runtime_checkable
class Backend(Protocol):
    """One model, served in-process, through Ray or over HTTP."""

    name: str
    # Whether ``prepare`` reads the decoded conversation; a backend that forwards the
    # request as sent (HTTP) gets None and the service decodes no image for it.
    uses_conversation: bool
    # The engine's KV-cache usage (0..1) where this process sees it (in-process engines),
    # else None; the router reads it on every decision.
    kv_cache_usage: float | None

    async def prepare(
        self,
        request_id: str,
        request: ChatCompletionRequest,
        conversation: list[dict[str, Any]] | None,
    ) -> Prepared[Any]: ...

    def generate(self, prepared: Prepared[Any]) -> AsyncIterator[GenerationDelta]: ...

    async def abort(self, prepared: Prepared[Any]) -> None: ...

    async def check_health(self) -> None: ...

    async def metrics_text(self) -> bytes | None:
        """Prometheus text of metrics that live in another process (None: none)."""
        ...

    async def aclose(self) -> None: ...


def engine_backend(config: ModelConfig) -> Backend:
    """The in-process backend of a model, by its ``runtime``: vLLM, or ONNX Runtime."""
    if config.runtime == "onnx":
        from engine.onnx_engine import OnnxBackend

        return OnnxBackend(config)
    from engine.llm import VllmBackend

    return VllmBackend(config)
