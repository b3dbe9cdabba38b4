"""The HTTP surface: OpenAI-compatible routes on FastAPI, served by Ray Serve.

This is the one place errors become HTTP: ``RequestError`` -> 4xx, ``EngineError`` -> 5xx,
both as OpenAI-style JSON. The deployment holds the primary model's engine in-process and
reaches fallback models through handles (``remote.RemoteModel``).

Path of a chat request:
  1. parse the body and headers within the profile's limits (``intake``);
  2. resolve the model (404 if unknown), the deadline and whether fallback is allowed;
  3. route: primary, a fallback, or 429 (``routing.Router``), and admit;
  4. fetch, decode and check every image, within the deadline (``images.build_conversation``);
  5. render the chat with vLLM's renderer and validate it against the context (``llm``);
  6. generate within the deadline: stream SSE chunks, or collect one JSON body;
  7. release and record metrics; a client that goes away aborts the engine request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from engine import fetch, images, lifecycle, metrics
from engine.config import AppConfig
from engine.errors import EngineError, RequestError
from engine.intake import (
    REQUEST_ID_HEADER,
    allow_fallback,
    deadline_s,
    parse_request,
    read_body,
    request_id_of,
)
from engine.llm import ModelEngine, PreparedRequest
from engine.protocol import (
    ChatCompletionRequest,
    ChunkEncoder,
    Usage,
    completion_body,
    error_body,
)
from engine.remote import HttpModel, RemoteModel
from engine.routing import Router

app = FastAPI(title="qwen3vl-serve", docs_url=None, redoc_url=None)


def error_response(exc: Exception) -> JSONResponse:
    """Every HTTP error response is made here."""
    status, body, headers = error_payload(exc)
    return JSONResponse(body, status_code=status, headers=headers)


def error_payload(exc: Exception) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, OpenAI-style body and headers of an error; unexpected ones say nothing of
    their internals (the log has them)."""
    if isinstance(exc, RequestError):
        body = error_body(exc.message, error_type=exc.error_type, code=exc.code, param=exc.param)
        return exc.status_code, body, exc.headers
    if isinstance(exc, EngineError):
        return (
            exc.status_code,
            error_body(exc.message, error_type=exc.error_type, code=exc.code),
            {},
        )
    if isinstance(exc, StarletteHTTPException):
        body = error_body(str(exc.detail), error_type="invalid_request_error", code=exc.status_code)
        return exc.status_code, body, {}
    body = error_body(
        "internal error; the server logged it", error_type="server_error", code="internal"
    )
    return 500, body, {}


@app.exception_handler(RequestError)
@app.exception_handler(EngineError)
@app.exception_handler(StarletteHTTPException)
async def _handle(_: Request, exc: Exception) -> JSONResponse:
    return error_response(exc)


@app.exception_handler(ClientDisconnect)
async def _handle_disconnect(_: Request, exc: Exception) -> Response:
    return Response(status_code=499)  # nobody is there to read it; not an error of ours


@app.exception_handler(Exception)
async def _handle_unexpected(_: Request, exc: Exception) -> JSONResponse:
    _server_log().error("unhandled error in a request", exc_info=exc)
    return error_response(exc)


