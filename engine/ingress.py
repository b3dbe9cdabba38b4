"""The HTTP surface: OpenAI-compatible routes on FastAPI, served by Ray Serve.

This is the one place errors become HTTP responses (``errors.error_payload``: 4xx for a
``RequestError``, 5xx for an ``EngineError``, as OpenAI-style JSON). A route turns HTTP into
a ``service.Call`` and the chat service's answer back into HTTP; everything between
(routing, admission, images, deadlines, generation) is ``engine.service``, which runs with
no Ray and no HTTP. This replica builds the service from its backends: the primary model's
vLLM engine in-process, fallbacks through Ray Serve handles or over HTTP.

Path of a chat request here:
  1. read and parse the body and headers within the profile's limits (``intake``);
  2. 404 for an unknown model; the deadline and whether fallback is allowed, from headers;
  3. ``ChatService.stream`` (SSE, closed however the response ends) or
     ``ChatService.complete`` (one JSON body; a client that goes away cancels it).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from engine import lifecycle, metrics
from engine.backend import Backend, engine_backend
from engine.config import AppConfig
from engine.errors import EngineError, RequestError, error_payload
from engine.intake import (
    REQUEST_ID_HEADER,
    allow_fallback,
    deadline_s,
    parse_request,
    read_body,
    request_id_of,
)
from engine.process import server_log
from engine.remote import HttpBackend, RayBackend
from engine.service import Call, ChatService, ClientGone

app = FastAPI(title="qwen3vl-serve", docs_url=None, redoc_url=None)


def error_response(exc: Exception) -> JSONResponse:
    """Every HTTP error response is made here."""
    status, body, headers = error_payload(exc)
    return JSONResponse(body, status_code=status, headers=headers)


@app.exception_handler(RequestError)
@app.exception_handler(EngineError)
@app.exception_handler(StarletteHTTPException)
async def _handle(_: Request, exc: Exception) -> JSONResponse:
    return error_response(exc)


@app.exception_handler(ClientDisconnect)
@app.exception_handler(ClientGone)
async def _handle_disconnect(_: Request, exc: Exception) -> Response:
    return Response(status_code=499)  # nobody is there to read it; not an error of ours


@app.exception_handler(Exception)
async def _handle_unexpected(_: Request, exc: Exception) -> JSONResponse:
    server_log().error("unhandled error in a request", exc_info=exc)
    return error_response(exc)


class EventStream(StreamingResponse):
    """An SSE response that ends its request as soon as the response ends, however it ends.
    Starlette only stops iterating: on a client disconnect the generator would stay
    suspended until garbage collection, and the engine would go on generating for nobody.
    ``on_close`` runs last, also when the stream never started."""

    def __init__(
        self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[None]], **kwargs
    ) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Shielded: the disconnect may cancel this task while the request ends.
            try:
                await asyncio.shield(self.body_iterator.aclose())
            finally:
                await asyncio.shield(self._on_close())


async def _wait_for_disconnect(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass


def _shutting_down() -> EngineError:
    return EngineError(
        "the server is shutting down; retry on another replica",
        status_code=503,
        code="shutting_down",
    )


def _headers(call: Call, served: str, given_id: str | None) -> dict[str, str]:
    headers = {"x-served-model": served}
    if given_id is None:  # outside Ray Serve nobody else sets it
        headers[REQUEST_ID_HEADER] = call.request_id
    return headers


def build_backends(config: AppConfig, handles: dict[str, Any]) -> dict[str, Backend]:
    """The primary's engine in this process (vLLM or ONNX Runtime, by its ``runtime``);
    fallbacks by Ray handle or by URL."""
    primary = engine_backend(config.primary)
    backends: dict[str, Backend] = {primary.name: primary}
    for name, handle in handles.items():
        backends[name] = RayBackend(name, handle)
    for model in config.fallbacks:
        if model.url:
            backends[model.name] = HttpBackend(model.name, model.url)
    return backends


# Helpers the deployment uses must be defined above it: Ray pickles the class by value.
@serve.deployment(max_ongoing_requests=512)
@serve.ingress(app)
class OpenAIServer:
    """Ray Serve replica: the OpenAI routes over a ``ChatService`` and the drain on shutdown."""

    def __init__(self, config: AppConfig, fallback_handles: dict[str, Any] | None = None) -> None:
        self.config = config
        self.service = ChatService(config, build_backends(config, fallback_handles or {}))
        self._lifecycle_task: asyncio.Task | None = None
        self._following = asyncio.Event()  # registered with the drain coordinator (or none)
        created = int(time.time())
        self._model_cards = [
            {"id": name, "object": "model", "created": created, "owned_by": "qwen3vl-serve"}
            for name in self.service.backends
        ]

    # -- plain routes ------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> Response:
        # Ready only once a drain would reach this replica.
        await self._follow_lifecycle()
        if self.service.draining:
            return error_response(_shutting_down())
        try:
            await self.service.check_health()
        except EngineError as exc:
            return error_response(exc)
        return JSONResponse({"status": "ok", "models": list(self.service.backends)})

    @app.get("/v1/models")
    async def models(self) -> JSONResponse:
        return JSONResponse({"object": "list", "data": self._model_cards})

    @app.get("/metrics")
    async def metrics(self) -> Response:
        return Response(await self.service.metrics_text(), media_type=metrics.CONTENT_TYPE)

    async def check_health(self) -> None:
        """Ray Serve's replica health check: a dead engine gets the replica replaced."""
        await self._follow_lifecycle()
        await self.service.backends[self.config.primary.name].check_health()

    # -- chat completions ----------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(self, raw: Request) -> Response:
        arrival = time.perf_counter()
        if self.service.draining:
            raise _shutting_down()
        given_id = request_id_of(raw.headers)
        request = parse_request(await read_body(raw, self.config.limits), self.config.limits)
        self.service.check_model(request)
        call = Call(
            request=request,
            request_id=given_id or f"chatcmpl-{uuid.uuid4().hex}",
            arrival=arrival,
            deadline=arrival + deadline_s(raw.headers, self.config),
            allow_fallback=allow_fallback(raw.headers, request, self.config),
        )
        if request.stream:
            source = await self.service.stream(call)
            return EventStream(
                source.events,
                on_close=source.aclose,
                media_type="text/event-stream",
                headers=_headers(call, source.accepted.model, given_id),
            )
        answer = await self.service.complete(call, disconnected=_wait_for_disconnect(raw))
        return JSONResponse(answer.body, headers=_headers(call, answer.accepted.model, given_id))

    # -- drain on shutdown (engine.lifecycle) -------------------------------------------
    async def _follow_lifecycle(self) -> None:
        """Follow the server's drain signal (started once); return once registered."""
        if self._following.is_set():  # every later health check: nothing to wait for
            return
        if self._lifecycle_task is None:
            self._lifecycle_task = asyncio.get_running_loop().create_task(self._drain_when_told())
        await asyncio.wait_for(asyncio.shield(self._following.wait()), 60)

    async def _drain_when_told(self) -> None:
        import ray

        try:
            coordinator = await asyncio.to_thread(
                ray.get_actor, lifecycle.LIFECYCLE_ACTOR, namespace=lifecycle.LIFECYCLE_NAMESPACE
            )
        except ValueError:
            self._following.set()
            return  # not started by our CLI (e.g. a RayService): Ray Serve's own shutdown
        me = f"{id(self)}-{uuid.uuid4().hex[:8]}"
        await coordinator.register.remote(me)
        told = coordinator.wait_for_drain.remote()
        self._following.set()
        await told
        self.service.draining = True
        server_log().info("draining: %d requests in flight", self.service.in_flight())
        while self.service.in_flight():
            await asyncio.sleep(0.05)
        await coordinator.drained.remote(me)
