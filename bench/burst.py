"""A traffic burst above the primary's capacity, run with fallback on and with it off.

    python -m bench.burst --out runs/burst

1. Start the server with fallback *off* (the profile's ``routing.fallbacks`` emptied; the
   fallback engine still runs, so both runs load the machine alike). Measure the primary's
   capacity: closed loop at its ``max_running_requests`` concurrency.
2. Send an open-loop Poisson burst at ``--factor`` x that capacity for ``--duration-s``.
3. Restart with fallback *on* and send the same burst (same seed, same arrival times).
Report completed and rejected requests, p50/p99 time to first token, and the share served
by the fallback. Streaming requests; TTFT is measured at the first content chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path

import yaml

from bench.launch import ServerProcess, engine_command
from engine.config import CONFIG_DIR

REPO = Path(__file__).resolve().parent.parent


def _images(n: int, size: int = 336) -> list[str]:
    import base64
    import io

    from PIL import Image

    rng = random.Random(0)
    urls = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3)).save(
            buf, "JPEG", quality=85
        )
        urls.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


def _body(model: str, image_url: str, output_tokens: int) -> dict:
    return {
        "model": model,
        "max_tokens": output_tokens,
        "ignore_eos": True,
        "stream": True,
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "text",
                        "text": "Tag this product: category, colour, material, style.",
                    },
                    {"type": "image_url", "image_url": {"url": image_url}},
                ],
            }
        ],
    }


async def _one(http, body: dict) -> dict:
    started = time.perf_counter()
    ttft = None
    async with http.post("/v1/chat/completions", json=body) as response:
        served = response.headers.get("x-served-model")
        if response.status != 200:
            await response.read()
            return {"status": response.status, "served": served, "ttft_ms": None}
        async for line in response.content:
            if ttft is None and line.startswith(b"data: ") and b'"content"' in line:
                ttft = (time.perf_counter() - started) * 1000
    return {
        "status": 200,
        "served": served,
        "ttft_ms": ttft,
        "e2e_ms": (time.perf_counter() - started) * 1000,
    }


def session(base: str):
    import aiohttp

    # aiohttp, as vLLM's benchmark client uses: httpx costs too much CPU at this concurrency.
    return aiohttp.ClientSession(
        base_url=base,
        timeout=aiohttp.ClientTimeout(total=600),
        connector=aiohttp.TCPConnector(limit=0, force_close=False),
    )


async def closed_loop(base: str, bodies: list[dict], concurrency: int) -> float:
    """Requests per second at fixed concurrency."""
    queue = list(bodies)
    async with session(base) as http:

        async def worker():
            while queue:
                await _one(http, queue.pop())

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(bodies) / (time.perf_counter() - started)


async def open_loop(
    base: str, bodies: list[dict], rate: float, duration_s: float, seed: int
) -> list[dict]:
    """Poisson arrivals at ``rate`` req/s for ``duration_s``; waits for every request."""
    arrivals = poisson_arrivals(rate, duration_s, seed)
    async with session(base) as http:
        started = time.perf_counter()
        tasks = []
        for i, at in enumerate(arrivals):
            delay = at - (time.perf_counter() - started)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(_one(http, bodies[i % len(bodies)])))
        return list(await asyncio.gather(*tasks))


def poisson_arrivals(rate: float, duration_s: float, seed: int) -> list[float]:
    """Send times (s from the start) of a Poisson process at ``rate`` per second."""
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    while (t := t + rng.expovariate(rate)) < duration_s:
        arrivals.append(t)
    return arrivals


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summarise(results: list[dict], fallback_name: str) -> dict:
    ok = [r for r in results if r["status"] == 200]
    ttfts = [r["ttft_ms"] for r in ok if r["ttft_ms"] is not None]
    by_model = {}
    for name in sorted({r["served"] for r in ok}):
        model_ttfts = [r["ttft_ms"] for r in ok if r["served"] == name and r["ttft_ms"] is not None]
        by_model[name] = {
            "completed": len(model_ttfts),
            "p50_ttft_ms": percentile(model_ttfts, 50),
            "p99_ttft_ms": percentile(model_ttfts, 99),
        }
    return {
        "sent": len(results),
        "completed": len(ok),
        "rejected_429": sum(r["status"] == 429 for r in results),
        "errors_5xx": sum(r["status"] >= 500 for r in results),
        "p50_ttft_ms": percentile(ttfts, 50),
        "p99_ttft_ms": percentile(ttfts, 99),
        "served_by_fallback_share": (sum(r["served"] == fallback_name for r in ok) / len(ok))
        if ok
        else 0.0,
        "by_served_model": by_model,
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
        self.base = self.base_url

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
    images = _images(200)
    bodies = [_body(primary["name"], url, args.output_tokens) for url in images]

    report: dict = {"settings": vars(args) | {"config": str(args.config), "out": str(args.out)}}

    def burst(server: Server, rate: float, label: str, warm_up: bool) -> None:
        if warm_up:  # the "off" server is already warm from the capacity measurement
            asyncio.run(closed_loop(server.base, bodies[:16], primary_seqs))
        results = asyncio.run(open_loop(server.base, bodies, rate, args.duration_s, seed=1))
        report[f"fallback_{label}"] = summarise(results, fallback["name"])
        print(label, report[f"fallback_{label}"], flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        server = Server(off, Path(tmp), "off")
        try:
            asyncio.run(closed_loop(server.base, bodies[:16], primary_seqs))  # warm-up
            capacity = asyncio.run(closed_loop(server.base, bodies[:60], primary_seqs))
            rate = args.factor * capacity
            report |= {"primary_capacity_rps": capacity, "burst_rate_rps": rate}
            print(f"primary capacity {capacity:.2f} req/s; burst {rate:.2f} req/s", flush=True)
            burst(server, rate, "off", warm_up=False)
        finally:
            server.stop()
        server = Server(profile, Path(tmp), "on")
        try:
            burst(server, rate, "on", warm_up=True)
        finally:
            server.stop()
    on, off_ = report["fallback_on"], report["fallback_off"]
    report["p99_ttft_ratio_off_over_on"] = off_["p99_ttft_ms"] / on["p99_ttft_ms"]
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    rows = [
        "| run | sent | completed | rejected (429) | 5xx | p50 TTFT ms | p99 TTFT ms | served by fallback |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in (("fallback off", off_), ("fallback on", on)):
        rows.append(
            f"| {name} | {r['sent']} | {r['completed']} | {r['rejected_429']} | {r['errors_5xx']} | "
            f"{r['p50_ttft_ms']:.0f} | {r['p99_ttft_ms']:.0f} | {r['served_by_fallback_share']:.0%} |"
        )
    table = "\n".join(rows) + f"\n\np99 TTFT off/on: {report['p99_ttft_ratio_off_over_on']:.2f}x\n"
    (args.out / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
