"""Ray's daemons kept off the cores the engine computes on.

vLLM's CPU worker binds its compute threads to every core but one (the one it leaves for its
scheduler and the HTTP side). Ray's daemons (GCS, raylet, agents, Serve's controller and
proxy, the drain coordinator, the server's own process) wake about 1,250 times a second when
idle, where vLLM's own server wakes 11 times; on a 2-core machine the kernel puts many of
those wake-ups on the worker's core, in the middle of an engine step. Once the engines are up,
``keep_daemons_off_engine_cores`` binds every thread of those processes to the cores no
engine worker is bound to (BENCHMARKS.md has what it bought). Processes Ray starts later
inherit that binding from the raylet, so a replica takes the server's cores back when it
starts (``take_server_cores``), before it starts an engine. Where the workers are not bound
to cores (vLLM on a GPU), nothing changes.

Linux only (``os.sched_setaffinity``); elsewhere both are no-ops.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

SERVER_CPUS_ENV = "QWEN3VL_SERVER_CPUS"  # the cores the server was given, for its replicas
ENGINE_WORKER = "VLLM::Worker"  # vLLM's process title for a worker
# On the request path: never moved. The proxy actor joins them when it is the ingress.
HOT = ("ServeReplica", "VLLM::", "EngineCore", "haproxy")


def _supported() -> bool:
    return hasattr(os, "sched_setaffinity")


def _command(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def _bind(pid: int, cores: set[int]) -> bool:
    """Every thread of ``pid`` onto ``cores`` (threads it starts later inherit it)."""
    bound = False
    try:
        threads = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:  # gone
        return False
    for tid in threads:
        try:
            os.sched_setaffinity(tid, cores)
            bound = True
        except OSError:  # gone meanwhile, or not ours
            pass
    return bound


def engine_cores(pids: Iterable[int]) -> set[int]:
    """The cores vLLM bound its workers among ``pids`` to (empty where it bound none)."""
    cores: set[int] = set()
    for pid in pids:
        if ENGINE_WORKER in _command(pid):
            try:
                cores |= os.sched_getaffinity(pid)
            except OSError:
                continue
    return cores


def remember_server_cores() -> None:
    """Put the cores this server may use into the environment its Ray processes inherit."""
    if _supported():
        cores = os.sched_getaffinity(0)
        os.environ[SERVER_CPUS_ENV] = ",".join(str(c) for c in sorted(cores))


def keep_daemons_off_engine_cores(pids: list[int], proxy_is_ingress: bool = False) -> list[int]:
    """Bind those of the server's processes ``pids`` that are not on the request path (see
    ``HOT``) to the cores its engine workers are not bound to; the PIDs bound. Nothing where
    the workers are bound to every core, or where they leave none free."""
    if not _supported():
        return []
    hot = HOT + (("ProxyActor",) if proxy_is_ingress else ())
    allowed = _server_cores() or os.sched_getaffinity(0)
    engine = engine_cores(pids) & allowed
    spare = allowed - engine
    if not engine or not spare:
        return []
    return [pid for pid in pids if not any(m in _command(pid) for m in hot) and _bind(pid, spare)]


def _server_cores() -> set[int]:
    listed = os.environ.get(SERVER_CPUS_ENV, "")
    return {int(c) for c in listed.split(",") if c}


def take_server_cores() -> None:
    """This process's threads back onto every core the server was given: Ray starts a
    replica from a raylet that may have been kept off the engine's cores."""
    if _supported() and (cores := _server_cores()):
        _bind(os.getpid(), cores)
