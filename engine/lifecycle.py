"""A server's life after start-up: drain on SIGTERM, and no process left behind.

A server's processes are found two ways, both of which survive re-parenting: Ray's workers
(Serve's controller and replicas, HAProxy, vLLM's engine core and workers) inherit
``QWEN3VL_INSTANCE=<id>`` from the server's environment; Ray's head processes (GCS, raylet, and
the dashboard and runtime-env agents, which the raylet starts with an environment of its own)
stay in the server's process group. Also after the CLI itself was SIGKILLed:

- ``start_reaper`` starts a small watcher in a session of its own (signals to the server's
  process group do not reach it). When the CLI process ends, however it ends, the watcher
  SIGTERMs every process of the server, SIGKILLs what is left after a grace period, and exits.
- ``Lifecycle`` is a named Ray actor the ingress replicas follow: on SIGTERM the CLI calls
  ``drain``; each replica then answers 503 to new requests and to /health (the readiness probe
  drops the pod), lets its in-flight requests and streams finish (up to the drain timeout),
  and reports; the CLI shuts down once every replica has reported or the timeout passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Collection
from pathlib import Path
from urllib.parse import urlsplit

INSTANCE_ENV = "QWEN3VL_INSTANCE"
LIFECYCLE_ACTOR = "qwen3vl-lifecycle"
LIFECYCLE_NAMESPACE = "qwen3vl"


def instance_id() -> str:
    """This server's id, put into the environment every child process inherits. A caller may
    set it beforehand (tests and supervisors use it to find the server's processes)."""
    return os.environ.setdefault(INSTANCE_ENV, uuid.uuid4().hex)


def processes_of(instance: str, group: int | None = None) -> list[int]:
    """PIDs of the live processes that carry ``instance`` in their environment or belong to
    process group ``group`` (this process not)."""
    marker = f"{INSTANCE_ENV}={instance}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        try:
            ours = (group is not None and os.getpgid(pid) == group) or marker in (
                entry / "environ"
            ).read_bytes().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        if ours:
            found.append(pid)
    return found


def terminate(instance: str, group: int | None = None, grace_s: float = 5.0) -> list[int]:
    """SIGTERM every process of ``instance`` (and of process group ``group``), SIGKILL those
    still there after ``grace_s``; return the PIDs that had to be killed."""
    for pid in processes_of(instance, group):
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while (left := processes_of(instance, group)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        _signal(pid, signal.SIGKILL)
    # A killed process holds its sockets (the API port) until its exit is done, which for
    # gigabytes of address space takes a moment: return only once they are gone.
    deadline = time.monotonic() + grace_s
    while left and processes_of(instance, group) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def start_reaper(instance: str, group: int, grace_s: float = 5.0) -> subprocess.Popen:
    """Watch this process from a new session; when it ends, end all of ``instance`` and of
    process group ``group``."""
    env = {k: v for k, v in os.environ.items() if k != INSTANCE_ENV}  # not one of its own targets
    command = [
        sys.executable,
        "-m",
        "engine.lifecycle",
        str(os.getpid()),
        instance,
        str(group),
        str(grace_s),
    ]
    return subprocess.Popen(
        command,
        env=env,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
    )


def _reap_after(pid: int, instance: str, group: int, grace_s: float) -> None:
    try:
        watched = os.pidfd_open(pid)
    except ProcessLookupError:
        pass  # already gone
    else:
        select.select([watched], [], [])  # readable once the process has exited
    terminate(instance, group, grace_s)


class StopSignals:
    """What SIGINT/SIGTERM do, done outside the signal handler. Python runs a handler in the
    main thread between two bytecodes: inside another handler, or inside a lock the main
    thread holds. A handler that sets a ``threading.Event`` can so wait forever on that
    Event's own lock: two signals at once (``pkill`` reaching both the supervisor, which
    passes its signal on, and the server) left a server hung with every process up. The
    handler here only writes a byte to a pipe; a thread reads it and calls ``first`` on the
    first signal and ``again`` on every later one (both must return soon). The main thread
    must not block without a timeout: the kernel may hand the signal to another thread, and
    Python runs the handler only when the main thread next runs."""

    def __init__(self, first, again) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._calls = (first, again)
        threading.Thread(target=self._relay, name="stop-signals", daemon=True).start()

    def handler(self, signum: int, frame=None) -> None:
        with contextlib.suppress(BlockingIOError):  # a full pipe: enough signals pending
            os.write(self._write, b"s")

    def _relay(self) -> None:
        first, again = self._calls
        received = 0
        while os.read(self._read, 1):
            received += 1
            (first if received == 1 else again)()


class Lifecycle:
    """The drain coordinator (run as a named Ray actor, ``lifecycle_actor_class``): the
    ingress replicas register (with their PID), wait to be told to drain, and report once
    drained. A replica that died (killed, and replaced by Ray Serve) has nothing left to drain: it counts as
    drained, or every later stop would wait the whole drain timeout for it."""

    def __init__(self) -> None:
        self._draining = asyncio.Event()
        self._replicas: dict[str, bool] = {}  # replica -> drained
        self._pids: dict[str, int] = {}  # replica -> its process
        self._changed = asyncio.Condition()

    async def register(self, replica: str, pid: int) -> None:
        self._replicas.setdefault(replica, False)
        self._pids[replica] = pid

    async def wait_for_drain(self) -> None:
        await self._draining.wait()

    async def drain(self) -> None:
        self._draining.set()

    async def drained(self, replica: str) -> None:
        async with self._changed:
            self._replicas[replica] = True
            self._changed.notify_all()

    async def wait_drained(self, timeout_s: float, poll_s: float = 0.5) -> dict[str, bool]:
        """Until every registered replica has drained or died, at most ``timeout_s``."""
        end = time.monotonic() + timeout_s
        while True:
            for replica, pid in self._pids.items():
                if not _alive(pid):
                    self._replicas[replica] = True
            left = end - time.monotonic()
            if all(self._replicas.values()) or left <= 0:
                return dict(self._replicas)
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(poll_s, left))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's (the PID was reused)
        return True
    return True


def lifecycle_actor_class():
    """The drain coordinator as a Ray actor class (Ray imported only where it runs)."""
    import ray

    return ray.remote(num_cpus=0)(Lifecycle)


if __name__ == "__main__":  # the reaper: python -m engine.lifecycle PID INSTANCE GROUP GRACE_S
    _reap_after(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))


