"""On the live test server: Ray's daemons run on the cores vLLM left free of its workers,
and the request path (the replicas, the engine cores) on every core (engine.cpus)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from engine.cpus import ENGINE_WORKER
from engine.lifecycle import processes_of


def _commands(instance: str) -> dict[int, str]:
    found = {}
    for pid in processes_of(instance):
        try:
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
    return found


def test_ray_daemons_run_off_the_engine_workers_cores(server):
    allowed = os.sched_getaffinity(0)
    commands = _commands(server.instance)
    workers = [pid for pid, command in commands.items() if ENGINE_WORKER in command]
    assert len(workers) == 2, commands  # the primary's and the fallback's
    engine = set().union(*(os.sched_getaffinity(pid) for pid in workers))
    assert engine < allowed, "vLLM on CPU binds its workers to all cores but one"
    daemons = {
        pid: command
        for pid, command in commands.items()
        if any(m in command for m in ("raylet", "gcs_server", "ServeController", "Lifecycle"))
    }
    assert len(daemons) >= 4, commands
    deadline = time.monotonic() + 30  # bound right after /health answered
    while time.monotonic() < deadline:
        if all(os.sched_getaffinity(pid) == allowed - engine for pid in daemons):
            break
        time.sleep(0.5)
    assert {
        command.split()[0]: sorted(os.sched_getaffinity(pid)) for pid, command in daemons.items()
    } == {command.split()[0]: sorted(allowed - engine) for command in daemons.values()}
    hot = [p for p, c in commands.items() if "ServeReplica" in c or "EngineCore" in c]
    assert len(hot) >= 3, commands  # the ingress replica, the fallback's, two engine cores
    assert all(os.sched_getaffinity(pid) == allowed for pid in hot)
