"""bench.beside's table: one line per workload and condition, rounds in order, means."""

from __future__ import annotations

from bench.beside import summary


def _row(round_no: int, condition: str, rps: float) -> dict:
    return {
        "round": round_no,
        "condition": condition,
        "workload": "tiny-c1",
        "request_throughput": rps,
        "median_ttft_ms": 30.0,
        "p99_ttft_ms": 40.0 + round_no,
        "median_itl_ms": 2.5,
        "p99_itl_ms": 5.0,
    }


def test_summary_lists_each_condition_by_round_with_the_mean():
    rows = [_row(1, "vllm-alone", 5.0), _row(1, "ours", 4.0), _row(2, "ours", 5.0)]
    lines = summary(rows).splitlines()
    assert lines[2] == "| tiny-c1 | vllm-alone | 5.00 (5.00) | 30.0 | 41.0 | 2.50 |"
    assert lines[3] == "| tiny-c1 | ours | 4.00, 5.00 (4.50) | 30.0 | 41.5 | 2.50 |"
    assert len(lines) == 4
