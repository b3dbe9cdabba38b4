"""Offline validation of the Dockerfile and the Kubernetes manifests (no cluster, no Docker).

Every overlay builds with ``kubectl kustomize``; built-in kinds validate with
``kubernetes-validate --strict``; the CRDs (PodMonitor, ScaledObject, RayService) are checked
against the parts of their schemas we use and cross-referenced with the objects they point at;
the RayService's ``serveConfigV2`` validates with Ray's own ``ServeDeploySchema``. On every
overlay's built output: the autoscalers own the pod counts, start-up and shutdown timing fit
the overlay's profile, the weights come from one pinned Job and the serving pods never
download, every container meets the restricted Pod Security profile, NetworkPolicies select
the serving pods, and exec commands name binaries the image installs.
"""

from __future__ import annotations

import functools
import importlib.util
import os
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
PROFILES = {
    "gpu-prod": "configs/gpu-qwen3-vl-8b.yaml",
    "keda": "configs/gpu-qwen3-vl-8b.yaml",
    "rayservice": "configs/gpu-qwen3-vl-8b.yaml",
    "cpu-demo": "configs/cpu-tiny-fallback.yaml",
}
IMAGE_TAGS = {"gpu-prod": "gpu", "keda": "gpu", "rayservice": "gpu", "cpu-demo": "cpu"}  # = stage
BIN = Path(sys.executable).parent
CRD_KINDS = {"PodMonitor", "ScaledObject", "RayService"}
SHUTDOWN_MARGIN_S = 30  # after the drain: Ray, vLLM and the reaper stop
DOCKERFILE = (REPO / "Dockerfile").read_text()

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")


def _kustomize(path: Path) -> list[dict]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(path)], check=True, capture_output=True, text=True
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@functools.cache  # each overlay is built once per session; callers only read the objects
def build(overlay: str) -> list[dict]:
    return _kustomize(REPO / "k8s/overlays" / overlay)


def _by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def _pod_templates(objects: list[dict]) -> dict[str, dict]:
    """Every pod template of a build: Deployments, Jobs, the RayService's head and workers."""
    templates = {}
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in ("Deployment", "Job"):
            templates[name] = obj["spec"]["template"]
        elif obj["kind"] == "RayService":
            cluster = obj["spec"]["rayClusterConfig"]
            templates[f"{name}/head"] = cluster["headGroupSpec"]["template"]
            for group in cluster["workerGroupSpecs"]:
                templates[f"{name}/{group['groupName']}"] = group["template"]
    return templates


def _serving_templates(objects: list[dict]) -> dict[str, dict]:
    return {n: t for n, t in _pod_templates(objects).items() if not n.startswith("Job/")}


