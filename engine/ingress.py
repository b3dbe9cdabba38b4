"""The HTTP surface: OpenAI-compatible routes on FastAPI, served by Ray Serve.

This is the one place errors become HTTP: ``RequestError`` -> 4xx, ``EngineError`` -> 5xx,
both as OpenAI-style JSON. The deployment holds the primary model's engine in-process
(see README, "Why the ingress and the engine share a replica").

Path of a chat request:
  1. parse the JSON body and validate it (``protocol.ChatCompletionRequest``);
  2. resolve the model (404 if unknown);
  3. check the image count, then fetch/decode/normalise every image (``images``);
  4. render the chat with vLLM's renderer and validate it against the context (``llm``);
  5. generate: stream SSE chunks, or collect one JSON body;
  6. record metrics; a client that goes away closes the stream and aborts the request.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine import images, metrics
from engine.config import AppConfig
from engine.errors import EngineError, RequestError
from engine.llm import ModelEngine, PreparedRequest
from engine.protocol import (
    ChatCompletionRequest,
    ChunkEncoder,
    Usage,
    completion_body,
    error_body,
)

_INLINE_DECODE_BYTES = 256 * 1024  # larger images decode in a worker thread

app = FastAPI(title="qwen3vl-serve", docs_url=None, redoc_url=None)


def error_response(exc: Exception) -> JSONResponse:
    """Every HTTP error body is made here."""
    if isinstance(exc, RequestError):
        status, body = exc.status_code, error_body(
            exc.message, error_type=exc.error_type, code=exc.code, param=exc.param
        )
    elif isinstance(exc, EngineError):
        status, body = exc.status_code, error_body(
            exc.message, error_type="server_error", code="engine_error"
        )
    elif isinstance(exc, StarletteHTTPException):
        status, body = exc.status_code, error_body(
            str(exc.detail), error_type="invalid_request_error", code=exc.status_code
        )
    else:
        status, body = 500, error_body(
            f"internal error: {type(exc).__name__}", error_type="server_error", code="internal"
        )
    return JSONResponse(body, status_code=status)


@app.exception_handler(RequestError)
@app.exception_handler(EngineError)
@app.exception_handler(StarletteHTTPException)
async def _handle(_: Request, exc: Exception) -> JSONResponse:
    return error_response(exc)


def parse_request(body: bytes) -> ChatCompletionRequest:
    """Decode and validate a chat request body; every failure names the field."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise RequestError("request body must be a JSON object", code="invalid_json")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        # With unions pydantic reports every branch; the deepest location is the real problem.
        first = max(exc.errors(), key=lambda e: len(e["loc"]))
        where = ".".join(str(p) for p in first["loc"] if not _is_union_tag(p))
        raise RequestError(
            f"{where}: {first['msg']}" if where else first["msg"], param=where or None
        ) from None


def _is_union_tag(part: object) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "list") or "[" in part)


