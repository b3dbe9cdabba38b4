"""The HTTP surface: OpenAI-compatible routes, served by Ray Serve.

This is the one place errors become HTTP responses (``errors.error_payload``: 4xx for a
``RequestError``, 5xx for an ``EngineError``, as OpenAI-style JSON). A route turns HTTP into
a ``service.Call`` and the chat service's answer back into HTTP; everything between
(routing, admission, images, deadlines, generation) is ``engine.service``, which runs with
no Ray and no HTTP. This replica builds the service from its backends: the primary model's
vLLM engine in-process, fallbacks through Ray Serve handles or over HTTP.

Each replica builds its ASGI app (``HttpApp``) once its constructor ran: the chat route on
raw ASGI (``engine.asgi``: every token of every stream passes there), the rest on FastAPI.

Path of a chat request here (``OpenAIServer.chat``):
  1. read and parse the body and headers within the profile's limits (``intake``);
  2. 404 for an unknown model; the deadline and whether fallback is allowed, from headers;
  3. ``ChatService.stream`` (SSE; a hang-up cancels it, however it ends it is closed) or
     ``ChatService.complete`` (one JSON body; a client that goes away cancels it).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from engine import asgi, lifecycle, metrics
from engine.backend import Backend, engine_backend
from engine.config import AppConfig
from engine.errors import EngineError, RequestError, error_payload
from engine.intake import (
    REQUEST_ID_HEADER,
    allow_fallback,
    deadline_s,
    parse_request,
    request_id_of,
)
from engine.process import server_log
from engine.remote import HttpBackend, RayBackend
from engine.service import Call, ChatService, ClientGone

CHAT_PATH = "/v1/chat/completions"
GONE_STATUS = 499  # nobody is there to read it; not an error of ours


def error_response(exc: Exception) -> JSONResponse:
    """Every HTTP error response is made here."""
    status, body, headers = error_payload(exc)
    return JSONResponse(body, status_code=status, headers=headers)


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


def build_fastapi(server: OpenAIServer) -> FastAPI:
    """The plain routes (health, models, metrics) and the JSON errors of every other path."""
    app = FastAPI(title="qwen3vl-serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestError)
    @app.exception_handler(EngineError)
    @app.exception_handler(StarletteHTTPException)
    async def _handle(_: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(Exception)
    async def _handle_unexpected(_: Request, exc: Exception) -> JSONResponse:
        server_log().error("unhandled error in a request", exc_info=exc)
        return error_response(exc)

    @app.get("/health")
    async def health() -> Response:
        return await server.health()

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": server.model_cards})

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(await server.service.metrics_text(), media_type=metrics.CONTENT_TYPE)

    return app


class HttpApp:
    """A replica's ASGI app: ``POST /v1/chat/completions`` on raw ASGI, the rest on FastAPI."""

    def __init__(self, server: OpenAIServer) -> None:
        self.server = server
        self.fastapi = build_fastapi(server)

    def add_exception_handler(self, kind: type[Exception], handler: Any) -> None:
        """Ray Serve registers its overload errors (backpressure of a fallback's handle)."""
        self.fastapi.add_exception_handler(kind, handler)

    async def error_answer(self, exc: Exception) -> Response:
        """What the FastAPI app's handlers answer ``exc`` with (the nearest class wins, as in
        Starlette): ours, or Ray Serve's for its overload errors. The chat route answers its
        errors with these, so every path answers alike."""
        handlers = self.fastapi.exception_handlers
        handler = next(handlers[kind] for kind in type(exc).__mro__ if kind in handlers)
        response = handler(None, exc)
        return await response if inspect.isawaitable(response) else response

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] == CHAT_PATH:
            await self.server.chat(scope, receive, send, self)
        else:  # other paths, and the lifespan
            await self.fastapi(scope, receive, send)


# Helpers the deployment uses must be defined above it: Ray pickles the class by value.
@serve.deployment(max_ongoing_requests=512)
@serve.ingress()
class OpenAIServer:
    """Ray Serve replica: the OpenAI routes over a ``ChatService`` and the drain on shutdown."""

    def __init__(self, config: AppConfig, fallback_handles: dict[str, Any] | None = None) -> None:
        self.config = config
        self.service = ChatService(config, build_backends(config, fallback_handles or {}))
        self._lifecycle_task: asyncio.Task | None = None
        self._following = asyncio.Event()  # registered with the drain coordinator (or none)
        created = int(time.time())
        self.model_cards = [
            {"id": name, "object": "model", "created": created, "owned_by": "qwen3vl-serve"}
            for name in self.service.backends
        ]

    def __serve_build_asgi_app__(self) -> HttpApp:
        """Ray Serve asks each replica for its ASGI app once the constructor has run."""
        return HttpApp(self)

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

    async def check_health(self) -> None:
        """Ray Serve's replica health check: a dead engine gets the replica replaced."""
        await self._follow_lifecycle()
        await self.service.backends[self.config.primary.name].check_health()

    # -- chat completions ----------------------------------------------------------------
    async def chat(self, scope, receive, send, http: HttpApp) -> None:
        """``/v1/chat/completions`` as raw ASGI; every error is answered here."""
        arrival = time.perf_counter()
        try:
            if scope["method"] != "POST":
                raise StarletteHTTPException(405)  # what FastAPI answered for another method
            if self.service.draining:
                raise _shutting_down()
            headers = Headers(scope=scope)
            given_id = request_id_of(headers)
            limits = self.config.limits
            request = parse_request(await asgi.read_body(receive, headers, limits), limits)
            self.service.check_model(request)
            call = Call(
                request=request,
                request_id=given_id or f"chatcmpl-{uuid.uuid4().hex}",
                arrival=arrival,
                deadline=arrival + deadline_s(headers, self.config),
                allow_fallback=allow_fallback(headers, request, self.config),
            )
            if request.stream:
                source = await self.service.stream(call)
            else:
                answer = await self.service.complete(
                    call, disconnected=asgi.wait_for_disconnect(receive)
                )
        except (ClientDisconnect, ClientGone):
            await Response(status_code=GONE_STATUS)(scope, receive, send)
            return
        except Exception as exc:  # noqa: BLE001 - every error becomes its HTTP answer here
            await (await http.error_answer(exc))(scope, receive, send)
            return
        if request.stream:
            served = _headers(call, source.accepted.model, given_id)
            await asgi.stream_events(send, receive, source.events, source.aclose, served)
        else:
            served = _headers(call, answer.accepted.model, given_id)
            await asgi.send_json(scope, receive, send, answer.body, headers=served)

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
        await coordinator.register.remote(me, os.getpid())
        told = coordinator.wait_for_drain.remote()
        self._following.set()
        await told
        self.service.draining = True
        server_log().info("draining: %d requests in flight", self.service.in_flight())
        while self.service.in_flight():
            await asyncio.sleep(0.05)
        await coordinator.drained.remote(me)
