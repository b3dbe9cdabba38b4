"""Serving metrics in Prometheus form, next to the engines' own ``vllm:*`` metrics.

The vLLM engines run in the same process as the ingress, so their Prometheus collectors
live in the same default registry and ``/metrics`` exposes both with one scrape.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter(
    "qwen3vl_requests",
    "Chat requests by requested model, served model and HTTP status.",
    ["requested_model", "served_model", "status"],
)
TIME_TO_FIRST_TOKEN = Histogram(
    "qwen3vl_time_to_first_token_seconds",
    "Arrival at the ingress to the first generated token, per served model.",
    ["served_model"],
    buckets=_LATENCY_BUCKETS_S,
)
E2E_LATENCY = Histogram(
    "qwen3vl_e2e_request_latency_seconds",
    "Arrival at the ingress to the last token, per served model.",
    ["served_model"],
    buckets=_LATENCY_BUCKETS_S,
)
IMAGE_PREPROCESS = Histogram(
    "qwen3vl_image_preprocess_seconds",
    "Fetch, decode, check and resize of one image.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
)


def exposition() -> tuple[bytes, str]:
    """The Prometheus text exposition of every metric in this process."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
