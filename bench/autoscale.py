"""Sale-peak autoscaling simulator: a traffic trace through the Kubernetes HPA algorithm.

    python -m bench autoscale-sim --trace bench/traces/sale-peak.csv --capacity RUN/summary.json

The HPA settings (min/max replicas, the in-flight target, stabilization windows, scale
policies) are read from ``k8s/base/hpa.yaml``, so the simulation runs the manifests we ship.
Per-replica capacity comes from a harness run (its best stage's request throughput and its
p50/p99 end-to-end latency); the fallback tier's is ``--fallback-speedup`` times that.

Each second, as the router does: arrivals go to the primary tier up to its capacity
(``ready pods x capacity``), the rest to the fallback tier up to its capacity; when both are
saturated they wait in bounded queues (``--queue-per-pod`` per ready pod), then get 429.
Queued requests are served first the next second (a fluid model). Every ``--sync-s`` the HPA of each tier
computes ``desired = ceil(current x metric / target)`` on the average in-flight requests per
pod (Little: throughput x service time + queue; a primary pod's count includes the overflow
it sent to the fallback tier, as ``qwen3vl_pod_in_flight_requests`` does), skips changes within 10% tolerance,
applies the stabilization window and scale policies, and clamps to min/max. New pods become
ready after ``--startup-s`` (image pull, weight load, readiness). Estimated p99 latency is the
bench run's p99 plus the queueing delay (queue / throughput); it is an estimate, not a measurement.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import yaml

TOLERANCE = 0.1
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Policy:
    kind: str  # "Pods" or "Percent"
    value: int
    period_s: int


@dataclass(frozen=True)
class HpaSpec:
    min_replicas: int
    max_replicas: int
    target: float  # average in-flight requests per pod
    up_window_s: int = 0
    down_window_s: int = 300
    up_policies: tuple[Policy, ...] = (Policy("Percent", 100, 15), Policy("Pods", 4, 15))
    down_policies: tuple[Policy, ...] = (Policy("Percent", 100, 15),)
    up_select: str = "Max"
    down_select: str = "Max"

    @classmethod
    def from_manifest(cls, hpa: dict) -> HpaSpec:
        spec = hpa["spec"]
        target = next(
            m["pods"]["target"]["averageValue"]
            for m in spec["metrics"]
            if m["pods"]["metric"]["name"] == "qwen3vl_pod_in_flight_requests"
        )
        behavior = spec.get("behavior", {})

        def rules(direction: str, default_window: int):
            rule = behavior.get(direction, {})
            policies = tuple(
                Policy(p["type"], p["value"], p["periodSeconds"]) for p in rule.get("policies", [])
            )
            return (
                rule.get("stabilizationWindowSeconds", default_window),
                policies,
                rule.get("selectPolicy", "Max"),
            )

        up_window, up_policies, up_select = rules("scaleUp", 0)
        down_window, down_policies, down_select = rules("scaleDown", 300)
        return cls(
            spec.get("minReplicas", 1),
            spec["maxReplicas"],
            float(target),
            up_window,
            down_window,
            up_policies or cls.up_policies,
            down_policies or cls.down_policies,
            up_select,
            down_select,
        )


def desired_replicas(current: int, ready: int, metric_total: float, target: float) -> int:
    """The HPA's replica calculation for a Pods metric (``replica_calculator.go``): the usage
    ratio over ready pods, 10% tolerance; on a scale-up, pods not ready yet count as 0 usage."""
    if ready == 0:
        return current
    ratio = metric_total / (target * ready)
    unready = current - ready
    if unready <= 0 or ratio <= 1.0:
        return current if abs(ratio - 1.0) <= TOLERANCE else math.ceil(ratio * ready)
    ratio = metric_total / (target * current)
    if abs(ratio - 1.0) <= TOLERANCE or ratio < 1.0:  # within tolerance, or no longer up
        return current
    return math.ceil(ratio * current)


@dataclass
class Autoscaler:
    """One tier's HPA controller state: recommendations and scale events over time."""

    spec: HpaSpec
    recommendations: deque = field(default_factory=deque)  # (t, desired)
    events: deque = field(default_factory=deque)  # (t, change)

    def _limit(self, current: int, now: float, up: bool) -> int:
        policies = self.spec.up_policies if up else self.spec.down_policies
        limits = []
        for policy in policies:
            changed = sum(c for t, c in self.events if t > now - policy.period_s and (c > 0) == up)
            start = current - changed  # replicas at the start of the policy's period
            if policy.kind == "Pods":
                limits.append(start + policy.value if up else start - policy.value)
            else:
                factor = policy.value / 100
                limits.append(
                    math.ceil(start * (1 + factor)) if up else math.ceil(start * (1 - factor))
                )
        select = self.spec.up_select if up else self.spec.down_select
        if up:  # Max: the policy allowing the largest increase
            return max(limits) if select == "Max" else min(limits)
        return min(limits) if select == "Max" else max(limits)

    def step(self, now: float, current: int, ready: int, metric_total: float) -> int:
        """New replica count after one sync at time ``now``; ``metric_total`` is the sum of
        the metric over the ready pods."""
        raw = desired_replicas(current, ready, metric_total, self.spec.target)
        self.recommendations.append((now, raw))
        horizon = max(self.spec.up_window_s, self.spec.down_window_s)
        while self.recommendations and self.recommendations[0][0] < now - horizon:
            self.recommendations.popleft()
        up_window = [d for t, d in self.recommendations if t >= now - self.spec.up_window_s]
        down_window = [d for t, d in self.recommendations if t >= now - self.spec.down_window_s]
        # Stabilization: scale up no further than the lowest recent recommendation, down no
        # further than the highest.
        desired = current
        if raw > current:
            desired = min(max(current, min(up_window)), self._limit(current, now, up=True))
        elif raw < current:
            desired = max(min(current, max(down_window)), self._limit(current, now, up=False))
        desired = max(self.spec.min_replicas, min(self.spec.max_replicas, desired))
        if desired != current:
            self.events.append((now, desired - current))
        while self.events and self.events[0][0] < now - 3600:
            self.events.popleft()
        return desired


