"""Serving metrics in Prometheus form, next to the engines' own ``vllm:*`` metrics.

The vLLM engines run in the same process as the ingress, so their Prometheus collectors
live in the same default registry and ``/metrics`` exposes both with one scrape.
"""

from __future__ import annotations

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
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

IMAGE_DECODES_WAITING = Gauge(
    "qwen3vl_image_decodes_waiting",
    "Images waiting for a decode thread (large images: one decode per core at a time; small ones: four per core).",
)

ONNX_DECODE_BATCH = Histogram(
    "qwen3vl_onnx_decode_batch_size",
    "Sequences advanced by one batched decoder call of an ONNX Runtime engine.",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)


def exposition() -> tuple[bytes, str]:
    """The Prometheus text exposition of every metric in this process."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


ENGINE_INFO = Gauge(
    "qwen3vl_engine_info",
    "1 per engine in this process, labelled with the vLLM release and the attention backends "
    "it runs (the decoder's paged attention and the vision encoder's).",
    ["model", "vllm_version", "attention_backend", "mm_encoder_attention_backend"],
)
FALLBACKS = Counter(
    "qwen3vl_fallbacks",
    "Requests served by a fallback instead of the requested model.",
    ["requested_model", "served_model"],
)
POD_IN_FLIGHT = Gauge(
    "qwen3vl_pod_in_flight_requests",
    "Requests this pod's ingress holds, running or queued, whichever model serves them "
    "(overflow sent to a fallback included): the demand on this tier, the per-pod metric a "
    "Kubernetes HPA scales it on (no labels, so no label selector is needed).",
)
REJECTIONS = Counter(
    "qwen3vl_rejections",
    "Requests refused by admission control, by reason "
    "(saturated_strict, queue_full, deadline_exceeded).",
    ["requested_model", "reason"],
)
SATURATED = Gauge(
    "qwen3vl_model_saturated",
    "1 while this replica routes away from the model (saturated, with hysteresis), else 0.",
    ["model"],
)
IN_FLIGHT = Gauge(
    "qwen3vl_in_flight_requests",
    "Requests this replica has admitted to the model and not finished: running plus queued. "
    "The per-pod metric to autoscale on.",
    ["model"],
)


def merge_expositions(texts: list[bytes]) -> bytes:
    """Merge Prometheus text from several processes (one family, many label sets)."""
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.registry import Collector

    families: dict[str, object] = {}
    for text in texts:
        for family in text_string_to_metric_families(text.decode()):
            if family.name in families:
                families[family.name].samples.extend(family.samples)  # type: ignore[attr-defined]
            else:
                families[family.name] = family

    class _Merged(Collector):
        def collect(self):
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)