@serve.deployment(max_ongoing_requests=512)
@serve.ingress(app)
class OpenAIServer:
    """Ray Serve replica: the OpenAI API and the primary model's vLLM engine."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.engines: dict[str, ModelEngine] = {config.primary.name: ModelEngine(config.primary)}
        self._http_client: Any = None
        self._model_cards = [
            {"id": name, "object": "model", "created": int(time.time()), "owned_by": "qwen3vl-serve"}
            for name in self.engines
        ]

    # -- plain routes ------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> Response:
        for name, engine in self.engines.items():
            try:
                await engine.check_health()
            except Exception as exc:  # noqa: BLE001 - any failure means "not serving"
                return error_response(EngineError(f"{name}: {exc}", status_code=503))
        return JSONResponse({"status": "ok", "models": list(self.engines)})

    @app.get("/v1/models")
    async def models(self) -> JSONResponse:
        return JSONResponse({"object": "list", "data": self._model_cards})

    @app.get("/metrics")
    async def metrics(self) -> Response:
        payload, content_type = metrics.exposition()
        return Response(payload, media_type=content_type)

    async def check_health(self) -> None:
        """Ray Serve's replica health check: a dead engine gets the replica replaced."""
        for engine in self.engines.values():
            await engine.check_health()

    # -- chat completions ----------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(self, raw: Request) -> Response:
        arrival = time.perf_counter()
        request = parse_request(await raw.body())
        engine = self.engines.get(request.model)
        if engine is None:
            raise RequestError(
                f"model {request.model!r} does not exist; available: {sorted(self.engines)}",
                status_code=404, code="model_not_found", param="model",
            )  # fmt: skip
        try:
            conversation = await self._conversation(request)
            request_id = f"chatcmpl-{uuid.uuid4().hex}"
            prepared = await engine.prepare(request_id, request, conversation)
        except RequestError as exc:
            metrics.REQUESTS.labels(request.model, engine.name, str(exc.status_code)).inc()
            raise
        headers = {"x-served-model": engine.name, "x-request-id": request_id}
        if request.stream:
            return StreamingResponse(
                self._stream(engine, prepared, request, arrival),
                media_type="text/event-stream",
                headers=headers,
            )
        text, usage, finish_reason = await self._collect(engine, prepared, arrival)
        body = completion_body(request_id, engine.name, text, finish_reason, usage)
        return JSONResponse(body, headers=headers)

    async def _conversation(self, request: ChatCompletionRequest) -> list[dict[str, Any]]:
        """Messages in vLLM's chat format, with every image decoded and checked."""
        limits = self.config.images
        n_images = sum(
            1
            for m in request.messages
            if isinstance(m.content, list)
            for p in m.content
            if p.type == "image_url"
        )
        if n_images > limits.max_images_per_request:
            raise RequestError(
                f"request has {n_images} images; at most {limits.max_images_per_request} "
                "are allowed",
                code="too_many_images", param="messages",
            )  # fmt: skip
        conversation = []
        for i, message in enumerate(request.messages):
            role = "system" if message.role == "developer" else message.role
            if not isinstance(message.content, list):
                conversation.append({"role": role, "content": message.content or ""})
                continue
            parts: list[dict[str, Any]] = []
            for j, part in enumerate(message.content):
                if part.type == "text":
                    parts.append({"type": "text", "text": part.text})
                else:
                    param = f"messages.{i}.content.{j}.image_url"
                    image = await self._load_image(part.image_url.url, param)
                    parts.append({"type": "image_pil", "image_pil": image})
            conversation.append({"role": role, "content": parts})
        return conversation

    async def _load_image(self, url: str, param: str):
        limits = self.config.images
        started = time.perf_counter()
        if url.startswith("data:"):
            data = images.decode_data_url(url, limits, param=param)
        else:
            images.check_remote_url(url, limits, param=param)
            if self._http_client is None:
                import httpx

                self._http_client = httpx.AsyncClient(follow_redirects=False)
            data = await images.fetch_image_bytes(
                url, limits, param=param, client=self._http_client
            )
        if len(data) > _INLINE_DECODE_BYTES:
            image = await asyncio.to_thread(images.decode_image, data, limits, param=param)
        else:
            image = images.decode_image(data, limits, param=param)
        metrics.IMAGE_PREPROCESS.observe(time.perf_counter() - started)
        return image

    async def _collect(
        self, engine: ModelEngine, prepared: PreparedRequest, arrival: float
    ) -> tuple[str, Usage, str | None]:
        pieces: list[str] = []
        usage = Usage(prompt_tokens=prepared.prompt_tokens)
        finish_reason = None
        first = True
        try:
            async for delta in engine.generate(prepared):
                if first:
                    metrics.TIME_TO_FIRST_TOKEN.labels(engine.name).observe(
                        time.perf_counter() - arrival
                    )
                    first = False
                pieces.append(delta.text)
                usage.completion_tokens += delta.num_tokens
                finish_reason = delta.finish_reason or finish_reason
        except EngineError as exc:
            metrics.REQUESTS.labels(engine.name, engine.name, str(exc.status_code)).inc()
            raise
        metrics.E2E_LATENCY.labels(engine.name).observe(time.perf_counter() - arrival)
        metrics.REQUESTS.labels(engine.name, engine.name, "200").inc()
        return "".join(pieces), usage, finish_reason

    async def _stream(
        self,
        engine: ModelEngine,
        prepared: PreparedRequest,
        request: ChatCompletionRequest,
        arrival: float,
    ) -> AsyncIterator[str]:
        encoder = ChunkEncoder(prepared.request_id, engine.name)
        usage = Usage(prompt_tokens=prepared.prompt_tokens)
        first = True
        status = "200"
        try:
            async for delta in engine.generate(prepared):
                usage.completion_tokens += delta.num_tokens
                if first:
                    metrics.TIME_TO_FIRST_TOKEN.labels(engine.name).observe(
                        time.perf_counter() - arrival
                    )
                    first = False
                if delta.text or delta.finish_reason:
                    yield encoder.delta(delta.text, delta.finish_reason)
            if request.include_usage:
                yield encoder.usage(usage)
            metrics.E2E_LATENCY.labels(engine.name).observe(time.perf_counter() - arrival)
        except EngineError as exc:
            # Headers are gone already: the error travels as the last event.
            status = str(exc.status_code)
            yield encoder.error(error_body(exc.message, error_type="server_error", code="engine_error"))
        except asyncio.CancelledError:
            status = "499"  # client went away; leaving generate() aborted the engine request
            raise
        finally:
            metrics.REQUESTS.labels(request.model, engine.name, status).inc()
        yield ChunkEncoder.DONE
