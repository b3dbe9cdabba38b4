"""Load profiles: when each request is sent. Small registered classes, one per ``NAME:ARGS``.

A profile yields one or more stages. A stage is either closed-loop (``concurrency``: keep
N requests in flight) or open-loop (``arrivals_s``: send times from the stage's start,
whatever the server does). ``stages()`` is a generator the runner ``send``s each stage's
summary back into, so an adaptive profile (``sweep``) can decide the next stage.

    concurrency:8             closed loop, 8 in flight
    poisson:5                 Poisson arrivals at 5 req/s
    poisson:5,burstiness=0.5  gamma inter-arrivals (vLLM's convention: <1 burstier, >1 smoother)
    ramp:1-10/60              arrival rate rising linearly from 1 to 10 req/s over 60 s
    sweep                     concurrency 1, then Poisson at 1x, 2x, 4x ... that rate until saturated
    trace:FILE                replay send times from FILE (one number per line, or JSONL with
                              ``timestamp_s``), shifted to start at 0
"""

from __future__ import annotations

import json
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

PROFILES: dict[str, type[Profile]] = {}


@dataclass(frozen=True)
class Stage:
    label: str
    num_requests: int
    concurrency: int | None = None  # closed loop
    arrivals_s: tuple[float, ...] | None = None  # open loop
    offered_rate: float | None = None  # requests/s the arrivals were drawn at (open loop)


StageGenerator = Generator[Stage, "dict | None", None]


class Profile(ABC):
    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def parse(cls, args: str, seed: int) -> Profile: ...

    @abstractmethod
    def stages(self, num_requests: int) -> StageGenerator: ...


def register(cls: type[Profile]) -> type[Profile]:
    PROFILES[cls.name] = cls
    return cls


def parse_profile(spec: str, seed: int = 0) -> Profile:
    name, _, args = spec.partition(":")
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; one of {sorted(PROFILES)}")
    return PROFILES[name].parse(args, seed)


def _options(args: str) -> tuple[str, dict[str, str]]:
    head, *rest = args.split(",") if args else [""]
    return head, dict(item.split("=", 1) for item in rest)


def gamma_arrivals(rate: float, count: int, burstiness: float, rng: random.Random) -> list[float]:
    """Send times of ``count`` requests: gamma inter-arrivals with mean 1/rate and variance
    1/(rate^2 * burstiness); burstiness 1 is a Poisson process."""
    t, times = 0.0, []
    for _ in range(count):
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
        times.append(t)
    return times


def poisson_arrivals(rate: float, duration_s: float, seed: int) -> list[float]:
    """Send times (seconds from the start) of a Poisson process at ``rate`` per second that
    fall within ``duration_s`` (the soak's open loop)."""
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    while (t := t + rng.expovariate(rate)) < duration_s:
        arrivals.append(t)
    return arrivals


@register
class Concurrency(Profile):
    name = "concurrency"

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency

    @classmethod
    def parse(cls, args: str, seed: int) -> Concurrency:
        return cls(int(args))

    def stages(self, num_requests: int) -> StageGenerator:
        yield Stage(f"concurrency {self.concurrency}", num_requests, concurrency=self.concurrency)


@register
class Poisson(Profile):
    name = "poisson"

    def __init__(self, rate: float, burstiness: float = 1.0, seed: int = 0) -> None:
        if rate <= 0 or burstiness <= 0:
            raise ValueError("poisson needs rate > 0 and burstiness > 0")
        self.rate, self.burstiness, self.seed = rate, burstiness, seed

    @classmethod
    def parse(cls, args: str, seed: int) -> Poisson:
        rate, options = _options(args)
        return cls(float(rate), float(options.get("burstiness", 1.0)), seed)

    def stages(self, num_requests: int) -> StageGenerator:
        arrivals = gamma_arrivals(
            self.rate, num_requests, self.burstiness, random.Random(self.seed)
        )
        yield Stage(
            f"poisson {self.rate:g}/s",
            num_requests,
            arrivals_s=tuple(arrivals),
            offered_rate=self.rate,
        )