def wait_for_health(url: str, timeout_s: float, check=None) -> None:
    """Poll ``url`` until it answers 200, or raise after ``timeout_s``. ``check()``, if given,
    runs before every poll and raises to give up early (e.g. the server process died)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if check is not None:
            check()
        if _answers_200(url, timeout_s=5):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer 200 within {timeout_s:.0f}s")
        time.sleep(1)


def _answers_200(url: str, timeout_s: float) -> bool:
    """One GET, on a keep-alive connection that this side closes. A probe that asks the server
    to close (urllib sends ``Connection: close``) leaves the server's end in TIME_WAIT for 60 s,
    on the API port itself, and a server started there within that minute cannot bind it
    (``wait_port_bindable``)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    try:
        connection.request("GET", parts.path or "/")
        response = connection.getresponse()
        response.read()
        return response.status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def wait_port_bindable(host: str, port: int, timeout_s: float, on_wait=None) -> None:
    """Wait until ``port`` can be bound the way Ray Serve's direct ingress binds it (without
    SO_REUSEADDR): nothing listens there, and no connection whose server end closed first
    (a previous server's) lingers in TIME_WAIT, up to 60 s on Linux. ``on_wait()`` is called
    once if it has to wait; raise ``TimeoutError`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    waited = False
    while True:
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
                return
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"port {port} could not be bound within {timeout_s:.0f}s")
        if not waited and on_wait is not None:
            on_wait()
        waited = True
        time.sleep(0.5)


# Below the kernel's ephemeral range (32768-60999 on Linux) and above Ray's worker ports
# (10002-19999): a port the kernel hands out (port 0) can be taken, between this choice and
# the server binding it, by any of the dozens of sockets Ray and vLLM open as they start (a
# test server's replica once found its port held by one: "No available ports").
_PORTS = range(20000, 32768)


def free_port(host: str = "127.0.0.1", avoid: Collection[int] = ()) -> int:
    """A port nothing listens on now, outside the ranges that start-up grabs at random, and
    none of ``avoid`` (ports that are free now but spoken for, such as the API port before
    the replica binds it: a Serve proxy actor once took it, and the replica could not)."""
    for port in random.sample(_PORTS, min(200, len(_PORTS))):
        if port in avoid:
            continue
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port in {_PORTS.start}-{_PORTS.stop - 1}")