@dataclass
class Tier:
    name: str
    hpa: Autoscaler
    capacity_rps: float  # one ready pod
    service_s: float  # p50 end-to-end latency of one request at load
    p99_s: float
    queue_per_pod: float
    ready: list[float] = field(default_factory=list)  # ready-at times of every pod
    queue: float = 0.0
    served_rate: float = 0.0

    def ready_pods(self, now: float) -> int:
        return sum(1 for at in self.ready if at <= now)

    def in_flight(self) -> float:
        """Running + queued requests over the tier's ready pods (Little's law + the queue)."""
        return self.served_rate * self.service_s + self.queue

    def scale_to(self, replicas: int, now: float, startup_s: float) -> None:
        if replicas > len(self.ready):
            self.ready += [now + startup_s] * (replicas - len(self.ready))
        else:  # the newest (least useful) pods go first
            self.ready = sorted(self.ready)[:replicas]


def load_trace(path: Path) -> list[tuple[float, float]]:
    """``t_s,rps`` lines (CSV, '#' comments); the rate is linear between points."""
    points = []
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("t_s"):
            t, rps = line.split(",")
            points.append((float(t), float(rps)))
    return sorted(points)


def rate_at(trace: list[tuple[float, float]], t: float) -> float:
    for (t0, r0), (t1, r1) in zip(trace, trace[1:], strict=False):
        if t0 <= t <= t1:
            return r0 + (r1 - r0) * (t - t0) / (t1 - t0) if t1 > t0 else r1
    return trace[-1][1] if t > trace[-1][0] else trace[0][1]


def capacity_from_run(summary: dict) -> tuple[float, float, float]:
    """(requests/s one replica sustains, p50 and p99 end-to-end latency in s) of a harness run."""
    best = max(summary["stages"], key=lambda s: s["request_throughput"])
    return best["request_throughput"], best["p50_e2el_ms"] / 1000, best["p99_e2el_ms"] / 1000


