"""Every metric the autoscaling manifests name is exported by the live server's /metrics."""

from __future__ import annotations

import re

import httpx
import pytest
import yaml

from tests.unit.test_deploy_manifests import REPO, _by_kind, build, needs_kubectl

ADAPTER_VALUES = REPO / "k8s/prometheus-adapter/values.yaml"  # Helm values, adapter's namespace


def _scaling_metric_names() -> set[str]:
    """Prometheus series behind the HPAs (via the adapter rules) and the KEDA triggers."""
    prod = build("gpu-prod")
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    exposed = {r["name"]["as"]: r["seriesQuery"].split("{")[0] for r in rules}
    names = set(exposed.values())
    for hpa in _by_kind(prod, "HorizontalPodAutoscaler").values():
        for metric in hpa["spec"]["metrics"]:
            assert metric["pods"]["metric"]["name"] in exposed, metric  # the adapter serves it
    for scaled in _by_kind(build("keda"), "ScaledObject").values():
        for trigger in scaled["spec"]["triggers"]:
            names |= set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", trigger["metadata"]["query"]))
    return names


@pytest.mark.slow
@needs_kubectl
def test_hpa_adapter_and_keda_metrics_are_exported(server):
    names = _scaling_metric_names()
    assert {"qwen3vl_pod_in_flight_requests", "vllm:kv_cache_usage_perc"} <= names
    text = httpx.get(server.base_url + "/metrics", timeout=30).text
    exported = {
        line.split("{")[0].split(" ")[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert names <= exported, f"not exported: {names - exported}"
