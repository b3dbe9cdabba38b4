"""The chat service: one request's life from admission to its last token, on any backend.

Built from backends (``engine.backend.Backend``) and a profile; no Ray, no HTTP. The Ray
Serve deployment (``engine.ingress``) turns HTTP into a ``Call`` and the service's answer
back into HTTP; unit tests drive the service with a fake backend.

Life of a call (``_run``, one async generator for both response shapes):
  1. route: the requested model, a fallback, or 429 (``routing.Router``);
  2. admit (``Admission``: admit, release, the request metric and the log line, once);
  3. within the deadline: fetch and decode the images (only for a backend that reads them),
     then ``backend.prepare``;
  4. yield ``Accepted`` (status and headers can go out now), then the deltas of
     ``backend.generate`` within the deadline;
  5. however it ends (done, error, deadline, client gone), the backend request is aborted
     if unfinished and the admission released.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from engine import fetch, images, metrics
from engine.backend import Accepted, Backend, GenerationDelta, Prepared
from engine.config import AppConfig
from engine.errors import EngineError, RequestError, error_payload
from engine.process import server_log
from engine.protocol import (
    ChatCompletionRequest,
    ChunkEncoder,
    Usage,
    choice_body,
    completion_body,
)
from engine.routing import Router


@dataclass(slots=True)
class Call:
    """One chat request as the service takes it."""

    request: ChatCompletionRequest
    request_id: str
    arrival: float  # time.perf_counter() at arrival
    deadline: float  # time.perf_counter() by which it must be done
    allow_fallback: bool = True


@dataclass(slots=True)
class Completion:
    """A non-streaming answer."""

    accepted: Accepted
    body: dict[str, Any]


@dataclass(slots=True)
class EventSource:
    """A streaming answer: SSE lines, and ``aclose`` to end the request, which the HTTP
    layer calls however the response ends (also when it never started)."""

    accepted: Accepted
    events: AsyncIterator[str]
    aclose: Callable[[], Awaitable[None]]


class ClientGone(Exception):
    """The client disconnected before a non-streaming answer was ready."""


def deadline_error() -> EngineError:
    return EngineError(
        "the request did not finish within its deadline",
        status_code=504,
        code="deadline_exceeded",
        error_type="timeout_error",
    )


@dataclass(slots=True)
class Admission:
    """One admitted request: counted in flight on entry; on exit released, its status (from
    how the block ended) counted in ``qwen3vl_requests`` and logged, exactly once."""

    service: ChatService
    call: Call
    served: str
    status: str = "200"
    completion_tokens: int | None = None
    first_token_at: float | None = None

    async def __aenter__(self) -> Admission:
        self.service.router.admit(self.served)
        self.service.export_load()
        return self

    async def __aexit__(self, kind, exc, tb) -> None:
        if isinstance(exc, RequestError | EngineError):
            self.status = str(exc.status_code)
        elif kind is not None and issubclass(kind, asyncio.CancelledError | GeneratorExit):
            self.status = "499"  # the client went away
        elif exc is not None:
            self.status = "500"
        self.service.router.release(self.served)
        self.service.export_load()
        request = self.call.request
        metrics.REQUESTS.labels(request.model, self.served, self.status).inc()
        if self.status == "504":
            metrics.REJECTIONS.labels(request.model, "deadline_exceeded").inc()
        tokens = "" if self.completion_tokens is None else f" tokens={self.completion_tokens}"
        server_log().info(
            "request %s model=%s served=%s status=%s %.0fms%s",
            self.call.request_id,
            request.model,
            self.served,
            self.status,
            1000 * (time.perf_counter() - self.call.arrival),
            tokens,
        )


class ChatService:
    """Routes, admits and runs chat calls on its backends; knows nothing of HTTP or Ray."""

    def __init__(
        self,
        config: AppConfig,
        backends: Mapping[str, Backend],
    ) -> None:
        self.config = config
        self.backends = dict(backends)
        self.router = Router(
            config,
            kv_cache_usage={
                name: (lambda b=backend: b.kv_cache_usage)
                for name, backend in self.backends.items()
                if backend.kv_cache_usage is not None
            },
        )
        self.decoder = images.DecodePool(
            config.images.decode_threads, config.images.small_decode_threads
        )
        self._http_client: Any = None  # for image URLs, made on first use
        self.draining = False

    # -- what the HTTP layer asks ----------------------------------------------------------
    def in_flight(self) -> int:
        return sum(load.in_flight for load in self.router.loads.values())

    def check_model(self, request: ChatCompletionRequest) -> None:
        if request.model not in self.backends:
            raise RequestError(
                f"model {request.model!r} does not exist; available: {sorted(self.backends)}",
                status_code=404,
                code="model_not_found",
                param="model",
            )

    async def check_health(self) -> None:
        """Raise ``EngineError`` 503 naming the first backend that cannot serve."""
        for name, backend in self.backends.items():
            try:
                await backend.check_health()
            except Exception as exc:  # noqa: BLE001 - any failure means "not serving"
                server_log().warning("health check of %s failed: %r", name, exc)
                raise EngineError(
                    f"model {name} is not healthy", status_code=503, code="unhealthy"
                ) from None

    async def metrics_text(self) -> bytes:
        """This process's metrics merged with those backends keep elsewhere."""
        payload, _ = metrics.exposition()
        texts = await asyncio.gather(
            *(b.metrics_text() for b in self.backends.values()), return_exceptions=True
        )
        extra = [t for t in texts if isinstance(t, bytes)]
        return metrics.merge_expositions([payload, *extra]) if extra else payload

    def export_load(self) -> None:
        # Demand, not just the primary's share: while overflow goes to a fallback, the primary's
        # own count plateaus at its capacity and an HPA on it would barely scale.
        metrics.POD_IN_FLIGHT.set(self.in_flight())
        for load in self.router.loads.values():
            metrics.IN_FLIGHT.labels(load.name).set(load.in_flight)
            metrics.SATURATED.labels(load.name).set(1 if load.saturated else 0)

    # -- the two response shapes -----------------------------------------------------------
    async def complete(self, call: Call, disconnected: Awaitable[None] | None = None) -> Completion:
        """The whole answer as one body. If ``disconnected`` finishes first, the request is
        cancelled (and so aborted in its backend) and ``ClientGone`` raised."""
        work = asyncio.ensure_future(self._complete(call))
        if disconnected is None:
            return await work
        gone = asyncio.ensure_future(disconnected)
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
                await asyncio.wait({work})
        if work.cancelled():
            raise ClientGone(call.request_id)
        return work.result()

    async def stream(self, call: Call) -> EventSource:
        """Admit and prepare (errors raise here, before any byte is sent); then the SSE lines."""
        run = self._run(call)
        try:
            accepted = await anext(run)
        except BaseException:
            await run.aclose()
            raise
        events = self._sse(run, call, accepted)
        return EventSource(accepted, events, run.aclose)

    async def _complete(self, call: Call) -> Completion:
        async with aclosing(self._run(call)) as run:
            accepted = await anext(run)
            usage = Usage(prompt_tokens=accepted.prompt_tokens)
            choices: dict[int, _Choice] = {}
            async for delta in run:
                _add(usage, delta)
                choice = choices.get(delta.index)
                if choice is None:
                    choice = choices[delta.index] = _Choice()
                choice.add(delta)
        bodies = [choices[i].body(i) for i in sorted(choices)] or [_Choice().body(0)]
        body = completion_body(call.request_id, accepted.model, bodies, usage)
        return Completion(accepted, body)

    async def _sse(self, run: AsyncGenerator, call: Call, accepted: Accepted) -> AsyncIterator[str]:
        """SSE lines; an error after the headers travels as the last event before [DONE]."""
        encoder = ChunkEncoder(call.request_id, accepted.model)
        usage = Usage(prompt_tokens=accepted.prompt_tokens)
        try:
            async for delta in run:
                _add(usage, delta)
                yield encoder.delta(
                    delta.text, delta.finish_reason, delta.index, delta.tool_calls, delta.logprobs
                )
            if call.request.include_usage:
                yield encoder.usage(usage)
        except Exception as exc:  # noqa: BLE001 - a stream always ends with an error and DONE
            code, body, _ = error_payload(exc)
            if code >= 500 and not isinstance(exc, EngineError):
                server_log().error("stream %s failed", call.request_id, exc_info=exc)
            yield encoder.error(body)
        finally:
            await run.aclose()
        yield ChunkEncoder.DONE

    # -- one call's life -------------------------------------------------------------------
    async def _run(self, call: Call) -> AsyncGenerator[Any, None]:
        """``Accepted``, then ``GenerationDelta``s; raises a 4xx/5xx error instead."""
        request = call.request
        backend = self.backends[self._route(call)]
        async with Admission(self, call, backend.name) as admission:
            prepared = await self._prepare(call, backend)
            finished = False
            try:
                if backend.name != request.model:
                    metrics.FALLBACKS.labels(request.model, backend.name).inc()
                yield Accepted(backend.name, prepared.prompt_tokens)
                admission.completion_tokens = 0
                # Not one block with the prepare above: the first yield can move this
                # generator to another task (the HTTP layer streams from its own).
                async with (
                    _deadline(call.deadline),
                    aclosing(backend.generate(prepared)) as deltas,
                ):
                    async for delta in deltas:
                        if admission.first_token_at is None:
                            admission.first_token_at = time.perf_counter()
                            metrics.TIME_TO_FIRST_TOKEN.labels(backend.name).observe(
                                admission.first_token_at - call.arrival
                            )
                        admission.completion_tokens += delta.num_tokens
                        yield delta
                finished = True
                metrics.E2E_LATENCY.labels(backend.name).observe(time.perf_counter() - call.arrival)
            finally:
                if not finished:
                    await backend.abort(prepared)

    def _route(self, call: Call) -> str:
        request = call.request
        try:
            route = self.router.choose(request.model, allow_fallback=call.allow_fallback)
        except RequestError as exc:
            metrics.REJECTIONS.labels(request.model, exc.code).inc()
            metrics.REQUESTS.labels(request.model, "", str(exc.status_code)).inc()
            self.export_load()
            raise
        return route.served_model

    async def _prepare(self, call: Call, backend: Backend) -> Prepared[Any]:
        """Images (if the backend reads them), then the backend's prepare, by the deadline."""
        async with _deadline(call.deadline):
            conversation = None
            if backend.uses_conversation:
                conversation = await images.build_conversation(
                    call.request,
                    self.config.images,
                    self._fetch_client,
                    self.decoder,
                    alone=self.in_flight() == 1,  # this request is all the replica serves
                )
            return await backend.prepare(call.request_id, call.request, conversation)

    def _fetch_client(self) -> Any:
        if self._http_client is None:
            self._http_client = fetch.fetch_client()
        return self._http_client