class EventStream(StreamingResponse):
    """An SSE response that closes its event generator as soon as the response ends, however
    it ends. Starlette only stops iterating: on a client disconnect the generator would stay
    suspended until garbage collection, and the engine would go on generating for nobody.
    ``on_close`` runs last, also when the stream never started."""

    def __init__(self, content: AsyncIterator[str], on_close, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                # Shielded: the disconnect may cancel this task while the generator closes.
                await asyncio.shield(self.body_iterator.aclose())
            finally:
                self._on_close()


async def _wait_for_disconnect(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass


def _server_log() -> logging.Logger:
    """The replica's own log lines (requests, drain), written to the process's stderr file
    descriptor as they happen: Ray Serve's logger buffers and filters in throughput mode, and
    the worker's stderr is what Ray's log monitor forwards to the server's output."""
    log = logging.getLogger("qwen3vl")
    if not log.handlers:
        handler = logging.StreamHandler(open(os.dup(2), "w", buffering=1))  # noqa: SIM115
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


def _log_request(
    request_id: str,
    requested: str,
    served: str,
    status: str,
    arrival: float,
    completion_tokens: int | None = None,
) -> None:
    """One line per admitted request, keyed by the id the client sees (body ``id``,
    ``x-request-id``); Ray Serve's own access log is off in throughput mode."""
    tokens = "" if completion_tokens is None else f" tokens={completion_tokens}"
    _server_log().info(
        "request %s model=%s served=%s status=%s %.0fms%s",
        request_id,
        requested,
        served,
        status,
        1000 * (time.perf_counter() - arrival),
        tokens,
    )


def _shutting_down() -> EngineError:
    return EngineError(
        "the server is shutting down; retry on another replica",
        status_code=503,
        code="shutting_down",
    )


# Helpers the deployment uses must be defined above it: Ray pickles the class by value.
@serve.deployment(max_ongoing_requests=512)
@serve.ingress(app)
class OpenAIServer:
    """Ray Serve replica: the OpenAI API, the primary model's engine, handles to fallbacks."""

    def __init__(self, config: AppConfig, fallback_handles: dict[str, Any] | None = None) -> None:
        self.config = config
        primary = ModelEngine(config.primary)
        self.engines: dict[str, ModelEngine | RemoteModel | HttpModel] = {primary.name: primary}
        for name, handle in (fallback_handles or {}).items():
            self.engines[name] = RemoteModel(name, handle)
        for model in config.fallbacks:
            if model.url:
                self.engines[model.name] = HttpModel(model.name, model.url)
        self.router = Router(config, kv_cache_usage={primary.name: lambda: primary.kv_cache_usage})
        self._http_client: Any = None
        self._decoder = images.DecodePool(config.images.decode_threads)
        self.draining = False
        self._lifecycle_task: asyncio.Task | None = None
        self._following = asyncio.Event()  # registered with the drain coordinator (or none)
        self._model_cards = [
            {
                "id": name,
                "object": "model",
                "created": int(time.time()),
                "owned_by": "qwen3vl-serve",
            }
            for name in self.engines
        ]

    # -- plain routes ------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> Response:
        # Ready only once a drain would reach this replica.
        await self._follow_lifecycle()
        if self.draining:
            return error_response(_shutting_down())
        for name, engine in self.engines.items():
            try:
                await engine.check_health()
            except Exception as exc:  # noqa: BLE001 - any failure means "not serving"
                _server_log().warning("health check of %s failed: %r", name, exc)
                return error_response(
                    EngineError(f"model {name} is not healthy", status_code=503, code="unhealthy")
                )
        return JSONResponse({"status": "ok", "models": list(self.engines)})

    @app.get("/v1/models")
    async def models(self) -> JSONResponse:
        return JSONResponse({"object": "list", "data": self._model_cards})

    @app.get("/metrics")
    async def metrics(self) -> Response:
        payload, content_type = metrics.exposition()
        remotes = [e for e in self.engines.values() if isinstance(e, RemoteModel)]
        if remotes:  # fallback engines' vllm:* metrics live in their own replicas
            texts = await asyncio.gather(
                *(r.metrics_text() for r in remotes), return_exceptions=True
            )
            payload = metrics.merge_expositions(
                [payload, *(t for t in texts if isinstance(t, bytes))]
            )
        return Response(payload, media_type=content_type)

    async def check_health(self) -> None:
        """Ray Serve's replica health check: a dead engine gets the replica replaced."""
        await self._follow_lifecycle()
        primary = self.engines[self.config.primary.name]
        await primary.check_health()

    # -- chat completions ----------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(self, raw: Request) -> Response:
        arrival = time.perf_counter()
        if self.draining:
            raise _shutting_down()
        given_id = request_id_of(raw.headers)
        request_id = given_id or f"chatcmpl-{uuid.uuid4().hex}"
        request = parse_request(await read_body(raw, self.config.limits), self.config.limits)
        if request.model not in self.engines:
            raise RequestError(
                f"model {request.model!r} does not exist; available: {sorted(self.engines)}",
                status_code=404,
                code="model_not_found",
                param="model",
            )
        deadline = arrival + deadline_s(raw.headers, self.config)
        strict = not allow_fallback(raw.headers, request, self.config)
        # Route before touching images: a refused request costs no decoding.
        try:
            route = self.router.choose(request.model, allow_fallback=not strict)
        except RequestError as exc:
            metrics.REJECTIONS.labels(request.model, exc.code).inc()
            metrics.REQUESTS.labels(request.model, "", str(exc.status_code)).inc()
            self._export_load()
            raise
        engine = self.engines[route.served_model]
        self.router.admit(engine.name)  # no await between choose and admit: no race
        self._export_load()
        release = self._releaser(engine.name)
        streaming, status = False, "200"
        try:
            conversation = await self._within(
                deadline,
                images.build_conversation(
                    request, self.config.images, self._fetch_client, self._decoder
                ),
                request,
            )
            prepared = await self._within(
                deadline, engine.prepare(request_id, request, conversation), request
            )
            if route.fell_back:
                metrics.FALLBACKS.labels(request.model, engine.name).inc()
            headers = {"x-served-model": engine.name}
            if given_id is None:  # outside Ray Serve nobody else sets it
                headers[REQUEST_ID_HEADER] = request_id
            if request.stream:
                streaming = True  # from here the stream releases, however it ends
                return EventStream(
                    self._stream(engine, prepared, request, arrival, deadline, release),
                    on_close=release,
                    media_type="text/event-stream",
                    headers=headers,
                )
            text, usage, finish_reason = await self._within(
                deadline,
                self._collect_unless_disconnected(raw, request, engine, prepared, arrival),
                request,
            )
            body = completion_body(request_id, engine.name, text, finish_reason, usage)
            metrics.REQUESTS.labels(request.model, engine.name, "200").inc()
            return JSONResponse(body, headers=headers)
        except (RequestError, EngineError) as exc:
            status = str(exc.status_code)
            metrics.REQUESTS.labels(request.model, engine.name, status).inc()
            raise
        except asyncio.CancelledError:  # the client went away (Ray cancels the request)
            status = "499"
            metrics.REQUESTS.labels(request.model, engine.name, status).inc()
            raise
        except Exception:  # the handler answers a generic 500; counted and logged as one
            status = "500"
            metrics.REQUESTS.labels(request.model, engine.name, status).inc()
            raise
        finally:
            if not streaming:
                release()
                _log_request(request_id, request.model, engine.name, status, arrival)

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
        self.draining = True
        _server_log().info("draining: %d requests in flight", self._in_flight())
        while self._in_flight():
            await asyncio.sleep(0.05)
        await coordinator.drained.remote(me)

    def _in_flight(self) -> int:
        return sum(load.in_flight for load in self.router.loads.values())

    def _fetch_client(self):
        if self._http_client is None:
            self._http_client = fetch.fetch_client()
        return self._http_client

    def _releaser(self, name: str):
        """An idempotent release of one admitted request."""
        done = False

        def release() -> None:
            nonlocal done
            if not done:
                done = True
                self.router.release(name)
                self._export_load()

        return release

    def _export_load(self) -> None:
        # Demand, not just the primary's share: while overflow goes to a fallback, the primary's
        # own count plateaus at its capacity and an HPA on it would barely scale.
        metrics.POD_IN_FLIGHT.set(self._in_flight())
        for load in self.router.loads.values():
            metrics.IN_FLIGHT.labels(load.name).set(load.in_flight)
            metrics.SATURATED.labels(load.name).set(1 if load.saturated else 0)

    async def _within(self, deadline: float, work, request: ChatCompletionRequest):
        """Await ``work`` until the deadline; past it, cancel it (aborting the engine request)."""
        try:
            return await asyncio.wait_for(work, max(0.0, deadline - time.perf_counter()))
        except TimeoutError:
            metrics.REJECTIONS.labels(request.model, "deadline_exceeded").inc()
            raise EngineError(
                "the request did not finish within its deadline",
                status_code=504,
                code="deadline_exceeded",
                error_type="timeout_error",
            ) from None

    async def _collect_unless_disconnected(
        self, raw: Request, request: ChatCompletionRequest, engine, prepared, arrival
    ):
        """Collect the completion; if the client disconnects first, cancel (and so abort) it."""
        collect = asyncio.ensure_future(self._collect(engine, prepared, arrival))
        disconnect = asyncio.ensure_future(_wait_for_disconnect(raw))
        try:
            done, _ = await asyncio.wait({collect, disconnect}, return_when=asyncio.FIRST_COMPLETED)
            if collect in done:
                return collect.result()
            raise asyncio.CancelledError("client disconnected")  # counted as 499 by the caller
        finally:
            for task in (collect, disconnect):
                task.cancel()

    async def _collect(
        self, engine, prepared: PreparedRequest, arrival: float
    ) -> tuple[str, Usage, str | None]:
        pieces: list[str] = []
        usage = Usage(prompt_tokens=prepared.prompt_tokens)
        finish_reason = None
        async for delta in engine.generate(prepared):
            if not pieces:
                metrics.TIME_TO_FIRST_TOKEN.labels(engine.name).observe(
                    time.perf_counter() - arrival
                )
            pieces.append(delta.text)
            usage.completion_tokens += delta.num_tokens
            usage.prompt_tokens = delta.prompt_tokens or usage.prompt_tokens
            finish_reason = delta.finish_reason or finish_reason
        metrics.E2E_LATENCY.labels(engine.name).observe(time.perf_counter() - arrival)
        return "".join(pieces), usage, finish_reason

    async def _stream(
        self,
        engine,
        prepared: PreparedRequest,
        request: ChatCompletionRequest,
        arrival: float,
        deadline: float,
        release,
    ) -> AsyncIterator[str]:
        encoder = ChunkEncoder(prepared.request_id, engine.name)
        usage = Usage(prompt_tokens=prepared.prompt_tokens)
        first = True
        status = "200"
        try:
            async with asyncio.timeout(max(0.0, deadline - time.perf_counter())):
                async for delta in engine.generate(prepared):
                    usage.completion_tokens += delta.num_tokens
                    usage.prompt_tokens = delta.prompt_tokens or usage.prompt_tokens
                    if first:
                        metrics.TIME_TO_FIRST_TOKEN.labels(engine.name).observe(
                            time.perf_counter() - arrival
                        )
                        first = False
                    yield encoder.delta(delta.text, delta.finish_reason)
            if request.include_usage:
                yield encoder.usage(usage)
            metrics.E2E_LATENCY.labels(engine.name).observe(time.perf_counter() - arrival)
        except TimeoutError:
            # Headers are gone already: the error travels as the last event.
            status = "504"
            metrics.REJECTIONS.labels(request.model, "deadline_exceeded").inc()
            yield encoder.error(
                error_body(
                    "the request did not finish within its deadline",
                    error_type="timeout_error",
                    code="deadline_exceeded",
                )
            )
        except asyncio.CancelledError:
            status = "499"  # client went away; leaving generate() aborted the engine request
            raise
        except Exception as exc:  # noqa: BLE001 - a stream always ends with an error and DONE
            code, body, _ = error_payload(exc)
            status = str(code)
            if code >= 500 and not isinstance(exc, EngineError):
                _server_log().error("stream %s failed", prepared.request_id, exc_info=exc)
            yield encoder.error(body)
        finally:
            metrics.REQUESTS.labels(request.model, engine.name, status).inc()
            release()
            _log_request(
                prepared.request_id,
                request.model,
                engine.name,
                status,
                arrival,
                usage.completion_tokens,
            )
        yield ChunkEncoder.DONE
