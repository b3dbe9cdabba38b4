"""Load-based fallback, admission control, deadlines and cancellation on the live stack.

The session server runs two tiny engines: the primary saturates at 4 requests in flight
and queues at most 16 more; the fallback runs 8 and queues 8 (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    CONTEXT,
    FALLBACK,
    FALLBACK_QUEUE,
    FALLBACK_SEQS,
    MODEL,
    PRIMARY_QUEUE,
    PRIMARY_SEQS,
)
from tests.utils import data_url, encode, image_message, noise_image

pytestmark = pytest.mark.slow
URL = data_url(encode(noise_image(96, 96, seed=9)))
CAPACITY = PRIMARY_SEQS + PRIMARY_QUEUE + FALLBACK_SEQS + FALLBACK_QUEUE
BURST_TOKENS = 1000  # long enough that a whole burst is in flight at once


def _body(max_tokens: int = 48, **extra) -> dict:
    return {
        "model": MODEL,
        "messages": image_message(URL),
        "max_tokens": max_tokens,
        "ignore_eos": True,
        **extra,
    }


def _samples(base_url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(base_url + "/metrics", timeout=30).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples, name: str, **labels) -> float:
    return sum(
        v
        for (n, ls), v in samples.items()
        if n == name and all(dict(ls).get(k) == val for k, val in labels.items())
    )


def _wait_idle(base_url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s = _samples(base_url)
        if (
            _value(s, "qwen3vl_in_flight_requests") == 0
            and _value(s, "vllm:num_requests_running") == 0
        ):
            return
        time.sleep(0.5)
    raise AssertionError("server did not go idle")


async def _burst(base_url: str, n_normal: int, n_strict: int) -> tuple[list, list]:
    async with httpx.AsyncClient(
        base_url=base_url, timeout=300, limits=httpx.Limits(max_connections=200)
    ) as http:

        async def send(strict: bool):
            headers = {"x-allow-fallback": "false"} if strict else {}
            response = await http.post(
                "/v1/chat/completions", json=_body(BURST_TOKENS), headers=headers
            )
            return response.status_code, dict(response.headers), response.json()

        normal = [send(False) for _ in range(n_normal)]
        strict = [send(True) for _ in range(n_strict)]
        results = await asyncio.gather(*normal, *strict)
    return list(results[:n_normal]), list(results[n_normal:])


def test_burst_overflows_to_fallback_and_strict_requests_get_429(server):
    _wait_idle(server.base_url)
    before = _samples(server.base_url)
    normal, strict = asyncio.run(_burst(server.base_url, n_normal=CAPACITY - 4, n_strict=6))
    assert all(status == 200 for status, _, _ in normal), [r[2] for r in normal if r[0] != 200]
    served = [headers["x-served-model"] for _, headers, _ in normal]
    assert all(h["x-served-model"] == body["model"] for _, h, body in normal)
    assert served.count(FALLBACK) >= 1 and served.count(MODEL) >= PRIMARY_SEQS
    rejected = [(h, body) for status, h, body in strict if status == 429]
    assert rejected, "strict requests during the burst should be refused, not substituted"
    for headers, body in rejected:
        assert headers["retry-after"] == "1" and body["error"]["code"] == "saturated_strict"
    assert all(h["x-served-model"] == MODEL for status, h, _ in strict if status == 200)

    _wait_idle(server.base_url)
    after = _samples(server.base_url)
    fallbacks = _value(after, "qwen3vl_fallbacks_total", served_model=FALLBACK) - _value(
        before, "qwen3vl_fallbacks_total", served_model=FALLBACK
    )
    assert fallbacks == served.count(FALLBACK)
    strict_429 = _value(after, "qwen3vl_rejections_total", reason="saturated_strict") - _value(
        before, "qwen3vl_rejections_total", reason="saturated_strict"
    )
    assert strict_429 == len(rejected)
    served_ok = _value(
        after, "qwen3vl_requests_total", served_model=FALLBACK, status="200"
    ) - _value(before, "qwen3vl_requests_total", served_model=FALLBACK, status="200")
    assert served_ok == served.count(FALLBACK)
    assert _value(after, "qwen3vl_model_saturated", model=MODEL) == 0

    # The burst is over: routing is back on the primary, even for strict requests.
    again = httpx.post(
        server.base_url + "/v1/chat/completions",
        json=_body(4),
        headers={"x-allow-fallback": "false"},
        timeout=60,
    )
    assert again.status_code == 200 and again.headers["x-served-model"] == MODEL


def test_full_queues_give_429_with_retry_after_never_5xx(server):
    _wait_idle(server.base_url)
    normal, _ = asyncio.run(_burst(server.base_url, n_normal=2 * CAPACITY, n_strict=0))
    statuses = [status for status, _, _ in normal]
    assert all(s in (200, 429) for s in statuses), statuses
    refused = [(h, b) for s, h, b in normal if s == 429]
    assert refused and all(
        b["error"]["code"] == "queue_full" and h["retry-after"] == "1" for h, b in refused
    )
    assert statuses.count(200) >= CAPACITY - 4
    _wait_idle(server.base_url)


def test_strict_mode_by_body_field(server):
    _wait_idle(server.base_url)
    response = httpx.post(
        server.base_url + "/v1/chat/completions", json=_body(4, allow_fallback=False), timeout=60
    )
    assert response.status_code == 200 and response.json()["model"] == MODEL


def _running(base_url: str, model: str) -> float:
    return _value(_samples(base_url), "vllm:num_requests_running", model_name=model)


def _wait_running(base_url: str, model: str, predicate, timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        running = _running(base_url, model)
        if predicate(running):
            return time.monotonic()
        time.sleep(0.2)
    raise AssertionError(f"vllm:num_requests_running for {model} stayed {running}")


LONG = CONTEXT - 200  # tokens: seconds of generation even for the tiny model


def _generated(base_url: str) -> float:
    """Tokens the primary's engine has generated so far (vLLM's own counter)."""
    return _value(_samples(base_url), "vllm:generation_tokens_total", model_name=MODEL)


def _assert_aborted_early(base_url: str, generated_before: float) -> None:
    """The engine stopped the request: running is back to 0 and it generated fewer than the
    LONG tokens it was asked for (vLLM does not count client aborts in its
    request_success counter, so the token counter is the engine-side proof)."""
    _wait_running(base_url, MODEL, lambda r: r == 0, timeout_s=3)
    _wait_idle(base_url)
    generated = _generated(base_url) - generated_before
    # With ignore_eos a request that is not aborted generates exactly LONG tokens.
    assert 0 < generated < LONG, f"the engine generated {generated} of {LONG} tokens"


def _send_raw(base_url: str, body: dict) -> socket.socket:
    """POST on a plain socket: the test decides to the millisecond when the client hangs up
    (a client library closes its socket on its own schedule: on a timeout, or when the
    exception that holds it is collected)."""
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    payload = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload
    )
    return sock


def _engine_gauge(base_url: str, name: str) -> float:
    """One of the primary engine's metrics, read with a bare socket and a regex: cheap for a
    client that shares two cores with a busy engine."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        text = b"".join(iter(lambda: sock.recv(1 << 16), b"")).decode()
    pattern = rf'^{re.escape(name)}{{[^}}]*model_name="{MODEL}"[^}}]*}} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, text, re.MULTILINE))


