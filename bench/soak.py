"""A bounded overload soak: twice the measured capacity for minutes, with hostile traffic.

    python -m bench soak --out runs/soak                 # 10 minutes on configs/cpu-tiny.yaml
    python -m bench soak --duration-s 60 --out runs/s    # the short version CI runs

1. Start the server (or use ``--url``) and warm it up with the mix below.
2. Measure capacity: completed requests per second of the mix in a closed loop at the
   ``max_num_seqs`` of every tier together (primary and fallbacks).
3. Send Poisson arrivals at ``--factor`` x capacity for ``--duration-s``: product shots
   (768 px), phone photos (12 MP JPEG) and malformed requests (bad JSON, a corrupt image,
   an image in a system turn, a seed past 64 bits), all streaming.
4. Check what overload must never break: no 5xx; every 429 carries ``Retry-After``; the
   p99 time to first token of admitted requests within the profile's
   ``admission.ttft_slo_s``; the resident memory of the ingress replica and of the engine
   within 10% of their level after the soak's first tenth (at least 20 s) at full load; ``/health`` 200 throughout; nothing in flight
   at the end. Exit status 1 if any check fails.

Stops by itself: the arrival schedule is fixed before it starts, and every request has
the server's deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
import yaml

from bench.client import aiohttp_session
from bench.launch import ServerProcess, engine_command, free_port
from bench.profiles import poisson_arrivals
from bench.workload import build_requests
from engine.config import CONFIG_DIR, load_config

REPO = Path(__file__).resolve().parent.parent


def percentile(values: list[float], q: float) -> float | None:
    """As the harness's metrics (numpy, linear interpolation); None without values."""
    return float(np.percentile(values, q)) if values else None


MEMORY_TOLERANCE = 0.10
# share of each kind in the offered load
MIX = {"product": 0.70, "phone": 0.10, "bad": 0.20}


@dataclass
class Result:
    kind: str
    status: int  # HTTP status; 0: no response (connection error)
    ttft_s: float | None = None
    retry_after: str | None = None
    stream_error: str | None = None  # the code of an error event inside a 200 stream

    @property
    def failed(self) -> bool:
        """A server error, however it showed: 5xx, no response, an error event in a stream,
        or a stream that ended without a token."""
        broken_stream = self.status == 200 and (self.stream_error or self.ttft_s is None)
        return self.status >= 500 or self.status == 0 or bool(broken_stream)


def bad_bodies(model: str) -> list[bytes]:
    """Malformed requests, each a 4xx: cheap to refuse, and they must stay cheap under load."""
    image = {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUg=="},
    }
    chat = {"model": model, "max_tokens": 8, "stream": True}
    return [
        b'{"model": "' + model.encode() + b'", "messages": [',
        b"[" * 50_000,
        json.dumps({**chat, "messages": [{"role": "user", "content": [image]}]}).encode(),
        json.dumps(
            {
                **chat,
                "messages": [
                    {"role": "system", "content": [image]},
                    {"role": "user", "content": "hi"},
                ],
            }
        ).encode(),
        json.dumps(
            {**chat, "seed": 2**64, "messages": [{"role": "user", "content": "hi"}]}
        ).encode(),
    ]


async def _send(http, kind: str, body: bytes) -> Result:
    started = time.perf_counter()
    try:
        async with http.post(
            "/v1/chat/completions", data=body, headers={"content-type": "application/json"}
        ) as response:
            if response.status != 200:
                await response.read()
                return Result(
                    kind, response.status, retry_after=response.headers.get("retry-after")
                )
            result = Result(kind, 200)
            async for line in response.content:
                if not line.startswith(b"data: "):
                    continue
                if line.startswith(b'data: {"error"'):
                    result.stream_error = json.loads(line[6:])["error"].get("code") or "error"
                elif result.ttft_s is None and b'"content"' in line:
                    result.ttft_s = time.perf_counter() - started
            return result
    except Exception as exc:  # noqa: BLE001 - no response: recorded, never fatal to the soak
        return Result(kind, 0, stream_error=type(exc).__name__)


class _UniqueJpegBody:
    """A request body whose JPEG differs, byte-wise, on every call: random bytes after the
    image's end (decoders ignore them) give each request a new content hash, so the engine
    processes every image as new traffic would, and its multimodal cache fills as it would.
    Only the base64 of the last few bytes is computed per call."""

    def __init__(self, body: dict) -> None:
        part = next(p for p in body["messages"][0]["content"] if p["type"] == "image_url")
        header, b64 = part["image_url"]["url"].split(",", 1)
        data = base64.b64decode(b64)
        cut = len(data) // 3 * 3
        self._tail = data[cut:]
        part["image_url"]["url"] = header + "," + base64.b64encode(data[:cut]).decode() + "@TAIL@"
        self._head, self._rest = json.dumps({**body, "stream": True}).encode().split(b"@TAIL@")

    def __call__(self, rng: random.Random) -> bytes:
        return self._head + base64.b64encode(self._tail + rng.randbytes(12)) + self._rest


