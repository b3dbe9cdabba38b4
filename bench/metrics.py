"""Summary metrics of a stage, defined as vLLM's benchmark client defines them.

- **TTFT** (time to first token): send -> first SSE message carrying ``choices``.
- **TPOT** (time per output token, first token excluded): ``(latency - TTFT) / (output_tokens - 1)``
  per request with more than one output token.
- **ITL** (inter-token latency): gaps between successive token messages, pooled over requests.
- **E2E latency**: send -> last token message.
- **Request throughput**: completed requests / stage duration; **output throughput**: output
  tokens of completed requests / stage duration. Duration runs from the stage's first send to
  its last completion.
- **Goodput**: completed requests meeting every SLO given (``ttft_ms``, ``tpot_ms``, ``e2el_ms``;
  a request with one output token has TPOT 0) / duration.
- Percentiles are numpy's (linear interpolation): mean, p50, p90, p99 of each latency.
- **Errors** by HTTP status (``0`` = no response); **served share**: completed requests per
  ``x-served-model``.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from bench.client import RequestRecord

PERCENTILES = (50, 90, 99)
SLO_KEYS = ("ttft_ms", "tpot_ms", "e2el_ms")


def parse_slo(spec: str | None) -> dict[str, float]:
    """``ttft_ms=500,tpot_ms=50`` -> {'ttft_ms': 500.0, 'tpot_ms': 50.0}."""
    slo = {}
    for item in (spec or "").split(","):
        if not item:
            continue
        key, _, value = item.partition("=")
        if key not in SLO_KEYS:
            raise ValueError(f"unknown SLO {key!r}; use {', '.join(SLO_KEYS)}")
        slo[key] = float(value)
    return slo


def tpot_s(record: RequestRecord) -> float:
    if record.output_tokens > 1:
        return (record.latency_s - record.ttft_s) / (record.output_tokens - 1)
    return 0.0


def _stats(values_s: list[float], name: str) -> dict[str, float | None]:
    if not values_s:
        return {f"mean_{name}_ms": None} | {f"p{p}_{name}_ms": None for p in PERCENTILES}
    ms = np.asarray(values_s) * 1000
    stats = {f"mean_{name}_ms": float(ms.mean())}
    return stats | {f"p{p}_{name}_ms": float(np.percentile(ms, p)) for p in PERCENTILES}


def summarize(
    records: list[RequestRecord], duration_s: float, slo: dict[str, float] | None = None
) -> dict:
    """The stage's summary (a flat dict of numbers, JSON-ready)."""
    ok = [r for r in records if r.success]
    failed = [r for r in records if not r.success]
    tpots = [tpot_s(r) for r in ok if r.output_tokens > 1]
    output_tokens = sum(r.output_tokens for r in ok)
    good = 0
    if slo:
        for r in ok:
            observed = {
                "ttft_ms": r.ttft_s * 1000,
                "tpot_ms": tpot_s(r) * 1000,
                "e2el_ms": r.latency_s * 1000,
            }
            good += all(observed[key] <= limit for key, limit in slo.items())
    served = Counter(r.served_model or "unknown" for r in ok)
    return {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(failed),
        "errors_by_status": dict(sorted(Counter(str(r.status) for r in failed).items())),
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s if duration_s else 0.0,
        "output_throughput": output_tokens / duration_s if duration_s else 0.0,
        "total_output_tokens": output_tokens,
        "goodput": (good / duration_s if duration_s else 0.0) if slo else None,
        "slo": slo or None,
        "served_share": {model: n / len(ok) for model, n in sorted(served.items())},
        **_stats([r.ttft_s for r in ok], "ttft"),
        **_stats(tpots, "tpot"),
        **_stats([gap for r in ok for gap in r.itl_s], "itl"),
        **_stats([r.latency_s for r in ok], "e2el"),
    }
