"""Offline validation of the Dockerfile and the Kubernetes manifests (no cluster, no Docker).

Every overlay builds with ``kubectl kustomize``; built-in kinds validate with
``kubernetes-validate --strict``; the CRDs (PodMonitor, ScaledObject, RayService) are checked
against the parts of their schemas we use and cross-referenced with the objects they point at;
the RayService's ``serveConfigV2`` validates with Ray's own ``ServeDeploySchema``.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
OVERLAYS = ("gpu-prod", "cpu-demo", "keda", "rayservice")
BIN = Path(sys.executable).parent
CRD_KINDS = {"PodMonitor", "ScaledObject", "RayService"}

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")


@functools.cache  # each overlay is built once per session; callers only read the objects
def build(overlay: str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(REPO / "k8s/overlays" / overlay)],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    return [doc for doc in yaml.safe_load_all(out) if doc]


def _by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_objects_validate_strictly(overlay):
    import kubernetes_validate

    objects = build(overlay)
    assert objects
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            continue
        kubernetes_validate.validate(obj, "1.33.0", strict=True)  # raises on any error


# The parts of the CRDs' OpenAPI schemas that these manifests use; unknown fields are errors.
_SELECTOR = {"type": "object", "properties": {"matchLabels": {"type": "object"}},
             "additionalProperties": False}  # fmt: skip
CRD_SCHEMAS = {
    "PodMonitor": {
        "type": "object", "required": ["spec"],
        "properties": {"spec": {
            "type": "object", "required": ["selector", "podMetricsEndpoints"], "additionalProperties": False,
            "properties": {
                "selector": _SELECTOR,
                "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["port"],
                    "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                   "interval": {"type": "string", "pattern": "^[0-9]+[smh]$"},
                                   "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+[smh]$"}},
                }},
            },
        }},
    },
    "ScaledObject": {
        "type": "object", "required": ["spec"],
        "properties": {"spec": {
            "type": "object", "required": ["scaleTargetRef", "triggers"], "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                   "properties": {"name": {"type": "string"}}},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer"}, "cooldownPeriod": {"type": "integer"},
                "advanced": {"type": "object", "additionalProperties": False, "properties": {
                    "horizontalPodAutoscalerConfig": {"type": "object", "additionalProperties": False,
                                                      "properties": {"behavior": {"type": "object"}}}}},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
                    "properties": {"type": {"const": "prometheus"}, "name": {"type": "string"},
                                   "metadata": {"type": "object", "additionalProperties": False,
                                                "required": ["serverAddress", "query", "threshold"],
                                                "properties": {k: {"type": "string"} for k in
                                                               ("serverAddress", "query", "threshold")}}},
                }},
            },
        }},
    },
    "RayService": {
        "type": "object", "required": ["spec"],
        "properties": {"spec": {
            "type": "object", "required": ["serveConfigV2", "rayClusterConfig"], "additionalProperties": False,
            "properties": {
                "serveConfigV2": {"type": "string"},
                "rayClusterConfig": {
                    "type": "object", "required": ["headGroupSpec", "workerGroupSpecs"], "additionalProperties": False,
                    "properties": {
                        "rayVersion": {"type": "string"}, "enableInTreeAutoscaling": {"type": "boolean"},
                        "headGroupSpec": {"type": "object", "required": ["rayStartParams", "template"]},
                        "workerGroupSpecs": {"type": "array", "minItems": 1, "items": {
                            "type": "object", "required": ["groupName", "rayStartParams", "template"]}},
                    },
                },
            },
        }},
    },
}  # fmt: skip


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_match_their_schemas_and_point_at_real_objects(overlay):
    objects = build(overlay)
    deployments = _by_kind(objects, "Deployment")
    for obj in (o for o in objects if o["kind"] in CRD_KINDS):
        jsonschema.validate(obj, CRD_SCHEMAS[obj["kind"]])
    for monitor in _by_kind(objects, "PodMonitor").values():
        wanted = monitor["spec"]["selector"]["matchLabels"]
        scraped = [d for d in deployments.values()
                   if wanted.items() <= d["spec"]["template"]["metadata"]["labels"].items()]  # fmt: skip
        assert len(scraped) == 2  # both tiers
        for deployment in scraped:
            ports = {
                p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
            }
            assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= ports
    for scaled in _by_kind(objects, "ScaledObject").values():
        assert scaled["spec"]["scaleTargetRef"]["name"] in deployments
    # the pod templates mount the generated profile ConfigMap that exists in the build
    configmaps = _by_kind(objects, "ConfigMap")
    for deployment in deployments.values():
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["profile"]["configMap"]["name"] in configmaps


@needs_kubectl
def test_rayservice_serve_config_validates_with_rays_own_schema():
    from ray.serve.schema import ServeDeploySchema

    (service,) = _by_kind(build("rayservice"), "RayService").values()
    config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (app,) = config.applications
    assert app.import_path == "engine.app:app_builder"
    from engine.config import AppConfig

    profile = AppConfig.model_validate(app.args["profile"])  # the builder's input is valid
    assert profile.primary.name == "Qwen/Qwen3-VL-8B-Instruct"
    assert {d.name for d in app.deployments} == {
        "OpenAIServer",
        "ModelServer-Qwen-Qwen3-VL-2B-Instruct",
    }


def test_generated_k8s_files_are_up_to_date():
    result = subprocess.run([sys.executable, "scripts/gen_k8s.py", "--check"], cwd=REPO,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr


@needs_kubectl
@pytest.mark.parametrize("overlay", ["gpu-prod", "cpu-demo"])
def test_each_tier_runs_the_profile_it_is_given(overlay):
    """The pods' CLI flags name models of the profile the ConfigMap carries."""
    from engine.config import AppConfig, tier_config

    objects = build(overlay)
    (configmap,) = [
        c for c in _by_kind(objects, "ConfigMap").values() if "profile.yaml" in c["data"]
    ]
    profile = AppConfig.model_validate(yaml.safe_load(configmap["data"]["profile.yaml"]))
    for deployment in _by_kind(objects, "Deployment").values():
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        flags = dict(a.removeprefix("--").split("=", 1) for a in args if "=" in a)
        remotes = dict([flags["remote"].split("=", 1)]) if "remote" in flags else None
        tier = tier_config(profile, flags.get("serve-only"), remotes, "--single-replica" in args)
        assert all(m.autoscaling_config is None and m.num_replicas == 1 for m in tier.models)
        if "remote" in flags:  # the primary tier reaches the fallback tier's Service
            assert tier.fallbacks[0].url == "http://qwen3vl-fallback:8000"


def test_dockerfile_is_hadolint_clean():
    result = subprocess.run([str(BIN / "hadolint"), "Dockerfile"], cwd=REPO, capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_non_root_with_a_weight_volume_and_the_serve_cli():
    text = (REPO / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\S+)$", text, re.M)
    assert stages == ["gpu-build", "cpu", "gpu"]  # GPU is the default (last) target
    for stage in text.split("\nFROM ")[2:]:
        assert "USER 10001" in stage and 'ENTRYPOINT ["' in stage and '-m", "engine"]' in stage
        assert "HF_HOME=/models" in stage and "EXPOSE 8000" in stage
    assert "HF_HUB_OFFLINE=1" in text and "ARG VLLM_VERSION" in text and "flash-attn" in text


def test_manifests_are_yamllint_clean():
    config = "{extends: relaxed, rules: {line-length: {max: 140}}}"
    result = subprocess.run([str(BIN / "yamllint"), "-s", "-d", config, "k8s", "configs"], cwd=REPO,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout
