"""Which model serves a request: the primary, a fallback, or nobody (429).

Each model has a ``ModelLoad``: requests this ingress replica has in flight on it (exact,
updated on every admit/release, no network hop) and the engine's KV-cache usage (from vLLM's
per-step scheduler stats, for engines in this process). A model is *saturated* when its
in-flight requests reach ``max_running_requests + max_waiting_requests`` or its KV usage
reaches ``max_kv_cache_usage``; it stops being saturated only when both are at or below
``resume_fraction`` of their thresholds (hysteresis, so routing does not flap). A model is *full* when its queue reaches ``max_queued_requests``: the hard
bound on waiting.

Decision for a request to model M with fallbacks F1..Fn:
  1. the first of M, F1..Fn (only M if the request is strict) that is not saturated;
  2. else the one, of those not full, whose queue per running slot is shortest (bounded
     waiting, least expected wait; ties go to the earlier in the list);
  3. else 429 with Retry-After.
A strict request to a saturated M gets 429 at step 1 instead of a substitute.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import AppConfig, SaturationPolicy
from engine.errors import RequestError


class ModelLoad:
    """Live load of one model as seen by this ingress replica."""

    def __init__(self, name: str, policy: SaturationPolicy) -> None:
        self.name = name
        self.policy = policy
        self.in_flight = 0
        self.kv_cache_usage = 0.0
        self.saturated = False

    @property
    def capacity(self) -> int:
        """Requests it takes before it counts as saturated: running slots plus allowed queue."""
        return self.policy.max_running_requests + self.policy.max_waiting_requests

    @property
    def waiting(self) -> int:
        return max(0, self.in_flight - self.policy.max_running_requests)

    @property
    def full(self) -> bool:
        return self.waiting >= self.policy.max_queued_requests

    def update(self) -> bool:
        """Re-evaluate saturation (with hysteresis); returns the new state."""
        p = self.policy
        if not self.saturated:
            if self.in_flight >= self.capacity or self.kv_cache_usage >= p.max_kv_cache_usage:
                self.saturated = True
        elif (
            self.in_flight <= p.resume_fraction * self.capacity
            and self.kv_cache_usage <= p.resume_fraction * p.max_kv_cache_usage
        ):
            self.saturated = False
        return self.saturated


@dataclass(frozen=True, slots=True)
class Route:
    """The routing decision for one request."""

    served_model: str
    fell_back: bool


class Router:
    """Routes by live load; the decision is a few comparisons on local counters."""

    def __init__(self, config: AppConfig, kv_cache_usage: dict | None = None) -> None:
        self._kv_cache_usage = kv_cache_usage or {}  # model -> () -> float, engines in-process
        self.loads = {m.name: ModelLoad(m.name, m.saturation_policy()) for m in config.models}
        self.fallbacks: dict[str, list[str]] = {m.name: [] for m in config.models}
        if config.routing is not None:
            self.fallbacks[config.routing.primary] = list(config.routing.fallbacks)
        self.retry_after_s = config.admission.retry_after_s

    def choose(self, requested: str, allow_fallback: bool) -> Route:
        """Pick the model for a request to ``requested``; raise 429 if none can take it."""
        candidates = [requested, *self.fallbacks[requested]] if allow_fallback else [requested]
        loads = [self.loads[name] for name in candidates]
        for load in loads:
            if not self._refresh(load):
                return Route(load.name, load.name != requested)
        if not allow_fallback:
            raise self._reject(
                requested,
                "saturated_strict",
                f"model {requested!r} is saturated and the request forbids fallback",
            )
        # Bounded waiting: queue where the wait is expected to be shortest (queue length per
        # running slot), so a large fallback drains overflow instead of the small primary.
        open_queues = [load for load in loads if not load.full]
        if open_queues:
            load = min(open_queues, key=lambda q: (q.waiting + 1) / q.policy.max_running_requests)
            return Route(load.name, load.name != requested)
        raise self._reject(
            requested,
            "queue_full",
            f"model {requested!r} and its fallbacks are saturated and their queues are full",
        )

    def admit(self, name: str) -> None:
        self.loads[name].in_flight += 1

    def release(self, name: str) -> None:
        load = self.loads[name]
        load.in_flight -= 1
        self._refresh(load)

    def _refresh(self, load: ModelLoad) -> bool:
        if load.name in self._kv_cache_usage:
            load.kv_cache_usage = self._kv_cache_usage[load.name]()
        return load.update()

    def _reject(self, model: str, reason: str, message: str) -> RequestError:
        return RequestError(
            f"{message}; retry after {self.retry_after_s}s",
            status_code=429,
            code=reason,
            error_type="rate_limit_error",
            param="model",
            headers={"Retry-After": str(self.retry_after_s)},
        )
