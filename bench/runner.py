"""One benchmark run: build the workload, play the profile's stages, summarize, write the run.

1. Build every request body up front (images encoded before the clock starts).
2. Warm the server up with a few requests that are not recorded.
3. Play each stage of the profile; feed each stage's summary back to the profile (``sweep``).
4. Write ``summary.json``, ``requests.jsonl``, ``report.md`` and the plots to ``out``.
"""

from __future__ import annotations

import datetime
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

from bench.client import RequestRecord, StreamingClient, run_async
from bench.metrics import summarize
from bench.profiles import Concurrency, Profile, Ramp, Stage, Sweep, Trace, parse_profile
from bench.report import Run, write_run
from bench.workload import build_requests


@dataclass
class RunSettings:
    url: str
    model: str
    profile: str
    workload: str = "product"
    num_requests: int = 64
    output_tokens: str = "64"
    ignore_eos: bool = True
    slo: dict[str, float] = field(default_factory=dict)
    warmup: int = 4
    seed: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    label: str | None = None
    progress: bool = True
    extra_meta: dict = field(default_factory=dict)  # e.g. the server's start-up time


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}: {os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}"


def request_budget(profile: Profile, num_requests: int) -> int:
    """How many distinct request bodies the profile can use, so no image repeats."""
    if isinstance(profile, Sweep):
        return max(4, num_requests // 4) + profile.steps * num_requests
    if isinstance(profile, Ramp):
        return len(profile.arrivals())
    if isinstance(profile, Trace):
        return len(profile.times_s)
    return num_requests


async def play(
    client: StreamingClient, profile: Profile, specs, settings: RunSettings
) -> tuple[list[dict], list[RequestRecord]]:
    """Run every stage of ``profile``; returns the stage summaries and all records."""
    summaries: list[dict] = []
    records: list[RequestRecord] = []
    stages = profile.stages(settings.num_requests)
    stage: Stage | None = next(stages)
    while stage is not None:
        stage_records, duration_s = await client.run_stage(
            stage, specs, first_index=len(records), progress=settings.progress
        )
        summary = {
            "stage": stage.label,
            "offered_rate": stage.offered_rate,
            "concurrency": stage.concurrency,
            **summarize(stage_records, duration_s, settings.slo),
        }
        summaries.append(summary)
        records += stage_records
        try:
            stage = stages.send(summary)
        except StopIteration:
            stage = None
    return summaries, records


def run_benchmark(settings: RunSettings, out: Path) -> Run:
    profile = parse_profile(settings.profile, settings.seed)
    count = request_budget(profile, settings.num_requests)
    specs = build_requests(
        settings.workload,
        settings.model,
        count,
        settings.output_tokens,
        settings.ignore_eos,
        settings.seed,
    )
    warm = build_requests(
        settings.workload,
        settings.model,
        max(1, settings.warmup),
        "8",
        settings.ignore_eos,
        settings.seed + 1,
    )
    started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")

    async def main():
        async with StreamingClient(settings.url, headers=settings.headers) as client:
            if settings.warmup:
                warmup = Concurrency(min(settings.warmup, 8)).stages(settings.warmup)
                await client.run_stage(next(warmup), warm, progress=False)
            return await play(client, profile, specs, settings)

    summaries, records = run_async(main())
    meta = {
        "label": settings.label,
        "url": settings.url,
        "model": settings.model,
        "profile": settings.profile,
        "workload": settings.workload,
        "num_requests": settings.num_requests,
        "output_tokens": settings.output_tokens,
        "ignore_eos": settings.ignore_eos,
        "slo": settings.slo or None,
        "seed": settings.seed,
        "warmup": settings.warmup,
        "machine": machine(),
        "started_at": started_at,
        **settings.extra_meta,
    }
    return write_run(out, meta, summaries, records)
