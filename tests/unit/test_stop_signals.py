"""Stop signals in bursts never hang the server (engine.lifecycle.StopSignals): the handler
takes no lock, so a signal that lands inside another handler, or inside a lock the main
thread holds, cannot wait on itself. A handler that set a threading.Event did: ``pkill``
reached the supervisor (which passes the signal on) and the server together, and the server
hung in its own handler with every process up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from engine.lifecycle import StopSignals

REPO = Path(__file__).resolve().parents[2]

# The server's shape: the main thread waits on an Event in short waits while signals land
# (the kernel may hand a signal to the relay thread: a wait without a timeout would not end
# for it, as one run of this test showed); the first signal sets ``stopping``, every later
# one ``forced``.
_CHILD = textwrap.dedent(
    """
    import signal, sys, threading, time
    from engine.lifecycle import StopSignals

    stopping, forced = threading.Event(), threading.Event()
    signals = StopSignals(stopping.set, forced.set)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signals.handler)
    print("ready", flush=True)
    deadline = time.monotonic() + 20
    while not forced.wait(0.25) and time.monotonic() < deadline:  # as the server waits
        pass
    print("stopping" if stopping.is_set() else "-", "forced" if forced.is_set() else "hung")
    """
)


def test_first_signal_then_every_later_one_reach_their_callbacks():
    calls: list[str] = []
    both = threading.Event()

    def again() -> None:
        calls.append("again")
        both.set()

    signals = StopSignals(lambda: calls.append("first"), again)
    signals.handler(signal.SIGTERM)
    signals.handler(signal.SIGINT)
    assert both.wait(5)
    assert calls == ["first", "again"]


def test_a_burst_of_signals_stops_the_process_every_time():
    # SIGTERM and SIGINT alternating, 300 as fast as os.kill goes, 20 processes in turn.
    # The Event-setting handler this replaced hung in 1 of 10 such bursts (2-core machine).
    for _ in range(20):
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, text=True, cwd=REPO
        )
        assert child.stdout.readline().strip() == "ready"
        for i in range(300):
            os.kill(child.pid, (signal.SIGTERM, signal.SIGINT)[i % 2])
        try:
            out, _ = child.communicate(timeout=25)
        finally:
            child.kill()
        assert out.split() == ["stopping", "forced"], out


def test_a_free_port_is_never_one_already_spoken_for(monkeypatch):
    """The API port is free until the replica binds it: the Serve proxy actor's port (picked
    from the same range) must not be it, or the replica cannot start (seen in CI)."""
    from engine import lifecycle

    first = next(p for p in range(24000, 32000, 2) if _bindable(p) and _bindable(p + 1))
    monkeypatch.setattr(lifecycle, "_PORTS", range(first, first + 2))
    assert {lifecycle.free_port() for _ in range(50)} == {first, first + 1}  # both free
    assert {lifecycle.free_port(avoid={first}) for _ in range(50)} == {first + 1}


def _bindable(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_haproxy_ports_differ_from_the_api_port_and_each_other():
    from engine.__main__ import haproxy_env

    env = haproxy_env(8000)
    ports = {8000, int(env["RAY_SERVE_HAPROXY_STATS_PORT"])}
    ports.add(int(env["RAY_SERVE_HAPROXY_METRICS_PORT"]))
    assert len(ports) == 3