def _hang_up_and_measure(base_url: str, sock: socket.socket, generated_before: float) -> None:
    """Close the connection, then check that the engine stops the request within about a
    second and report how many tokens it generated after the hang-up."""
    at_hang_up = _engine_gauge(base_url, "vllm:generation_tokens_total")
    sock.close()
    hung_up = time.monotonic()
    while _engine_gauge(base_url, "vllm:num_requests_running") > 0:
        assert time.monotonic() - hung_up < 5, "the engine request is still running"
    stopped = time.monotonic()
    _wait_idle(base_url)
    total = _generated(base_url) - generated_before
    after = _generated(base_url) - at_hang_up
    print(f"stopped {stopped - hung_up:.2f}s after the hang-up; {after:.0f} tokens after it")
    assert stopped - hung_up < 1.5, f"the engine ran {stopped - hung_up:.1f}s after the hang-up"
    # With ignore_eos a request that is not aborted generates exactly LONG tokens.
    assert 0 < total < LONG, (
        f"the engine generated {total} of {LONG} tokens, {at_hang_up - generated_before:.0f} "
        "of them before the hang-up"
    )


def test_client_disconnect_mid_stream_aborts_the_engine_request(server):
    _wait_idle(server.base_url)
    generated_before = _generated(server.base_url)
    gone_before = _value(_samples(server.base_url), "qwen3vl_requests_total", status="499")
    sock = _send_raw(server.base_url, _body(LONG, stream=True, allow_fallback=False))
    received = b""
    while b'"content"' not in received:  # hang up right after the first token's event
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the stream: {received[-300:]!r}"
        received += chunk
    assert received.startswith(b"HTTP/1.1 200") and f"x-served-model: {MODEL}".encode() in received
    _hang_up_and_measure(server.base_url, sock, generated_before)
    gone = _value(_samples(server.base_url), "qwen3vl_requests_total", status="499")
    assert gone == gone_before + 1, "the hang-up is counted as status 499"


def test_client_disconnect_non_streaming_aborts_the_engine_request(server):
    _wait_idle(server.base_url)
    generated_before = _generated(server.base_url)
    gone_before = _value(_samples(server.base_url), "qwen3vl_requests_total", status="499")
    sock = _send_raw(server.base_url, _body(LONG, allow_fallback=False))
    sent = time.monotonic()  # hang up as soon as the engine is generating (it can be fast)
    while _engine_gauge(server.base_url, "vllm:num_requests_running") < 1:
        assert time.monotonic() - sent < 30, "the request never started"
    _hang_up_and_measure(server.base_url, sock, generated_before)
    gone = _value(_samples(server.base_url), "qwen3vl_requests_total", status="499")
    assert gone == gone_before + 1, "the hang-up is counted as status 499"


def test_deadline_header_gives_504_and_aborts(server):
    _wait_idle(server.base_url)
    generated_before = _generated(server.base_url)
    started = time.monotonic()
    response = httpx.post(
        server.base_url + "/v1/chat/completions",
        json=_body(LONG, allow_fallback=False),
        headers={"x-request-timeout-s": "0.3"},
        timeout=60,
    )
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "deadline_exceeded"
    assert time.monotonic() - started < 10
    _assert_aborted_early(server.base_url, generated_before)


def test_bad_deadline_header_is_a_400(server):
    response = httpx.post(
        server.base_url + "/v1/chat/completions",
        json=_body(2),
        headers={"x-request-timeout-s": "soon"},
        timeout=60,
    )
    assert (
        response.status_code == 400 and response.json()["error"]["param"] == "x-request-timeout-s"
    )


def test_ray_serves_own_timeout_header_does_not_cut_a_request_short(server):
    """The deadline is ours (engine/serve_http.py): Ray Serve's header would answer a plain-text
    408 after 50 ms, and a request that carries it would take Serve's slower path."""
    started = time.monotonic()
    response = httpx.post(
        server.base_url + "/v1/chat/completions",
        json=_body(256, allow_fallback=False),
        headers={"x-request-timeout-seconds": "0.05"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 256
    assert time.monotonic() - started > 0.05  # long enough for Ray's timeout to have fired