def _containers(template: dict) -> list[dict]:
    return [*template["spec"].get("initContainers", []), *template["spec"]["containers"]]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _profile(overlay: str):
    """The profile the overlay's pods run, checked equal to the file it is generated from."""
    from engine.config import load_config

    path = REPO / PROFILES[overlay]
    objects = build(overlay)
    for service in _by_kind(objects, "RayService").values():
        (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
        assert app["args"]["profile"] == yaml.safe_load(path.read_text())
    carried = [
        c["data"]["profile.yaml"]
        for c in _by_kind(objects, "ConfigMap").values()
        if "profile.yaml" in c.get("data", {})
    ]
    assert all(text == path.read_text() for text in carried)
    assert carried or _by_kind(objects, "RayService")  # the pods' profile is one of the two
    return load_config(path)


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
_SELECTOR = {
    "type": "object",
    "properties": {"matchLabels": {"type": "object"}},
    "additionalProperties": False,
}
CRD_SCHEMAS = {
    "PodMonitor": {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "spec": {
                "type": "object",
                "required": ["selector", "podMetricsEndpoints"],
                "additionalProperties": False,
                "properties": {
                    "selector": _SELECTOR,
                    "podMetricsEndpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["port"],
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string"},
                                "interval": {"type": "string", "pattern": "^[0-9]+[smh]$"},
                                "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+[smh]$"},
                            },
                        },
                    },
                },
            }
        },
    },
    "ScaledObject": {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "spec": {
                "type": "object",
                "required": ["scaleTargetRef", "triggers"],
                "additionalProperties": False,
                "properties": {
                    "scaleTargetRef": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {"name": {"type": "string"}},
                    },
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "pollingInterval": {"type": "integer"},
                    "cooldownPeriod": {"type": "integer"},
                    "advanced": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "horizontalPodAutoscalerConfig": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {"behavior": {"type": "object"}},
                            }
                        },
                    },
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["type", "metadata"],
                            "additionalProperties": False,
                            "properties": {
                                "type": {"const": "prometheus"},
                                "name": {"type": "string"},
                                "metadata": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["serverAddress", "query", "threshold"],
                                    "properties": {
                                        k: {"type": "string"}
                                        for k in ("serverAddress", "query", "threshold")
                                    },
                                },
                            },
                        },
                    },
                },
            }
        },
    },
    "RayService": {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "spec": {
                "type": "object",
                "required": ["serveConfigV2", "rayClusterConfig"],
                "additionalProperties": False,
                "properties": {
                    "upgradeStrategy": {
                        "type": "object",
                        "required": ["type"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {
                                "enum": ["NewCluster", "NewClusterWithIncrementalUpgrade", "None"]
                            },
                            "clusterUpgradeOptions": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": [
                                    "gatewayClassName",
                                    "stepSizePercent",
                                    "intervalSeconds",
                                ],
                                "properties": {
                                    "gatewayClassName": {"type": "string"},
                                    **{
                                        k: {"type": "integer", "minimum": 1}
                                        for k in (
                                            "maxSurgePercent",
                                            "stepSizePercent",
                                            "intervalSeconds",
                                        )
                                    },
                                },
                            },
                        },
                    },
                    "serveConfigV2": {"type": "string"},
                    "rayClusterConfig": {
                        "type": "object",
                        "required": ["headGroupSpec", "workerGroupSpecs"],
                        "additionalProperties": False,
                        "properties": {
                            "rayVersion": {"type": "string"},
                            "enableInTreeAutoscaling": {"type": "boolean"},
                            "autoscalerOptions": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {"securityContext": {"type": "object"}},
                            },
                            "headGroupSpec": {
                                "type": "object",
                                "required": ["rayStartParams", "template"],
                            },
                            "workerGroupSpecs": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "type": "object",
                                    "required": ["groupName", "rayStartParams", "template"],
                                },
                            },
                        },
                    },
                },
            }
        },
    },
}


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_match_their_schemas_and_point_at_real_objects(overlay):
    objects = build(overlay)
    deployments = _by_kind(objects, "Deployment")
    for obj in (o for o in objects if o["kind"] in CRD_KINDS):
        jsonschema.validate(obj, CRD_SCHEMAS[obj["kind"]])
    for monitor in _by_kind(objects, "PodMonitor").values():
        wanted = monitor["spec"]["selector"]["matchLabels"]
        scraped = [
            d
            for d in deployments.values()
            if wanted.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
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
    result = subprocess.run(
        [sys.executable, "scripts/gen_k8s.py", "--check"], cwd=REPO, capture_output=True, text=True
    )
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
    result = subprocess.run(
        [str(BIN / "hadolint"), "Dockerfile"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _dockerfile_stages() -> dict[str, tuple[str, str]]:
    """Each build stage's name -> (what it is FROM, its text)."""
    stages = {}
    for block in re.split(r"^FROM ", DOCKERFILE, flags=re.M)[1:]:
        parent, name = re.match(r"(\S+) AS (\S+)", block).groups()
        stages[name] = (parent, block)
    return stages


def _installed(stage: str) -> set[str]:
    """The apt packages a stage installs, its parent stages' included."""
    stages, packages = _dockerfile_stages(), set()
    while stage in stages:
        stage, text = stages[stage]
        for words in re.findall(r"apt-get install([^&]*)", text.replace("\\\n", " ")):
            packages |= {w for w in words.split() if not w.startswith("-")}
    return packages


def test_dockerfile_runs_non_root_with_a_weight_volume_and_the_serve_cli():
    stages = _dockerfile_stages()
    assert list(stages)[-1] == "gpu" and "cpu" in stages  # GPU is the default (last) target
    for name in ("cpu", "gpu"):
        text = stages[name][1]
        assert "USER 10001" in text and "HF_HOME=/models" in text and "EXPOSE 8000" in text
        # tini as PID 1 forwards the kubelet's SIGTERM, so the server drains
        assert 'ENTRYPOINT ["tini", "--", ' in text and '-m", "engine"]' in text
        assert "tini" in _installed(name)
    assert "HF_HUB_OFFLINE=1" in stages["gpu"][1] and "ARG VLLM_VERSION" in DOCKERFILE


def test_manifests_are_yamllint_clean():
    config = "{extends: relaxed, rules: {line-length: {max: 140}}}"
    result = subprocess.run(
        [str(BIN / "yamllint"), "-s", "-d", config, "k8s", "configs"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout


# ---- deploy invariants, on every overlay's built output ------------------------------------


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscalers_own_the_pod_counts_and_every_reference_resolves(overlay):
    """A `replicas` next to an HPA/ScaledObject resets a peak's pod count on every apply."""
    objects = build(overlay)
    deployments = _by_kind(objects, "Deployment")
    scalers = [
        *_by_kind(objects, "HorizontalPodAutoscaler").values(),
        *_by_kind(objects, "ScaledObject").values(),
    ]
    targets = [s["spec"]["scaleTargetRef"]["name"] for s in scalers]
    assert sorted(targets) == sorted(deployments)  # each tier scaled once, each target exists
    for name in targets:
        assert "replicas" not in deployments[name]["spec"], f"{name}: the autoscaler owns it"
    for pdb in _by_kind(objects, "PodDisruptionBudget").values():
        wanted = pdb["spec"]["selector"]["matchLabels"].items()
        guarded = [
            n
            for n, d in deployments.items()
            if wanted <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert guarded == [pdb["metadata"]["name"]]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_outlasts_prestop_drain_and_shutdown(overlay):
    drain_s = _profile(overlay).drain_timeout_s
    for name, template in _serving_templates(build(overlay)).items():
        prestop_s = 0.0
        for container in template["spec"]["containers"]:
            hook = container.get("lifecycle", {}).get("preStop", {})
            if "exec" in hook:
                assert hook["exec"]["command"][0] == "sleep", hook  # a wait whose length we know
                prestop_s = max(prestop_s, float(hook["exec"]["command"][1]))
        grace_s = template["spec"].get("terminationGracePeriodSeconds", 30)
        assert grace_s > prestop_s + drain_s + SHUTDOWN_MARGIN_S, (name, grace_s, prestop_s)


@needs_kubectl
@pytest.mark.parametrize("overlay", ["gpu-prod", "cpu-demo", "keda"])
def test_startup_probe_and_progress_deadline_outlast_the_apps_startup_timeout(overlay):
    """Otherwise a slow load is killed by the kubelet, or reported as a failed rollout."""
    startup_s = _profile(overlay).server.startup_timeout_s
    deployments = _by_kind(build(overlay), "Deployment")
    assert deployments
    for name, deployment in deployments.items():
        assert deployment["spec"].get("progressDeadlineSeconds", 600) > startup_s, name
        (server,) = [
            c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "server"
        ]
        probe = server["startupProbe"]
        window_s = probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)
        assert window_s > startup_s, (name, window_s)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_exec_commands_name_binaries_the_image_installs(overlay):
    installed = _installed(IMAGE_TAGS[overlay]) | {"python", "python3"}
    essential = {"sleep"}  # coreutils: Essential in every Debian and Ubuntu base image
    objects = build(overlay)
    for name, template in _pod_templates(objects).items():
        for container in _containers(template):
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                if "exec" in container.get(probe, {}):
                    assert Path(container[probe]["exec"]["command"][0]).name in installed
            hook = container.get("lifecycle", {}).get("preStop", {})
            if "exec" in hook:
                assert Path(hook["exec"]["command"][0]).name in installed | essential, name
            if "command" in container:
                assert Path(container["command"][0]).name in installed, name
    if _by_kind(objects, "RayService"):
        assert "wget" in installed  # KubeRay's injected readiness and liveness probes run wget


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_select_every_serving_pod_and_open_only_the_api(overlay):
    objects = build(overlay)
    policies = [
        p
        for p in _by_kind(objects, "NetworkPolicy").values()
        if "Ingress" in p["spec"]["policyTypes"]
    ]
    for name, template in _serving_templates(objects).items():
        labels = template["metadata"]["labels"].items()
        selecting = [
            p for p in policies if p["spec"]["podSelector"].get("matchLabels", {}).items() <= labels
        ]
        assert any(p["spec"]["podSelector"] for p in selecting), f"{name}: no policy of its own"
        open_ports = set()
        for rule in (r for p in selecting for r in p["spec"].get("ingress", [])):
            if not rule.get("from"):  # any source: must name its ports
                open_ports |= {port["port"] for port in rule["ports"]}
        assert open_ports <= {"http", 8000}, f"{name}: {open_ports} open to anyone"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_meets_the_restricted_pod_security_profile(overlay):
    objects = build(overlay)
    for name, template in _pod_templates(objects).items():
        pod = template["spec"].get("securityContext", {})
        for container in _containers(template):
            where, context = f"{name}/{container['name']}", container.get("securityContext", {})
            assert context.get("allowPrivilegeEscalation") is False, where
            assert "ALL" in context["capabilities"]["drop"], where
            assert not context["capabilities"].get("add") and not context.get("privileged"), where
            assert context.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, where
            assert context.get("runAsUser", pod.get("runAsUser")) != 0, where
            seccomp = context.get("seccompProfile", pod.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", where
    for service in _by_kind(objects, "RayService").values():  # its autoscaler sidecar
        sidecar = service["spec"]["rayClusterConfig"]["autoscalerOptions"]["securityContext"]
        assert sidecar["allowPrivilegeEscalation"] is False
        assert sidecar["capabilities"]["drop"] == ["ALL"]
    for namespace in _by_kind(objects, "Namespace").values():  # admission checks it too
        labels, modes = namespace["metadata"]["labels"], ("enforce", "warn")
        assert "restricted" in {labels.get(f"pod-security.kubernetes.io/{m}") for m in modes}


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_weights_come_from_one_pinned_job_and_serving_pods_never_download(overlay):
    from engine.config import GENERATED_PREFIX

    objects = build(overlay)
    hub_models = {
        m.model
        for m in _profile(overlay).models
        if m.model and not m.model.startswith(GENERATED_PREFIX)
    }
    serving = _serving_templates(objects)
    for name, template in serving.items():
        for container in _containers(template):
            where, command = f"{name}/{container['name']}", container.get("command", [])
            assert _env(container)["HF_HUB_OFFLINE"]["value"] == "1", where
            assert "fetch" not in command and "snapshot_download" not in " ".join(command), where
    jobs = _by_kind(objects, "Job")
    if not hub_models:  # the CPU demo's model is generated in the image: no cache, no Job
        assert not jobs and not _by_kind(objects, "PersistentVolumeClaim")
        return
    (job,) = jobs.values()
    (fetch,) = job["spec"]["template"]["spec"]["containers"]
    assert fetch["command"][-1] == "fetch"
    env = _env(fetch)
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True  # public models: none
    setting = env["QWEN3VL_WEIGHTS"]["valueFrom"]["configMapKeyRef"]
    pinned = _by_kind(objects, "ConfigMap")[setting["name"]]["data"][setting["key"]].split()
    assert all(re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", p) for p in pinned), pinned
    assert {p.split("@")[0] for p in pinned} == hub_models  # every served model, pinned
    for name, template in serving.items():  # each pod waits for exactly the Job's snapshots
        (wait,) = [c for c in template["spec"]["initContainers"] if c["name"] == "wait-for-weights"]
        assert wait["command"][-1] == "wait", name
        assert _env(wait)["QWEN3VL_WEIGHTS"]["value"].split() == pinned, name


@needs_kubectl
@pytest.mark.parametrize("overlay", ["gpu-prod", "keda", "rayservice"])
def test_the_weight_cache_claim_names_its_read_write_many_storage_class(overlay):
    (claim,) = _by_kind(build(overlay), "PersistentVolumeClaim").values()
    assert claim["spec"]["storageClassName"]  # never the cluster default (often RWO)
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_the_kustomize_setting_not_a_placeholder_registry(overlay):
    images = {c["image"] for t in _pod_templates(build(overlay)).values() for c in _containers(t)}
    assert images == {f"qwen3vl-serve:{IMAGE_TAGS[overlay]}"}  # the overlay's `images:` entry


@needs_kubectl
def test_base_applies_on_a_bare_cluster():
    """Built-in kinds only: CRD-backed objects (PodMonitor) are optional components."""
    groups = {o["apiVersion"].rpartition("/")[0] for o in _kustomize(REPO / "k8s/base")}
    assert groups <= {"", "apps", "batch", "policy", "autoscaling", "networking.k8s.io"}


@needs_kubectl
def test_prometheus_adapter_rules_serve_every_hpa_metric():
    values = yaml.safe_load((REPO / "k8s/prometheus-adapter/values.yaml").read_text())
    served = {rule["name"]["as"] for rule in values["rules"]["custom"]}
    for overlay in OVERLAYS:
        for hpa in _by_kind(build(overlay), "HorizontalPodAutoscaler").values():
            assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]} <= served


@needs_kubectl
@pytest.mark.parametrize(
    ("component", "overlay", "kind"),
    [
        ("podmonitor", "cpu-demo", "PodMonitor"),
        ("rayservice-incremental-upgrade", "rayservice", "RayService"),
    ],
)
def test_optional_components_build_on_their_overlay(component, overlay, kind, tmp_path):
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(REPO / "k8s/overlays" / overlay, tmp_path)],
                "components": [os.path.relpath(REPO / "k8s/components" / component, tmp_path)],
            }
        )
    )
    (obj,) = _by_kind(_kustomize(tmp_path), kind).values()
    jsonschema.validate(obj, CRD_SCHEMAS[kind])
    if kind == "RayService":
        assert obj["spec"]["upgradeStrategy"]["type"] == "NewClusterWithIncrementalUpgrade"


# ---- the weights script the Job and the wait-for-weights init containers run ---------------


@pytest.fixture
def weights(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("weights", REPO / "k8s/base/cache/weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    return module


def test_weights_job_refuses_anything_but_a_full_commit(weights, monkeypatch):
    for unpinned in ("Qwen/Qwen3-VL-8B-Instruct@main", "Qwen/Qwen3-VL-8B-Instruct", " "):
        monkeypatch.setenv("QWEN3VL_WEIGHTS", unpinned)
        with pytest.raises(SystemExit) as refused:
            weights.fetch(download=lambda *args, **kwargs: pytest.fail("downloaded"))
        assert refused.value.code == 2  # the Job's podFailurePolicy: fail at once, no retries
    shipped = yaml.safe_load((REPO / "k8s/base/cache/weights.yaml").read_text())["data"]["MODELS"]
    monkeypatch.setenv("QWEN3VL_WEIGHTS", shipped)
    assert [repo for repo, _ in weights.pinned_snapshots()] == [
        "Qwen/Qwen3-VL-8B-Instruct",
        "Qwen/Qwen3-VL-2B-Instruct",
    ]


def test_pods_wait_until_the_job_has_cached_the_pinned_commit(weights, monkeypatch, tmp_path):
    commit, other = "a" * 40, "b" * 40
    monkeypatch.setenv("QWEN3VL_WEIGHTS", f"Qwen/Model@{commit}")
    downloads, polls = [], []

    def job_runs_meanwhile(seconds: float) -> None:
        polls.append(seconds)
        weights.fetch(download=lambda repo, revision: downloads.append((repo, revision)))

    weights.wait(sleep=job_runs_meanwhile)
    assert len(polls) == 1 and downloads == [("Qwen/Model", commit)]
    assert (tmp_path / "hub/models--Qwen--Model/refs/main").read_text() == commit  # offline loads
    weights.fetch(download=lambda *args, **kwargs: pytest.fail("downloaded twice"))
    (tmp_path / ".qwen3vl-weights" / f"Qwen--Model@{other}").write_text("")
    assert not weights.is_ready("Qwen/Model", other)  # refs/main still names the first commit


@needs_kubectl
@pytest.mark.parametrize("overlay", ["gpu-prod", "keda"])
def test_tiers_spread_over_zones_and_nodes_and_land_only_on_gpus_that_fit(overlay):
    deployments = _by_kind(build(overlay), "Deployment")
    least_memory = {"qwen3vl-primary": 40000, "qwen3vl-fallback": 20000}  # MiB, 8B and 2B
    for name, floor in least_memory.items():
        spec = deployments[name]["spec"]["template"]["spec"]
        spread = spec["topologySpreadConstraints"]
        assert {c["topologyKey"] for c in spread} == {
            "topology.kubernetes.io/zone",
            "kubernetes.io/hostname",
        }
        component = deployments[name]["spec"]["selector"]["matchLabels"]
        assert all(c["labelSelector"]["matchLabels"] == component for c in spread)
        (term,) = spec["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]["nodeSelectorTerms"]
        rules = {e["key"]: e for e in term["matchExpressions"]}
        assert rules["nvidia.com/gpu.memory"]["operator"] == "Gt"
        assert int(rules["nvidia.com/gpu.memory"]["values"][0]) >= floor
        assert rules["nvidia.com/gpu.compute.major"] == {
            "key": "nvidia.com/gpu.compute.major",
            "operator": "Gt",
            "values": ["7"],  # FLASH_ATTN and bf16: Ampere or newer
        }
