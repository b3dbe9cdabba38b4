"""The fallback burst benchmark's summary (bench/burst.py), on the harness's records and
metrics: counts, shares and TTFT per serving tier."""

from bench.burst import summarise
from bench.client import RequestRecord
from bench.metrics import summarize
from bench.report import Run


def _record(index: int, status: int, served: str | None, ttft_ms: float | None) -> RequestRecord:
    record = RequestRecord(index, "burst", "product", 0.0, status=status, served_model=served)
    if ttft_ms is not None:
        record.ttft_s = ttft_ms / 1000
        record.token_times_s = [record.ttft_s, record.ttft_s + 0.1]
        record.latency_s = record.ttft_s + 0.1
        record.output_tokens = 2
    return record


def _run(records: list[RequestRecord]) -> Run:
    stage = {"stage": "burst", **summarize(records, 10.0)}
    return Run("burst", {}, [stage], [r.as_dict() for r in records])


def test_summary_counts_statuses_and_splits_ttft_by_served_model():
    records = [
        *(_record(i, 200, "primary", 1000.0 + i) for i in range(3)),
        *(_record(3 + i, 200, "fallback", 10.0 * (i + 1)) for i in range(5)),
        _record(8, 429, None, None),
        _record(9, 503, "primary", None),
    ]
    summary = summarise(_run(records), "fallback")
    assert (summary["sent"], summary["completed"]) == (10, 8)
    assert (summary["rejected_429"], summary["errors_5xx"]) == (1, 1)
    assert summary["served_by_fallback_share"] == 5 / 8
    fallback = summary["by_served_model"]["fallback"]
    assert fallback["completed"] == 5 and abs(fallback["p50_ttft_ms"] - 30.0) < 1e-9
    assert abs(fallback["p99_ttft_ms"] - 49.6) < 1e-9  # interpolated, as the harness's metrics
    assert abs(summary["by_served_model"]["primary"]["p50_ttft_ms"] - 1001.0) < 1e-9
    assert abs(summary["p99_ttft_ms"] - 1001.93) < 1e-6


def test_summary_of_a_run_where_nothing_completed():
    summary = summarise(_run([_record(i, 429, None, None) for i in range(4)]), "fallback")
    assert summary["completed"] == 0
    assert summary["p99_ttft_ms"] is None
    assert summary["served_by_fallback_share"] == 0.0
    assert summary["by_served_model"] == {}
