"""Raw ASGI for the chat route: read a body, answer JSON, stream SSE, notice a hang-up.

Every token of every stream passes through here, so this path has no framework between
uvicorn (with Ray Serve's two wrappers) and the chat service: no FastAPI routing or
dependency solving per request, no anyio task group per stream, no middleware frames per
SSE event. What Starlette's ``StreamingResponse`` did for us is done here, in one place:

- the response starts only once the service has accepted the request (errors before
  that are ordinary JSON errors with their own status);
- a hang-up is watched for on ``receive`` while the stream runs; when it comes, the
  stream is cancelled at its current await (the engine request is aborted by the service's
  own ``finally``) and the source closed;
- however the stream ends, ``source.aclose`` runs last, shielded from cancellation.

No Ray, no vLLM: unit tests drive it with a fake ``receive``/``send``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse

from engine.config import RequestLimits
from engine.intake import body_too_large, check_body_size

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

SSE_CONTENT_TYPE = b"text/event-stream; charset=utf-8"  # as Starlette's StreamingResponse


async def read_body(receive: Receive, headers: Mapping[str, str], limits: RequestLimits) -> bytes:
    """The request body, refused (413) as soon as it passes the cap, declared or not (a
    chunked upload is never read whole); ``ClientDisconnect`` if the client leaves first."""
    check_body_size(headers, limits)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise body_too_large(size, limits)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def wait_for_disconnect(receive: Receive) -> None:
    """Return once the client has gone (its request body already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def send_json(
    scope: Scope,
    receive: Receive,
    send: Send,
    body: Any,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> None:
    """One JSON response, rendered exactly as FastAPI's routes render theirs."""
    await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)


async def stream_events(
    send: Send,
    receive: Receive,
    events: AsyncIterator[str],
    on_close: Callable[[], Awaitable[None]],
    headers: Mapping[str, str],
) -> None:
    """Send ``events`` as an SSE response (200) while watching for a hang-up. Ends when the
    events do or the client goes; either way ``events`` is closed and ``on_close`` awaited."""
    raw_headers = [(b"content-type", SSE_CONTENT_TYPE)]
    raw_headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    pump = asyncio.ensure_future(_pump(send, events, raw_headers))
    gone = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait((pump, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not pump.done():  # the client went away (or this task was cancelled)
            pump.cancel()
            await asyncio.wait((pump,))
        # Shielded: a cancellation of this task must not skip closing the request.
        try:
            await asyncio.shield(events.aclose())
        finally:
            await asyncio.shield(on_close())
    if not pump.cancelled() and pump.exception() is not None:
        raise pump.exception()


async def _pump(send: Send, events: AsyncIterator[str], raw_headers: list) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": raw_headers})
    async for event in events:
        await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
