"""The load generator: one aiohttp connection pool, streaming chat requests, per-token times.

Timing follows vLLM's benchmark client (``vllm/benchmarks/lib/endpoint_request_func.py``) so
the two agree: the clock starts just before the POST; every SSE message that carries
``choices`` is a token arrival (the first one is the TTFT); the usage message that ends a
stream is not; latency ends at the last token arrival. Output tokens come from the stream's
``usage`` (``stream_options.include_usage``), falling back to the number of token messages.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field

import aiohttp
from tqdm import tqdm

from bench.profiles import Stage
from bench.workload import RequestSpec


@dataclass
class RequestRecord:
    """What happened to one request; times in seconds, relative to its own send time
    unless named ``*_offset_s`` (relative to the start of its stage)."""

    index: int
    stage: str
    kind: str
    send_offset_s: float
    scheduled_offset_s: float | None = None
    done_offset_s: float | None = None  # when the client finished with it
    status: int = 0  # HTTP status; 0 when no response arrived (connection error)
    error: str | None = None
    served_model: str | None = None
    ttft_s: float | None = None
    latency_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None

    @property
    def success(self) -> bool:
        return self.status == 200 and self.ttft_s is not None and self.error is None

    @property
    def itl_s(self) -> list[float]:
        times = self.token_times_s
        return [b - a for a, b in zip(times, times[1:], strict=False)]

    def as_dict(self) -> dict:
        return asdict(self)


class StreamingClient:
    """Sends ``RequestSpec`` bodies to ``base_url``/v1/chat/completions, streaming."""

    def __init__(self, base_url: str, timeout_s: float = 600, headers: dict | None = None):
        self.url = base_url.rstrip("/") + "/v1/chat/completions"
        self.headers = headers or {}
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> StreamingClient:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60),
        )
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._session is not None
        await self._session.close()

    async def send(self, spec: RequestSpec, record: RequestRecord) -> RequestRecord:
        assert self._session is not None, "use `async with StreamingClient(...)`"
        body = {**spec.body, "stream": True, "stream_options": {"include_usage": True}}
        started = time.perf_counter()
        try:
            async with self._session.post(self.url, json=body, headers=self.headers) as response:
                record.status = response.status
                record.served_model = response.headers.get("x-served-model")
                if response.status != 200:
                    record.error = _error_message(await response.read()) or response.reason
                    return record
                await self._read_stream(response, started, record)
        except Exception as exc:  # the run goes on; the record says what broke
            record.error = f"{type(exc).__name__}: {exc}"
        return record

    @staticmethod
    async def _read_stream(response, started: float, record: RequestRecord) -> None:
        buffer = b""
        times = record.token_times_s
        usage_tokens = None
        async for chunk in response.content.iter_any():
            now = time.perf_counter() - started
            buffer += chunk
            *messages, buffer = buffer.split(b"\n\n")
            for message in messages:
                if not message.startswith(b"data: ") or message == b"data: [DONE]":
                    continue
                data = json.loads(message[6:])
                if data.get("choices"):
                    times.append(now)
                elif "error" in data:
                    record.error = str(data["error"].get("message", data["error"]))
                elif usage := data.get("usage"):
                    usage_tokens = usage.get("completion_tokens")
                    record.prompt_tokens = usage.get("prompt_tokens")
        if times:
            record.ttft_s, record.latency_s = times[0], times[-1]
        record.output_tokens = usage_tokens if usage_tokens is not None else len(times)
        if not times and record.error is None:
            record.error = "stream ended without a token"

    async def run_stage(
        self, stage: Stage, specs: list[RequestSpec], first_index: int = 0, progress: bool = True
    ) -> tuple[list[RequestRecord], float]:
        """Send ``stage.num_requests`` requests (cycling through ``specs``) on the stage's
        schedule and wait for all of them; returns the records and the stage's duration."""
        bar = tqdm(total=stage.num_requests, desc=stage.label, disable=not progress, leave=False)
        records: list[RequestRecord] = []
        started = time.perf_counter()

        async def one(i: int, scheduled: float | None) -> None:
            spec = specs[(first_index + i) % len(specs)]
            record = RequestRecord(
                first_index + i, stage.label, spec.kind, time.perf_counter() - started, scheduled
            )
            records.append(await self.send(spec, record))
            record.done_offset_s = time.perf_counter() - started
            bar.update(1)

        if stage.arrivals_s is not None:
            tasks = []
            for i, at in enumerate(stage.arrivals_s[: stage.num_requests]):
                while (delay := at - (time.perf_counter() - started)) > 0:
                    await asyncio.sleep(delay)  # the loop's timer may wake a little early
                tasks.append(asyncio.ensure_future(one(i, at)))
            await asyncio.gather(*tasks)
        else:
            next_index = iter(range(stage.num_requests))

            async def worker() -> None:
                for i in next_index:
                    await one(i, None)

            await asyncio.gather(*(worker() for _ in range(stage.concurrency or 1)))
        duration = time.perf_counter() - started
        bar.close()
        records.sort(key=lambda r: r.index)
        return records, duration


def aiohttp_session(base_url: str) -> aiohttp.ClientSession:
    """A pool as ``StreamingClient``'s, for callers that send their own bodies (the soak's
    malformed requests): aiohttp, as vLLM's benchmark client (httpx costs too much CPU here)."""
    return aiohttp.ClientSession(
        base_url=base_url,
        timeout=aiohttp.ClientTimeout(total=600),
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60),
    )


def _error_message(payload: bytes) -> str | None:
    try:
        error = json.loads(payload).get("error", {})
        return f"{error.get('type')}: {error.get('message')}"[:300]
    except (ValueError, AttributeError):
        return payload[:300].decode(errors="replace") or None


def run_async(coroutine):
    """Run on uvloop when it is installed (it is, with vLLM): less client CPU per request."""
    try:
        import uvloop

        return uvloop.run(coroutine)
    except ImportError:
        return asyncio.run(coroutine)