def simulate(
    trace,
    primary: Tier,
    fallback: Tier,
    startup_s: float,
    sync_s: float = 15,
    dt: float = 1.0,
    rate_scale: float = 1.0,
) -> dict:
    """Run the trace; returns per-tick series and totals."""
    end = trace[-1][0]
    series: list[dict] = []
    totals = {
        "offered": 0.0,
        "primary": 0.0,
        "fallback": 0.0,
        "rejected": 0.0,
        "gpu_hours_primary": 0.0,
        "gpu_hours_fallback": 0.0,
    }
    for tier in (primary, fallback):
        tier.ready = [0.0] * tier.hpa.spec.min_replicas
    t = 0.0
    while t <= end:
        arrivals = rate_at(trace, t) * dt * rate_scale
        totals["offered"] += arrivals
        tiers = (primary, fallback)
        free = {}
        for tier in tiers:  # queued requests first (FIFO), then the tier's spare capacity
            capacity = tier.ready_pods(t) * tier.capacity_rps * dt
            from_queue = min(tier.queue, capacity)
            tier.queue -= from_queue
            tier.served_rate = from_queue / dt
            free[tier.name] = capacity - from_queue
        overflow = arrivals
        for tier in tiers:  # the router: primary until saturated, then the fallback
            taken = min(overflow, free[tier.name])
            tier.served_rate += taken / dt
            overflow -= taken
        for tier in tiers:  # every tier saturated: bounded queues, then 429
            queued = min(overflow, max(0.0, tier.ready_pods(t) * tier.queue_per_pod - tier.queue))
            tier.queue += queued
            overflow -= queued
        for tier in tiers:
            totals[tier.name] += tier.served_rate * dt
        totals["rejected"] += overflow
        totals["gpu_hours_primary"] += len(primary.ready) * dt / 3600
        totals["gpu_hours_fallback"] += len(fallback.ready) * dt / 3600
        if t % sync_s == 0:
            for tier in (primary, fallback):
                # The primary pods' metric counts the overflow they sent to the fallback tier.
                demand = tier.in_flight() + (fallback.in_flight() if tier is primary else 0.0)
                replicas = tier.hpa.step(t, len(tier.ready), tier.ready_pods(t), demand)
                tier.scale_to(replicas, t, startup_s)
        waits = [
            tier.queue / tier.served_rate if tier.served_rate else 0.0
            for tier in (primary, fallback)
        ]
        p99 = max(
            primary.p99_s + waits[0], fallback.p99_s + waits[1] if fallback.served_rate else 0.0
        )
        series.append(
            {
                "t_s": t,
                "offered_rps": arrivals / dt,
                "primary_ready": primary.ready_pods(t),
                "primary_pods": len(primary.ready),
                "fallback_ready": fallback.ready_pods(t),
                "fallback_pods": len(fallback.ready),
                "primary_queue": primary.queue,
                "fallback_queue": fallback.queue,
                "primary_rps": primary.served_rate,
                "fallback_rps": fallback.served_rate,
                "rejected_rps": overflow / dt,
                "est_p99_latency_s": p99,
                "gpu_hours": totals["gpu_hours_primary"] + totals["gpu_hours_fallback"],
            }
        )
        t += dt
    served = totals["primary"] + totals["fallback"]
    summary = {
        **{k: round(v, 2) for k, v in totals.items()},
        "fallback_share": totals["fallback"] / served if served else 0.0,
        "rejected_share": totals["rejected"] / totals["offered"] if totals["offered"] else 0.0,
        "max_primary_pods": max(s["primary_pods"] for s in series),
        "max_fallback_pods": max(s["fallback_pods"] for s in series),
        "max_est_p99_latency_s": max(s["est_p99_latency_s"] for s in series),
    }
    return {"summary": summary, "series": series}


def hpa_specs(path: Path) -> dict[str, HpaSpec]:
    """The tiers' HPAs from a manifest file or a ``kubectl kustomize`` build of an overlay."""
    docs = [
        d
        for d in yaml.safe_load_all(path.read_text())
        if d and d.get("kind") == "HorizontalPodAutoscaler"
    ]
    return {d["metadata"]["name"].removeprefix("qwen3vl-"): HpaSpec.from_manifest(d) for d in docs}


