"""A server in a subprocess: start it, wait for ``/health``, stop it the way Kubernetes does.

The one launcher behind the test fixture, the harness's ``compare --variants`` and the
benchmark scripts, so each of them starts and stops servers alike.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from bench.cpu_account import read_stat
from engine.lifecycle import (  # free_port: one helper; tests import it from here
    INSTANCE_ENV,
    free_port,  # noqa: F401
    processes_of,
)

REPO = Path(__file__).resolve().parent.parent


# Process states in /proc/PID/stat that run no more: stopped, traced, zombie, dead; None: gone.
_HALTED = frozenset({"T", "t", "Z", "X", None})


def process_state(pid: int) -> str | None:
    """The state letter of ``/proc/PID/stat`` (R, S, T, ...); None once the process is gone."""
    read = read_stat(pid)
    return None if read is None else read[1][0]


def engine_command(profile: Path, port: int | None = None) -> list[str]:
    """The engine CLI serving ``profile`` (the same command a user or a pod runs)."""
    command = [sys.executable, "-m", "engine", "serve", "--config", str(profile)]
    return command + (["--port", str(port)] if port is not None else [])


class ServerProcess:
    """``command`` in its own process group, logging to ``log_path``; ready once
    ``base_url/health`` answers 200. Fails fast, with the log's tail, if the process dies."""

    def __init__(
        self,
        command: list[str],
        base_url: str,
        log_path: Path,
        env: dict[str, str] | None = None,
        timeout_s: float = 900,
        cwd: Path = REPO,
    ) -> None:
        self.base_url = base_url
        self.log_path = log_path
        # Every process of the server carries it, also those outside its process group
        # (Ray's agents, HAProxy): engine.lifecycle finds them by it. A caller's id wins.
        self.instance = (env or {}).get(INSTANCE_ENV) or uuid.uuid4().hex
        _wait_port_free(base_url)
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = {
            **os.environ,
            "QWEN3VL_RAY_LOGS": "0",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
            INSTANCE_ENV: self.instance,
        }
        started = time.monotonic()
        # A process group of its own (one signal reaches the whole server), in the caller's
        # session: Linux's autogroup scheduling shares the CPU equally between sessions, so a
        # new session would ignore a lower priority given to the server.
        self.proc = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            process_group=0,
        )
        try:
            self._wait_healthy(timeout_s)
        except BaseException:
            self.stop()
            raise
        self.ready_s = time.monotonic() - started

    def _wait_healthy(self, timeout_s: float) -> None:
        from engine.lifecycle import wait_for_health

        def alive() -> None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")

        try:
            wait_for_health(self.base_url + "/health", timeout_s, check=alive)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}:\n{self.log_tail()}") from None

    def pause(self, timeout_s: float = 10) -> None:
        """SIGSTOP every process of the server and wait until each has stopped (the signal
        lands asynchronously, later on a busy machine): from then on the server uses no CPU
        until ``resume``."""
        pending = set(self._signal_all(signal.SIGSTOP))
        deadline = time.monotonic() + timeout_s
        while pending:
            pending = {pid for pid in pending if process_state(pid) not in _HALTED}
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"processes {sorted(pending)} did not stop on SIGSTOP")
            if pending:
                time.sleep(0.005)

    def resume(self) -> None:
        self._signal_all(signal.SIGCONT)

    def _signal_all(self, sig: signal.Signals) -> list[int]:
        signalled = []
        for pid in processes_of(self.instance, group=self.proc.pid):
            with contextlib.suppress(ProcessLookupError):  # gone meanwhile
                os.kill(pid, sig)
                signalled.append(pid)
        return signalled

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout_s: float = 120) -> int | None:
        """SIGTERM, then wait; the exit code, or None if it had to be killed."""
        code: int | None = None
        self.resume()  # a paused process would take SIGTERM only once continued
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        else:
            code = self.proc.returncode
        self._log.close()
        return code

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _wait_port_free(base_url: str, timeout_s: float = 90) -> None:
    """Wait until ``base_url``'s port can be bound without SO_REUSEADDR, as vLLM's server
    binds it too (``engine.lifecycle.wait_port_bindable``)."""
    from engine.lifecycle import wait_port_bindable

    parts = urlsplit(base_url)
    wait_port_bindable(parts.hostname, parts.port, timeout_s)
