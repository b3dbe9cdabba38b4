"""The raw ASGI chat path (engine.asgi) against a fake connection: bodies within their cap,
SSE framing, and a hang-up that ends the stream and closes the request at once."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import ClientDisconnect

from engine import asgi
from engine.config import RequestLimits
from engine.errors import RequestError


class Connection:
    """A client as uvicorn presents it: body messages, then (optionally) a hang-up once
    ``hang_up`` is set; a receive after the response completed says disconnect."""

    def __init__(self, body_chunks: list[bytes] = ()) -> None:  # streams: body already read
        self.incoming = [
            {"type": "http.request", "body": c, "more_body": i < len(body_chunks) - 1}
            for i, c in enumerate(body_chunks)
        ]
        self.sent: list[dict] = []
        self.hang_up = asyncio.Event()
        self.complete = asyncio.Event()

    async def receive(self) -> dict:
        if self.incoming:
            return self.incoming.pop(0)
        hang_up = asyncio.ensure_future(self.hang_up.wait())
        complete = asyncio.ensure_future(self.complete.wait())
        try:
            await asyncio.wait((hang_up, complete), return_when=asyncio.FIRST_COMPLETED)
        finally:
            hang_up.cancel()
            complete.cancel()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            self.complete.set()

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


class Source:
    """A stream's events and its close, recording how it ended."""

    def __init__(self, events: int, gap_s: float = 0.0) -> None:
        self.events, self.gap_s = events, gap_s
        self.produced = 0
        self.finally_ran = self.closed = 0

    async def stream(self):
        try:
            for i in range(self.events):
                await asyncio.sleep(self.gap_s)
                self.produced += 1
                yield f"data: {i}\n\n"
        finally:
            self.finally_ran += 1  # where the service aborts an unfinished engine request

    async def aclose(self) -> None:
        self.closed += 1


def _run_stream(connection: Connection, source: Source, hang_up_after: int | None = None):
    async def main():
        events = source.stream()
        task = asyncio.ensure_future(
            asgi.stream_events(
                connection.send, connection.receive, events, source.aclose, {"x-served-model": "m"}
            )
        )
        if hang_up_after is not None:
            while source.produced < hang_up_after:
                await asyncio.sleep(0.001)
            connection.hang_up.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())


def test_a_stream_is_every_event_in_order_then_the_end():
    connection, source = Connection(), Source(5)
    _run_stream(connection, source)
    start = connection.sent[0]
    assert start["type"] == "http.response.start" and start["status"] == 200
    assert (b"content-type", asgi.SSE_CONTENT_TYPE) in start["headers"]
    assert (b"x-served-model", b"m") in start["headers"]
    bodies = connection.sent[1:]
    assert [m["body"] for m in bodies] == [f"data: {i}\n\n".encode() for i in range(5)] + [b""]
    assert [m["more_body"] for m in bodies] == [True] * 5 + [False]
    assert source.finally_ran == 1 and source.closed == 1


def test_a_hang_up_mid_stream_ends_it_and_closes_the_request_at_once():
    connection, source = Connection(), Source(10_000, gap_s=0.001)
    _run_stream(connection, source, hang_up_after=3)
    assert source.produced < 100  # stopped within a few events of the hang-up
    assert source.finally_ran == 1 and source.closed == 1
    assert connection.sent[-1].get("more_body", False) is True  # no end was sent to nobody


def test_a_cancelled_stream_still_closes_its_request():
    connection, source = Connection(), Source(10_000, gap_s=0.001)

    async def main():
        task = asyncio.ensure_future(
            asgi.stream_events(
                connection.send, connection.receive, source.stream(), source.aclose, {}
            )
        )
        while source.produced < 2:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert source.finally_ran == 1 and source.closed == 1


def test_an_error_in_the_events_reaches_the_caller_after_the_request_is_closed():
    connection = Connection()
    closed = []

    async def events():
        yield "data: 0\n\n"
        raise OSError("socket gone")

    async def on_close():
        closed.append(True)

    with pytest.raises(OSError):
        asyncio.run(asgi.stream_events(connection.send, connection.receive, events(), on_close, {}))
    assert closed == [True]


def test_a_body_in_chunks_is_read_whole():
    connection = Connection([b'{"a":', b" 1", b"}"])
    body = asyncio.run(asgi.read_body(connection.receive, {}, RequestLimits()))
    assert body == b'{"a": 1}'


@pytest.mark.parametrize("declared", [True, False])
def test_a_body_over_the_cap_is_a_413_before_it_is_read_whole(declared):
    limits = RequestLimits(max_body_bytes=10)
    connection = Connection([b"x" * 6, b"x" * 6, b"never read"])
    headers = {"content-length": "18"} if declared else {}
    with pytest.raises(RequestError) as info:
        asyncio.run(asgi.read_body(connection.receive, headers, limits))
    assert info.value.status_code == 413
    assert len(connection.incoming) == (3 if declared else 1)


def test_a_client_that_leaves_mid_upload_is_a_disconnect():
    connection = Connection([b"x"])
    connection.incoming[0]["more_body"] = True
    connection.hang_up.set()
    with pytest.raises(ClientDisconnect):
        asyncio.run(asgi.read_body(connection.receive, {}, RequestLimits()))