def plot(result: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["series"]
    minutes = [p["t_s"] / 60 for p in s]
    fig, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    axes[0].plot(minutes, [p["offered_rps"] for p in s], label="offered")
    axes[0].plot(minutes, [p["primary_rps"] for p in s], label="served by primary")
    axes[0].plot(minutes, [p["fallback_rps"] for p in s], label="served by fallback")
    axes[0].plot(minutes, [p["rejected_rps"] for p in s], label="rejected (429)")
    axes[0].set_ylabel("requests/s")
    for tier in ("primary", "fallback"):
        axes[1].plot(minutes, [p[f"{tier}_pods"] for p in s], label=f"{tier} pods")
        axes[1].plot(minutes, [p[f"{tier}_ready"] for p in s], "--", label=f"{tier} ready")
        axes[2].plot(minutes, [p[f"{tier}_queue"] for p in s], label=f"{tier} queue")
    axes[1].set_ylabel("pods")
    axes[2].set_ylabel("queued requests")
    axes[3].plot(minutes, [p["est_p99_latency_s"] for p in s], label="estimated p99 latency")
    axes[3].set_ylabel("seconds")
    axes[3].set_xlabel("minutes")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = out / "autoscale.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(args) -> dict:
    specs = hpa_specs(args.hpa)
    capacity, p50_s, p99_s = (args.capacity_rps, args.service_s, args.p99_s)
    if args.capacity:
        capacity, p50_s, p99_s = capacity_from_run(json.loads(args.capacity.read_text()))
    primary = Tier(
        "primary", Autoscaler(specs["primary"]), capacity, p50_s, p99_s, args.queue_per_pod
    )
    fallback = Tier(
        "fallback",
        Autoscaler(specs["fallback"]),
        capacity * args.fallback_speedup,
        p50_s / args.fallback_speedup,
        p99_s / args.fallback_speedup,
        args.queue_per_pod,
    )
    result = simulate(
        load_trace(args.trace),
        primary,
        fallback,
        args.startup_s,
        args.sync_s,
        rate_scale=args.rate_scale,
    )
    result["settings"] = {
        "trace": str(args.trace),
        "capacity_rps_per_pod": capacity,
        "p50_s": p50_s,
        "p99_s": p99_s,
        "startup_s": args.startup_s,
        "fallback_speedup": args.fallback_speedup,
        "hpa": str(args.hpa),
        "queue_per_pod": args.queue_per_pod,
        "sync_s": args.sync_s,
        "rate_scale": args.rate_scale,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "autoscale.json").write_text(json.dumps(result, indent=1))  # with the series
    summary = {key: result[key] for key in ("summary", "settings")}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(result, args.out)
    return result


def add_arguments(parser) -> None:
    parser.add_argument("--trace", type=Path, default=REPO / "bench/traces/sale-peak.csv")
    parser.add_argument(
        "--capacity", type=Path, help="summary.json of a `bench run` on one replica"
    )
    # Without --capacity: an assumed 8B pod on one H100 (128 sequences, ~3 s per request).
    parser.add_argument("--capacity-rps", type=float, default=40.0, help="without --capacity")
    parser.add_argument(
        "--service-s", type=float, default=3.0, help="p50 latency, without --capacity"
    )
    parser.add_argument("--p99-s", type=float, default=6.0, help="p99 latency, without --capacity")
    parser.add_argument("--rate-scale", type=float, default=1.0, help="multiply the trace's rates")
    parser.add_argument(
        "--fallback-speedup",
        type=float,
        default=2.5,
        help="fallback pod capacity / primary pod capacity (2B vs 8B)",
    )
    parser.add_argument("--startup-s", type=float, default=300, help="pod start to ready")
    parser.add_argument("--queue-per-pod", type=float, default=256, help="max_queued_requests")
    parser.add_argument("--sync-s", type=float, default=15, help="HPA sync period")
    parser.add_argument("--hpa", type=Path, default=REPO / "k8s/base/hpa.yaml")
    parser.add_argument("--out", type=Path, default=REPO / "runs/autoscale")
