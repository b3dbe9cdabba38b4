"""CPU time by part of a server, read from ``/proc``: where a benchmark's cores went.

On a 2-core machine the vLLM CPU engine takes every cycle it is given, so whatever the HTTP
process, Ray's daemons or the client spend is taken from token generation. Request
throughput swings +-10% between rounds; CPU seconds per request of each part are far
steadier, and say which part costs more than vLLM's own server.

    before = snapshot(); ...load...; used = cpu_by_part(before, snapshot())

Parts: ``api`` (the HTTP process: vLLM's API server or our Ray Serve replica), ``engine``
(vLLM's engine core and worker processes), ``ray`` (Ray's and Serve's daemons, HAProxy, our
supervisor), ``client`` (this process: vLLM's benchmark client runs in it), ``other``.
Linux only; elsewhere every snapshot is empty.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PARTS = ("api", "engine", "ray", "client", "other")
_TICK_S = 1 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01
_RAY_MARKS = ("ray::", "/ray/", "raylet", "gcs_server", "haproxy", "-m engine serve")


@dataclass(frozen=True, slots=True)
class Process:
    cpu_s: float  # user + system, since the process started
    command: str


def read_stat(pid: int | str) -> tuple[str, list[str]] | None:
    """A process's name and the fields of ``/proc/PID/stat`` after it (state first); None
    once it is gone. The name is cut at the last ")": it may hold spaces and parentheses."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return None
    return stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()


def snapshot() -> dict[int, Process]:
    """Every process's CPU time so far, by pid."""
    found = {}
    for entry in Path("/proc").glob("[0-9]*"):
        read = read_stat(entry.name)
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            read = None
        if read is None:  # gone meanwhile
            continue
        name, fields = read
        utime, stime = int(fields[11]), int(fields[12])
        found[int(entry.name)] = Process((utime + stime) * _TICK_S, command.strip() or name)
    return found


def part_of(pid: int, command: str) -> str:
    """Which part of a benchmarked server a process is."""
    if pid == os.getpid():
        return "client"
    if "VLLM::" in command or "EngineCore" in command:
        return "engine"
    if "vllm.entrypoints.openai.api_server" in command or "ServeReplica" in command:
        return "api"
    if any(mark in command for mark in _RAY_MARKS):
        return "ray"
    return "other"


def cpu_by_part(before: dict[int, Process], after: dict[int, Process]) -> dict[str, float]:
    """CPU seconds each part used between two snapshots (processes started in between
    count from zero)."""
    used = dict.fromkeys(PARTS, 0.0)
    for pid, command, seconds in _used(before, after):
        used[part_of(pid, command)] += seconds
    return used


def busiest(
    before: dict[int, Process], after: dict[int, Process], part: str, n: int = 4
) -> list[tuple[str, float]]:
    """The ``n`` processes of ``part`` that used the most CPU seconds: (command, seconds)."""
    rows = [(c[:60], s) for pid, c, s in _used(before, after) if part_of(pid, c) == part]
    return sorted(rows, key=lambda row: -row[1])[:n]


def _used(before: dict[int, Process], after: dict[int, Process]):
    for pid, process in after.items():
        earlier = before.get(pid)
        start = earlier.cpu_s if earlier and earlier.command == process.command else 0.0
        yield pid, process.command, max(0.0, process.cpu_s - start)
