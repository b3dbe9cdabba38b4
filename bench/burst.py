"""A traffic burst above the primary's capacity, run with fallback on and with it off.

    python -m bench.burst --out runs/burst

Built on the harness (``bench.runner``: its workload, ``concurrency`` and ``poisson``
profiles, streaming client and metrics, as ``python -m bench run``):

1. Start the server with fallback *off* (the profile's ``routing.fallbacks`` emptied; the
   fallback engine still runs, so both runs load the machine alike). Measure the primary's
   capacity: closed loop at its ``max_running_requests`` concurrency.
2. Send an open-loop Poisson burst at ``--factor`` x that capacity for ``--duration-s``.
3. Restart with fallback *on* and send the same burst (same seed: the same arrival times and
   the same images).
Report completed and rejected requests, p50/p99 time to first token (the harness's, defined
as vLLM's client defines it), overall and per serving model, and the share served by the
fallback.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from bench.launch import REPO, ServerProcess, engine_command
from bench.runner import RunSettings, run_benchmark
from engine.config import CONFIG_DIR

WORKLOAD = "product:size=336x336"  # one unique JPEG product shot per request


def by_served_model(requests: list[dict]) -> dict[str, dict]:
    """Completed requests and their p50/p99 TTFT per model that served them."""
    ok = [r for r in requests if r["status"] == 200 and r["ttft_s"] is not None]
    found = {}
    for name in sorted({r["served_model"] or "unknown" for r in ok}):
        ttfts = [1000 * r["ttft_s"] for r in ok if (r["served_model"] or "unknown") == name]
        found[name] = {
            "completed": len(ttfts),
            "p50_ttft_ms": float(np.percentile(ttfts, 50)),
            "p99_ttft_ms": float(np.percentile(ttfts, 99)),
        }
    return found


def summarise(run, fallback_name: str) -> dict:
    (stage,) = run.stages
    errors = stage["errors_by_status"]
    return {
        "sent": stage["requests"],
        "completed": stage["completed"],
        "rejected_429": errors.get("429", 0),
        "errors_5xx": sum(n for status, n in errors.items() if status.startswith("5")),
        "p50_ttft_ms": stage["p50_ttft_ms"],
        "p99_ttft_ms": stage["p99_ttft_ms"],
        "served_by_fallback_share": stage["served_share"].get(fallback_name, 0.0),
        "by_served_model": by_served_model(run.requests),
    }


class Server(ServerProcess):
    """The engine CLI on ``profile`` (written to ``tmp``); stopped with a pause for the ports."""

    def __init__(self, profile: dict, tmp: Path, name: str) -> None:
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(profile))
        super().__init__(
            engine_command(path),
            f"http://127.0.0.1:{profile['server']['port']}",
            tmp / f"{name}.log",
        )

    def stop(self, timeout_s: float = 120) -> int | None:
        code = super().stop(timeout_s)
        time.sleep(3)
        return code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG_DIR / "cpu-small-fallback.yaml")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "burst")
    parser.add_argument("--factor", type=float, default=3.0, help="burst rate / primary capacity")
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1, help="arrival times and images")
    parser.add_argument(
        "--primary-seqs", type=int, default=None, help="override the primary's max_num_seqs"
    )
    parser.add_argument(
        "--max-queued",
        type=int,
        default=None,
        help="override every model's saturation.max_queued_requests",
    )
    parser.add_argument("--port", type=int, default=8124)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    profile = yaml.safe_load(args.config.read_text())
    profile["server"]["port"] = args.port
    primary, fallback = profile["models"][0], profile["models"][1]
    if args.primary_seqs is not None:
        primary["engine_kwargs"]["max_num_seqs"] = args.primary_seqs
    primary_seqs = primary["engine_kwargs"]["max_num_seqs"]
    if args.max_queued is not None:
        for model in profile["models"]:
            model.setdefault("saturation", {})["max_queued_requests"] = args.max_queued
    off = json.loads(json.dumps(profile))
    off["routing"]["fallbacks"] = []
    report: dict = {"settings": vars(args) | {"config": str(args.config), "out": str(args.out)}}

    def run(server: Server, label: str, profile_spec: str, count: int, warmup: int):
        settings = RunSettings(
            url=server.base_url,
            model=primary["name"],
            profile=profile_spec,
            workload=WORKLOAD,
            num_requests=count,
            output_tokens=str(args.output_tokens),
            warmup=warmup,
            seed=args.seed,
            progress=False,
            label=label,
        )
        return run_benchmark(settings, args.out / label)

    def burst(server: Server, rate: float, label: str, warmup: int) -> None:
        count = max(1, round(rate * args.duration_s))
        result = run(server, f"fallback-{label}", f"poisson:{rate:.4f}", count, warmup)
        report[f"fallback_{label}"] = summarise(result, fallback["name"])
        print(label, json.dumps(report[f"fallback_{label}"]), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        server = Server(off, Path(tmp), "off")
        try:
            capacity_run = run(server, "capacity", f"concurrency:{primary_seqs}", 60, 16)
            capacity = capacity_run.stages[0]["request_throughput"]
            rate = args.factor * capacity
            report |= {"primary_capacity_rps": capacity, "burst_rate_rps": rate}
            print(f"primary capacity {capacity:.2f} req/s; burst {rate:.2f} req/s", flush=True)
            burst(server, rate, "off", warmup=0)  # warm from the capacity run
        finally:
            server.stop()
        server = Server(profile, Path(tmp), "on")
        try:
            burst(server, rate, "on", warmup=16)
        finally:
            server.stop()
    on, off_ = report["fallback_on"], report["fallback_off"]
    report["p99_ttft_ratio_off_over_on"] = off_["p99_ttft_ms"] / on["p99_ttft_ms"]
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (args.out / "results.md").write_text(table)
    print(table)


def markdown(report: dict) -> str:
    rows = [
        "| run | sent | completed | rejected (429) | 5xx | p50 TTFT ms | p99 TTFT ms "
        "| served by fallback |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("off", "on"):
        r = report[f"fallback_{name}"]
        rows.append(
            f"| fallback {name} | {r['sent']} | {r['completed']} | {r['rejected_429']} "
            f"| {r['errors_5xx']} | {r['p50_ttft_ms']:.0f} | {r['p99_ttft_ms']:.0f} "
            f"| {r['served_by_fallback_share']:.0%} |"
        )
    ratio = report["p99_ttft_ratio_off_over_on"]
    return "\n".join(rows) + f"\n\np99 TTFT off/on: {ratio:.2f}x\n"


if __name__ == "__main__":
    main()