@register
class Ramp(Profile):
    """A non-homogeneous Poisson process whose rate rises linearly (time-rescaled exponentials)."""

    name = "ramp"

    def __init__(self, start_rate: float, end_rate: float, duration_s: float, seed: int = 0):
        if start_rate < 0 or end_rate <= 0 or duration_s <= 0:
            raise ValueError("ramp needs FROM >= 0, TO > 0 and SECONDS > 0")
        self.start_rate, self.end_rate, self.duration_s, self.seed = (
            start_rate,
            end_rate,
            duration_s,
            seed,
        )

    @classmethod
    def parse(cls, args: str, seed: int) -> Ramp:
        rates, _, seconds = args.partition("/")
        low, _, high = rates.partition("-")
        return cls(float(low), float(high), float(seconds), seed)

    def rate_at(self, t: float) -> float:
        return self.start_rate + (self.end_rate - self.start_rate) * t / self.duration_s

    def arrivals(self) -> list[float]:
        rng = random.Random(self.seed)
        a = (self.end_rate - self.start_rate) / (2 * self.duration_s)  # Λ(t) = a t² + b t
        b = self.start_rate
        area, times = 0.0, []
        while True:
            area += rng.expovariate(1.0)
            t = area / b if a == 0 else (-b + math.sqrt(b * b + 4 * a * area)) / (2 * a)
            if t > self.duration_s:
                return times
            times.append(t)

    def stages(self, num_requests: int) -> StageGenerator:
        arrivals = self.arrivals()  # the ramp's length, not num_requests, sets the count
        label = f"ramp {self.start_rate:g}-{self.end_rate:g}/s over {self.duration_s:g}s"
        yield Stage(
            label,
            len(arrivals),
            arrivals_s=tuple(arrivals),
            offered_rate=len(arrivals) / self.duration_s,
        )


@register
class Sweep(Profile):
    """Concurrency 1 measures the unloaded rate r; then Poisson at r, 2r, 4r ... until the
    server saturates (achieved < 90% of offered, or over 5% errors) or ``steps`` run out."""

    name = "sweep"

    def __init__(self, steps: int = 6, factor: float = 2.0, seed: int = 0) -> None:
        self.steps, self.factor, self.seed = steps, factor, seed

    @classmethod
    def parse(cls, args: str, seed: int) -> Sweep:
        _, options = _options("," + args if args else "")
        return cls(int(options.get("steps", 6)), float(options.get("factor", 2.0)), seed)

    def stages(self, num_requests: int) -> StageGenerator:
        summary = yield Stage("concurrency 1", max(4, num_requests // 4), concurrency=1)
        rate = summary["request_throughput"] if summary else 1.0
        rng = random.Random(self.seed)
        for _ in range(self.steps):
            arrivals = gamma_arrivals(rate, num_requests, 1.0, rng)
            summary = yield Stage(
                f"poisson {rate:.3g}/s", num_requests, arrivals_s=tuple(arrivals), offered_rate=rate
            )
            if summary and _saturated(summary, rate):
                return
            rate *= self.factor


def _saturated(summary: dict, offered_rate: float) -> bool:
    failed_share = summary["failed"] / max(1, summary["completed"] + summary["failed"])
    return summary["request_throughput"] < 0.9 * offered_rate or failed_share > 0.05


@register
class Trace(Profile):
    name = "trace"

    def __init__(self, times_s: list[float]) -> None:
        if not times_s:
            raise ValueError("trace has no timestamps")
        start = min(times_s)
        self.times_s = sorted(t - start for t in times_s)

    @classmethod
    def parse(cls, args: str, seed: int) -> Trace:
        times = []
        for line in Path(args).read_text().splitlines():
            line = line.strip()
            if line:
                times.append(json.loads(line)["timestamp_s"] if line[0] == "{" else float(line))
        return cls(times)

    def stages(self, num_requests: int) -> StageGenerator:
        duration = self.times_s[-1] or 1.0
        yield Stage(
            f"trace ({len(self.times_s)} requests)",
            len(self.times_s),
            arrivals_s=tuple(self.times_s),
            offered_rate=len(self.times_s) / duration,
        )
