"""Ray's daemons kept off the engine workers' cores (engine.cpus), on real processes: a
"worker" (a sleeper whose command line carries vLLM's process title) bound to core 0, a
daemon and a replica; then a replica started from a bound parent takes the server's cores
back. Needs 2 cores and Linux, as CI has."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from engine import cpus

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux CPU affinity and at least 2 cores",
)
SLEEP = "import time; time.sleep(60)"


def _sleeper(*title: str, **popen) -> subprocess.Popen:
    # the extra argv words show in /proc/PID/cmdline, as vLLM's and Ray's process titles do
    return subprocess.Popen([sys.executable, "-c", SLEEP, *title], **popen)


def _threads_cores(pid: int) -> set[frozenset[int]]:
    return {frozenset(os.sched_getaffinity(int(t))) for t in os.listdir(f"/proc/{pid}/task")}


def test_daemons_move_to_the_cores_the_workers_left_and_the_request_path_stays():
    allowed = os.sched_getaffinity(0)
    first = min(allowed)
    worker, daemon, replica, engine_core = (
        _sleeper("VLLM::Worker"),
        _sleeper("raylet"),
        _sleeper("ray::ServeReplica:qwen3vl:OpenAIServer"),
        _sleeper("VLLM::EngineCore"),
    )
    everyone = [worker, daemon, replica, engine_core]
    try:
        os.sched_setaffinity(worker.pid, {first})  # as vLLM binds its worker on CPU
        bound = cpus.keep_daemons_off_engine_cores([p.pid for p in everyone])
        assert bound == [daemon.pid]
        assert _threads_cores(daemon.pid) == {frozenset(allowed - {first})}
        for hot in (replica, engine_core):
            assert os.sched_getaffinity(hot.pid) == allowed
        assert os.sched_getaffinity(worker.pid) == {first}
    finally:
        for p in everyone:
            p.kill()
            p.wait()


def test_nothing_moves_where_the_workers_are_not_bound():
    # vLLM on a GPU: workers on every core, so no core is the engine's alone
    worker, daemon = _sleeper("VLLM::Worker"), _sleeper("gcs_server")
    try:
        assert cpus.keep_daemons_off_engine_cores([worker.pid, daemon.pid]) == []
        assert os.sched_getaffinity(daemon.pid) == os.sched_getaffinity(0)
    finally:
        for p in (worker, daemon):
            p.kill()
            p.wait()


def test_a_replica_started_from_a_bound_parent_takes_the_server_cores_back():
    allowed = os.sched_getaffinity(0)
    last = max(allowed)
    script = (
        "import os; from engine import cpus; "
        f"os.sched_setaffinity(0, {{{last}}}); "  # started by a raylet kept on one core
        "before = sorted(os.sched_getaffinity(0)); cpus.take_server_cores(); "
        "print(before, sorted(os.sched_getaffinity(0)))"
    )
    env = {**os.environ, cpus.SERVER_CPUS_ENV: ",".join(map(str, sorted(allowed)))}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.split("] [") == [f"[{last}", f"{', '.join(map(str, sorted(allowed)))}]\n"], out
