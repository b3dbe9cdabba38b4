"""A restarted server can bind its port at once: the health probe closes its own end first
(engine.lifecycle), so no TIME_WAIT is left on the server's port, which Ray Serve's direct
ingress binds without SO_REUSEADDR."""

from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest

from engine import lifecycle


class _Health(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn answers
    asked: list[str | None] = []  # each request's Connection header

    def do_GET(self) -> None:
        self.asked.append(self.headers.get("Connection"))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args) -> None:
        pass


def _probe_then_stop(probe) -> int:
    """Serve /health on a fresh port, run ``probe(url)`` once, stop the server; the port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert probe(f"http://127.0.0.1:{port}/health")
    finally:
        server.shutdown()
        server.server_close()  # joins the handler threads: every server-side socket closed
    return port


def _bindable(port: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while True:
        with socket.socket() as s:  # no SO_REUSEADDR, as Ray's direct ingress binds
            try:
                s.bind(("127.0.0.1", port))
                return True
            except OSError:
                if time.monotonic() > deadline:
                    return False
        time.sleep(0.05)


def test_the_health_probe_keeps_the_connection_for_itself_to_close():
    _Health.asked.clear()
    port = _probe_then_stop(lambda url: lifecycle._answers_200(url, timeout_s=5))
    # urllib asks "Connection: close", and uvicorn then closes first: its end of the
    # connection sits in TIME_WAIT on the API port for 60 s (seen: two per server start).
    assert _Health.asked == [None]
    assert _bindable(port, within_s=2)


def test_wait_port_bindable_waits_for_a_listener_to_go_and_reports_it_once():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    waits: list[float] = []
    threading.Timer(0.6, listener.close).start()
    started = time.monotonic()
    lifecycle.wait_port_bindable("127.0.0.1", port, timeout_s=10, on_wait=lambda: waits.append(1))
    assert 0.5 < time.monotonic() - started < 5
    assert waits == [1]
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        with pytest.raises(TimeoutError, match=str(held.getsockname()[1])):
            lifecycle.wait_port_bindable("127.0.0.1", held.getsockname()[1], timeout_s=0.3)