class _deadline:
    """``asyncio.timeout`` until a ``time.perf_counter()`` deadline; when it, not something
    inside, fires, the block raises the 504 ``deadline_exceeded`` error."""

    def __init__(self, deadline: float) -> None:
        self._deadline = deadline
        self._timeout: asyncio.Timeout | None = None

    async def __aenter__(self) -> None:
        remaining = self._deadline - time.perf_counter()
        self._timeout = asyncio.timeout_at(asyncio.get_running_loop().time() + remaining)
        await self._timeout.__aenter__()

    async def __aexit__(self, kind, exc, tb) -> None:
        try:
            await self._timeout.__aexit__(kind, exc, tb)
        except TimeoutError:  # raised by the timeout only when it fired
            raise deadline_error() from None


class _Choice:
    """One choice of a non-streaming answer, gathered from its deltas."""

    __slots__ = ("pieces", "calls", "logprobs", "finish_reason")

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.calls: list[dict[str, Any]] = []  # whole calls, by their index
        self.logprobs: list[dict[str, Any]] | None = None
        self.finish_reason: str | None = None

    def add(self, delta: GenerationDelta) -> None:
        self.pieces.append(delta.text)
        self.finish_reason = delta.finish_reason or self.finish_reason
        if delta.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(delta.logprobs)
        for part in delta.tool_calls or ():
            index = part["index"]
            while len(self.calls) <= index:
                self.calls.append(
                    {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
                )
            call = self.calls[index]
            call["id"] = part.get("id") or call["id"]
            function = part.get("function") or {}
            call["function"]["name"] = function.get("name") or call["function"]["name"]
            call["function"]["arguments"] += function.get("arguments") or ""

    def body(self, index: int) -> dict[str, Any]:
        text = "".join(self.pieces)
        return choice_body(index, text, self.finish_reason, self.calls or None, self.logprobs)


def _add(usage: Usage, delta: GenerationDelta) -> None:
    usage.completion_tokens += delta.num_tokens
    usage.prompt_tokens = delta.prompt_tokens or usage.prompt_tokens
