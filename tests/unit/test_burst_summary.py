"""The fallback burst benchmark's summary (bench/burst.py): counts, shares and TTFT per tier."""

from bench.burst import summarise


def _ok(served: str, ttft_ms: float) -> dict:
    return {"status": 200, "served": served, "ttft_ms": ttft_ms, "e2e_ms": ttft_ms + 100}


def test_summary_counts_statuses_and_splits_ttft_by_served_model():
    results = [
        *(_ok("primary", 1000.0 + i) for i in range(3)),
        *(_ok("fallback", 10.0 * (i + 1)) for i in range(5)),
        {"status": 429, "served": None, "ttft_ms": None},
        {"status": 503, "served": "primary", "ttft_ms": None},
    ]
    summary = summarise(results, "fallback")
    assert (summary["sent"], summary["completed"]) == (10, 8)
    assert (summary["rejected_429"], summary["errors_5xx"]) == (1, 1)
    assert summary["served_by_fallback_share"] == 5 / 8
    assert summary["p99_ttft_ms"] == 1002.0
    assert summary["by_served_model"]["fallback"] == {
        "completed": 5,
        "p50_ttft_ms": 30.0,
        "p99_ttft_ms": 50.0,
    }
    assert summary["by_served_model"]["primary"]["p50_ttft_ms"] == 1001.0


def test_summary_of_a_run_where_nothing_completed():
    summary = summarise([{"status": 429, "served": None, "ttft_ms": None}] * 4, "fallback")
    assert summary["completed"] == 0
    assert summary["p99_ttft_ms"] is None
    assert summary["served_by_fallback_share"] == 0.0
    assert summary["by_served_model"] == {}
