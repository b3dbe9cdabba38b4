"""The overload soak, short: 75 s at twice the measured capacity with phone photos and bad
requests mixed in (``python -m bench soak`` runs it for 10 minutes; BENCHMARKS.md)."""

from __future__ import annotations

import pytest

from bench.soak import server_processes, soak
from tests.conftest import FALLBACK_SEQS, MODEL, PRIMARY_SEQS, TTFT_SLO_S

pytestmark = pytest.mark.slow


def test_a_minute_at_twice_capacity_breaks_nothing(server):
    processes = server_processes(server.instance)
    assert set(processes) == {"replica", "engine"}, processes
    # The memory baseline after 30 s at full load: the multimodal caches are full by then.
    report = soak(
        server.base_url,
        MODEL,
        PRIMARY_SEQS + FALLBACK_SEQS,
        TTFT_SLO_S,
        processes,
        duration_s=75,
        factor=2.0,
        output_tokens=32,
        warmup_s=30,
    )
    summary = {k: report[k] for k in ("capacity_rps", "statuses", "p99_ttft_s", "rss_growth")}
    print("soak:", summary)
    assert report["passed"], (report["checks"], summary)
    assert report["rejected_429"] > 0, "2x capacity must overflow into 429s, or it was no overload"
