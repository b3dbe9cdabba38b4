"""What our stack's background costs an engine: vLLM's server measured alone and beside our
idle server; ours as it runs and with Ray's daemons bound off the engine worker's core.

    python -m bench.beside --out runs/beside   # 4 rounds: tiny-c1 (80), tiny-c8, tiny-c32 (256)

Both servers start once (vLLM's on ``--port``, ours on ``--port`` + 10) and take turns, the
order of the conditions alternating by round:

    vllm-alone      vLLM's server; ours paused (SIGSTOP: no CPU at all)
    vllm-beside     vLLM's server; ours running, idle (Ray's daemons and our idle engine tick)
    ours            ours as it runs; vLLM's paused
    ours-kept-off   ours, with every thread of Ray's daemons (GCS, raylet, agents, Serve's
                    controller and proxy, the drain coordinator, the server process) bound to
                    the cores vLLM left free of its worker; the replica and the engine not.
                    Tried as a server feature on 2026-12-06 and not kept (BENCHMARKS.md).

Writes rows.jsonl (one line per run) and summary.md (per condition: req/s by round, TTFT
p50/p99, ITL p50) to --out. Linux only (CPU affinity).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.compare_servers import (
    RESUME_S,
    WORKLOADS,
    _model_of,
    measure,
    servers,
    start_side_by_side,
)
from bench.launch import ServerProcess, processes_of
from engine.config import DEFAULT_PROFILE

# condition -> (server measured, servers paused, Ray's daemons of ours kept off the engine)
CONDITIONS = {
    "vllm-alone": ("vllm", {"ours"}, True),
    "vllm-beside": ("vllm", set(), True),
    "ours": ("ours", {"vllm"}, False),
    "ours-kept-off": ("ours", {"vllm"}, True),
}
# on the request path, never bound
HOT = ("ServeReplica", "VLLM::", "EngineCore", "haproxy")
KEYS = ("request_throughput", "median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms")


def _command(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def _bind(pid: int, cores: set[int]) -> None:
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), cores)


def place_daemons(server: ServerProcess, keep_off: bool) -> None:
    """Ray's daemons of ``server`` on the cores its engine workers leave free (``keep_off``),
    or on every core, as the server leaves them."""
    pids = processes_of(server.instance, group=server.proc.pid)
    every = os.sched_getaffinity(0)
    workers = [pid for pid in pids if "VLLM::Worker" in _command(pid)]
    spare = every - set().union(*(os.sched_getaffinity(pid) for pid in workers))
    for pid in pids:
        if not any(mark in _command(pid) for mark in HOT):
            _bind(pid, spare if keep_off and spare else every)


def summary(rows: list[dict]) -> str:
    lines = [
        "| workload | condition | req/s by round (mean) | TTFT p50 ms | TTFT p99 ms | ITL p50 ms |",
        "|---|---|---|---|---|---|",
    ]
    for workload in dict.fromkeys(r["workload"] for r in rows):
        for cond in CONDITIONS:
            mine = [r for r in rows if r["workload"] == workload and r["condition"] == cond]
            if not mine:
                continue
            rps = [r["request_throughput"] for r in mine]

            def mean(key: str, mine: list[dict] = mine) -> str:
                return f"{statistics.mean(r[key] for r in mine):.1f}"

            lines.append(
                f"| {workload} | {cond} | {', '.join(f'{x:.2f}' for x in rps)} "
                f"({statistics.mean(rps):.2f}) | {mean('median_ttft_ms')} | "
                f"{mean('p99_ttft_ms')} | {statistics.mean(r['median_itl_ms'] for r in mine):.2f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/beside"))
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--settle-s", type=float, default=60.0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    workloads = [
        replace(WORKLOADS["tiny-c1"], num_prompts=80),
        WORKLOADS["tiny-c8"],
        replace(WORKLOADS["tiny-c32"], num_prompts=256),
    ]
    model, tokenizer = _model_of(DEFAULT_PROFILE)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        ports = {"vllm": args.port, "ours": args.port + 10}
        found = {}
        for name, port in ports.items():
            (Path(tmp) / name).mkdir()
            found[name] = servers(DEFAULT_PROFILE, port, Path(tmp) / name)[name]
        running, _ = start_side_by_side(
            stack, found, ports, DEFAULT_PROFILE, workloads, 16, args.out, args.settle_s
        )
        names = list(CONDITIONS)
        for round_no in range(1, args.rounds + 1):
            for workload in workloads:
                for cond in names if round_no % 2 else names[::-1]:
                    target, paused, keep_off = CONDITIONS[cond]
                    for name, server in running.items():
                        (server.pause if name in paused else server.resume)()
                    place_daemons(running["ours"], keep_off)
                    time.sleep(RESUME_S)
                    row = measure(running[target].base_url, model, tokenizer, workload)
                    rows.append(
                        {"round": round_no, "condition": cond, "workload": workload.name}
                        | {k: row[k] for k in KEYS}
                        | {"cpu_ray_core_share": row["cpu_ray_core_share"]}
                    )
                    print(json.dumps(rows[-1]), flush=True)
    (args.out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (args.out / "summary.md").write_text(summary(rows))
    print(summary(rows))


if __name__ == "__main__":
    main()
