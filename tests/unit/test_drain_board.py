"""The drain coordinator (engine.lifecycle.Lifecycle): a stop waits for the live ingress
replicas to drain, never for one that died. A replica killed and replaced by Ray Serve
stayed registered as not drained, and every later stop waited the whole drain timeout
(600 s by default) with nothing in flight."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

from engine.lifecycle import Lifecycle


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_replica_that_died_does_not_hold_the_stop():
    async def scenario() -> tuple[dict, float]:
        board = Lifecycle()
        await board.register("killed", _dead_pid())
        await board.register("live", 1)  # PID 1 lives as long as the machine
        await board.drain()
        started = time.monotonic()
        waiting = asyncio.ensure_future(board.wait_drained(timeout_s=30, poll_s=0.05))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # the live one has not drained yet
        await board.drained("live")
        return await waiting, time.monotonic() - started

    left, took_s = asyncio.run(scenario())
    assert left == {"killed": True, "live": True}
    assert took_s < 5


def test_a_live_replica_that_never_drains_holds_the_stop_until_the_timeout():
    async def scenario() -> dict:
        board = Lifecycle()
        await board.register("stuck", 1)
        return await board.wait_drained(timeout_s=0.3, poll_s=0.05)

    assert asyncio.run(scenario()) == {"stuck": False}