class Traffic:
    """The mix, drawn in a fixed order; every image request carries an image never sent before."""

    def __init__(self, model: str, output_tokens: int, seed: int = 0) -> None:
        specs = {
            kind: build_requests(kind, model, count, str(output_tokens), seed=seed)
            for kind, count in (("product", 16), ("phone", 4))
        }
        self._images = {kind: [_UniqueJpegBody(s.body) for s in specs[kind]] for kind in specs}
        self._bad = bad_bodies(model)
        self._rng = random.Random(seed)
        self._kinds, self._weights = list(MIX), list(MIX.values())

    def next(self) -> tuple[str, bytes]:
        kind = self._rng.choices(self._kinds, self._weights)[0]
        if kind == "bad":
            return kind, self._rng.choice(self._bad)
        return kind, self._rng.choice(self._images[kind])(self._rng)


async def closed_loop(base: str, traffic: Traffic, concurrency: int, count: int) -> float:
    """Completed (200) requests per second of the mix at fixed concurrency."""
    jobs = [traffic.next() for _ in range(count)]
    completed = 0
    async with aiohttp_session(base) as http:

        async def worker() -> None:
            nonlocal completed
            while jobs:
                result = await _send(http, *jobs.pop())  # not inside +=: it would read first
                completed += result.status == 200

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return completed / (time.perf_counter() - started)


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def server_processes(instance: str) -> dict[str, int]:
    """The ingress replica and the engine core of a server started with ``instance``."""
    from engine.lifecycle import processes_of

    found = {}
    for pid in processes_of(instance):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if "ServeReplica" in title and "OpenAIServer" in title:
            found["replica"] = pid
        elif "EngineCore" in title or comm.startswith("VLLM::EngineCor"):
            found.setdefault("engine", pid)
    return found


async def open_loop(
    base: str,
    traffic: Traffic,
    rate: float,
    duration_s: float,
    processes: dict[str, int],
    seed: int,
) -> tuple[list[Result], dict]:
    """Poisson arrivals for ``duration_s``; memory and /health sampled every 5 s."""
    arrivals = poisson_arrivals(rate, duration_s, seed)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in processes}
    health: list[int] = []
    async with aiohttp_session(base) as http:
        started = time.perf_counter()
        done = asyncio.Event()

        async def watch() -> None:
            while not done.is_set():
                for name, pid in processes.items():
                    if (rss := _rss_mib(pid)) is not None:
                        samples[name].append((round(time.perf_counter() - started, 1), rss))
                try:
                    async with http.get("/health", timeout=aiohttp.ClientTimeout(10)) as response:
                        health.append(response.status)
                except Exception:  # noqa: BLE001 - a health check that fails is a 0, not a crash
                    health.append(0)
                await asyncio.wait([asyncio.ensure_future(done.wait())], timeout=5)

        watcher = asyncio.ensure_future(watch())
        tasks = []
        for at in arrivals:
            if (delay := at - (time.perf_counter() - started)) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(_send(http, *traffic.next())))
        results = list(await asyncio.gather(*tasks))
        elapsed_s = time.perf_counter() - started
        done.set()
        await watcher
        for _ in range(50):  # the last releases may trail the last responses by a moment
            async with http.get("/metrics") as response:
                in_flight = [
                    float(line.split()[-1])
                    for line in (await response.text()).splitlines()
                    if line.startswith("qwen3vl_pod_in_flight_requests")
                ]
            if in_flight and not any(in_flight):
                break
            await asyncio.sleep(0.1)
    return results, {
        "rss_mib": samples,
        "health": health,
        "in_flight_after": in_flight,
        "elapsed_s": elapsed_s,
    }


def judge(
    results: list[Result],
    observed: dict,
    warmup_s: float,
    slo_s: float | None,
    memory_tolerance: dict[str, float] | None = None,
) -> dict:
    """The soak's figures and its pass/fail checks. The memory baseline is each process's
    resident size at the end of the first ``warmup_s`` of the soak (at full load: allocator
    arenas, caches and buffers reach their working size); after it, growth is a leak."""
    admitted = [r.ttft_s for r in results if r.status == 200 and r.ttft_s is not None]
    failures: dict[str, int] = {}
    for r in results:
        if r.failed:
            key = f"{r.status} {r.stream_error or 'no token'}"
            failures[key] = failures.get(key, 0) + 1
    statuses: dict[str, int] = {}
    for r in results:
        statuses[f"{r.kind} {r.status}"] = statuses.get(f"{r.kind} {r.status}", 0) + 1
    p99 = percentile(admitted, 99)
    series = observed["rss_mib"]
    baseline_rss = {
        name: ([rss for t, rss in values if t <= warmup_s] or [0.0])[-1]
        for name, values in series.items()
    }
    peak = {
        name: max((rss for t, rss in values if t > warmup_s), default=0.0)
        for name, values in series.items()
    }
    growth = {name: peak[name] / baseline_rss[name] - 1 for name in peak if baseline_rss[name]}
    tolerance = {name: MEMORY_TOLERANCE for name in growth} | (memory_tolerance or {})
    memory = ", ".join(f"{name} {tolerance[name]:.0%}" for name in sorted(growth))
    checks = {
        "no 5xx (nor error events, nor empty streams)": not any(r.failed for r in results),
        "every 429 has Retry-After": all(r.retry_after for r in results if r.status == 429),
        "bad requests all 4xx": all(400 <= r.status < 500 for r in results if r.kind == "bad"),
        f"p99 TTFT within SLO ({slo_s} s)": slo_s is None or (p99 is not None and p99 <= slo_s),
        f"memory within {memory or '10%'}": bool(growth)
        and all(g <= tolerance[name] for name, g in growth.items()),
        "/health 200 throughout": bool(observed["health"])
        and all(s == 200 for s in observed["health"]),
        "nothing in flight after": bool(observed["in_flight_after"])
        and not any(observed["in_flight_after"]),
    }
    return {
        "sent": len(results),
        "statuses": dict(sorted(statuses.items())),
        "failures": failures,
        "admitted": len(admitted),
        "rejected_429": sum(r.status == 429 for r in results),
        "p50_ttft_s": percentile(admitted, 50),
        "p99_ttft_s": p99,
        "rss_after_warmup_mib": baseline_rss,
        "rss_peak_mib": peak,
        "rss_growth": growth,
        "rss_series_mib": series,
        "health_checks": len(observed["health"]),
        "checks": checks,
        "passed": all(checks.values()),
    }


def soak(
    base: str,
    model: str,
    concurrency: int,
    slo_s: float | None | Callable[[float], float],
    processes: dict[str, int],
    duration_s: float,
    factor: float,
    output_tokens: int,
    warmup_s: float | None = None,
    memory_tolerance: dict[str, float] | None = None,
) -> dict:
    """Warm up, measure capacity, soak; the report (see ``judge``). The memory baseline is
    taken ``warmup_s`` into the soak (default: a tenth of it, at least 20 s). ``slo_s`` may
    be a function of the measured capacity (req/s): the TTFT that bounded queues can hold
    scales with the machine's speed."""
    traffic = Traffic(model, output_tokens)
    asyncio.run(closed_loop(base, traffic, concurrency, 3 * concurrency))  # warm-up
    capacity = asyncio.run(closed_loop(base, traffic, concurrency, 8 * concurrency))
    # factor x capacity of the requests that can succeed; the bad ones come on top
    rate = factor * capacity / (1 - MIX["bad"])
    print(
        f"capacity {capacity:.1f} completed req/s of the mix; soaking at {rate:.1f} req/s for "
        f"{duration_s:g} s; processes {processes}",
        flush=True,
    )
    results, observed = asyncio.run(open_loop(base, traffic, rate, duration_s, processes, seed=1))
    warmup_s = max(20.0, duration_s / 10) if warmup_s is None else warmup_s
    # what the server completed while overloaded: below the closed-loop capacity where the
    # machine slowed down during the soak (this one's speed drifts by +-25% over minutes)
    served = sum(r.status == 200 for r in results) / observed["elapsed_s"]
    if callable(slo_s):
        slo_s = slo_s(min(capacity, served))
    report = judge(results, observed, warmup_s, slo_s, memory_tolerance)
    return {
        "capacity_rps": capacity,
        "served_rps": served,
        "slo_s": slo_s,
        "rate_rps": rate,
        "duration_s": duration_s,
        **report,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench soak", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--config", type=Path, default=CONFIG_DIR / "cpu-tiny.yaml")
    parser.add_argument("--duration-s", type=float, default=600)
    parser.add_argument("--factor", type=float, default=2.0, help="offered load / capacity")
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "soak")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    config = load_config(args.config)
    profile = yaml.safe_load(args.config.read_text())
    profile["server"]["port"] = free_port()
    path = args.out / "profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    instance = uuid.uuid4().hex
    base = f"http://127.0.0.1:{profile['server']['port']}"
    with ServerProcess(
        engine_command(path), base, args.out / "server.log", env={"QWEN3VL_INSTANCE": instance}
    ):
        seqs = sum(m.engine_kwargs.get("max_num_seqs", 256) for m in config.models)
        report = soak(
            base,
            config.primary.name,
            seqs,
            config.admission.ttft_slo_s,
            server_processes(instance),
            args.duration_s,
            args.factor,
            args.output_tokens,
        )
    report["config"] = str(args.config)
    (args.out / "soak.json").write_text(json.dumps(report, indent=1))
    print(
        json.dumps(
            {
                k: report[k]
                for k in (
                    "capacity_rps",
                    "served_rps",
                    "rate_rps",
                    "sent",
                    "statuses",
                    "failures",
                    "p50_ttft_s",
                    "p99_ttft_s",
                    "rss_growth",
                    "checks",
                )
            },
            indent=1,
        )
    )
    return 0 if report["passed"] else 1
