"""Generate the Kubernetes files that come from the project's YAML profiles.

    python scripts/gen_k8s.py          # write them
    python scripts/gen_k8s.py --check  # exit 1 if any is stale (a test runs this)

- ``k8s/overlays/gpu-prod/profile.yaml`` and ``k8s/overlays/cpu-demo/profile.yaml``: the
  profiles the overlays' ConfigMaps are generated from (kustomize reads files only below
  the kustomization, so they are copies, kept equal here).
- ``k8s/overlays/rayservice/rayservice.yaml``: a KubeRay RayService whose ``serveConfigV2``
  is the GPU profile as a Ray Serve application (``engine.app:app_builder``), with each
  deployment's resources and autoscaling taken from the profile. Its pods match the
  Deployments': they wait for the weights Job (``k8s/base/cache``) and never download, meet
  the restricted Pod Security profile, and get the Deployments' grace period.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.app import APP_NAME, deployment_name  # noqa: E402
from engine.config import load_config  # noqa: E402

GPU_PROFILE = REPO / "configs" / "gpu-qwen3-vl-8b.yaml"
COPIES = {
    REPO / "k8s/overlays/gpu-prod/profile.yaml": GPU_PROFILE,
    REPO / "k8s/overlays/cpu-demo/profile.yaml": REPO / "configs" / "cpu-tiny-fallback.yaml",
}
RAYSERVICE = REPO / "k8s/overlays/rayservice/rayservice.yaml"
RAY_VERSION = "2.60.0"


def serve_config(profile_path: Path) -> dict:
    """Ray Serve's config file format (``ServeDeploySchema``) for the profile."""
    config = load_config(profile_path)
    profile = yaml.safe_load(profile_path.read_text())
    deployments = []
    for model in config.models:
        name = "OpenAIServer" if model.name == config.primary.name else deployment_name(model.name)
        options = model.deployment_options(config.drain_timeout_s)
        deployments.append({"name": name, **options})
    return {
        "http_options": {"host": "0.0.0.0", "port": config.server.port},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": "engine.app:app_builder",
                "args": {"profile": profile},
                "deployments": deployments,
            }
        ],
    }


# The restricted Pod Security profile; KubeRay copies the Ray container's securityContext into
# the init container it injects (wait-gcs-ready).
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "runAsGroup": 10001,
    "fsGroup": 10001,
    "fsGroupChangePolicy": "OnRootMismatch",
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
POD_LABELS = {"app.kubernetes.io/name": "qwen3vl-ray"}  # the overlay's NetworkPolicy selects these


def _container(name: str, resources: dict, env: list[dict], gpu: bool) -> dict:
    mounts = [
        {"name": "model-cache", "mountPath": "/models"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    container = {
        "name": name,
        "image": "qwen3vl-serve",
        "resources": resources,
        "env": env,
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": mounts,
    }
    if not gpu:
        container["ports"] = [
            {"containerPort": 6379, "name": "gcs"},
            {"containerPort": 8265, "name": "dashboard"},
            {"containerPort": 8000, "name": "serve"},
            {"containerPort": 10001, "name": "client"},
        ]
    return container


def _wait_for_weights() -> dict:
    """The init container that waits for the weights Job (k8s/base/cache); downloads nothing."""
    return {
        "name": "wait-for-weights",
        "image": "qwen3vl-serve",
        "command": ["python3", "/opt/qwen3vl-weights/weights.py", "wait"],
        "env": [
            {"name": "HF_HOME", "value": "/models"},
            {"name": "HF_HUB_OFFLINE", "value": "1"},
            # replaced from ConfigMap qwen3vl-weights by the overlay's kustomization
            {"name": "QWEN3VL_WEIGHTS", "value": "set-by-kustomize"},
        ],
        "securityContext": CONTAINER_SECURITY,
        "resources": {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"memory": "256Mi"},
        },
        "volumeMounts": [
            {"name": "model-cache", "mountPath": "/models", "readOnly": True},
            {"name": "weights-script", "mountPath": "/opt/qwen3vl-weights", "readOnly": True},
        ],
    }


def _pod(container: dict, role: str, grace_s: int, gpu: bool) -> dict:
    spec = {
        "terminationGracePeriodSeconds": grace_s,
        "securityContext": POD_SECURITY,
        "initContainers": [_wait_for_weights()],
        "containers": [container],
        "volumes": [
            {"name": "model-cache", "persistentVolumeClaim": {"claimName": "qwen3vl-model-cache"}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}},
            {"name": "weights-script", "configMap": {"name": "qwen3vl-weights-script"}},
        ],
    }
    labels = POD_LABELS | {"app.kubernetes.io/component": role}
    if gpu:
        spec["nodeSelector"] = {"nvidia.com/gpu.present": "true"}
        spec["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
        spec["topologySpreadConstraints"] = [
            {
                "maxSkew": 1,
                "topologyKey": key,
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": labels},
            }
            for key in ("topology.kubernetes.io/zone", "kubernetes.io/hostname")
        ]
    return {"metadata": {"labels": labels}, "spec": spec}


def rayservice(profile_path: Path) -> dict:
    config = load_config(profile_path)
    env = [{"name": k, "value": v} for k, v in sorted(config.serve_env().items())]
    env += [{"name": "HF_HOME", "value": "/models"}, {"name": "HF_HUB_OFFLINE", "value": "1"}]
    max_gpus = sum(
        (m.autoscaling_config or {}).get("max_replicas", m.num_replicas) for m in config.models
    )
    # An upper bound, as for the Deployments: the longest request may finish, plus a margin.
    grace_s = int(config.drain_timeout_s) + 60
    head = _container(
        "ray-head",
        {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"memory": "16Gi"}},
        env,
        gpu=False,
    )
    worker = _container(
        "ray-worker",
        {
            "requests": {"cpu": "8", "memory": "48Gi", "nvidia.com/gpu": "1"},
            "limits": {"memory": "64Gi", "nvidia.com/gpu": "1"},
        },
        env,
        gpu=True,
    )
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": "qwen3vl"},
        "spec": {
            # None: a rayClusterConfig change (image bump) is not rolled out by a second, full-size
            # RayCluster (NewCluster, the default, needs that capacity); serveConfigV2 changes apply
            # in place. k8s/components/rayservice-incremental-upgrade switches to
            # NewClusterWithIncrementalUpgrade where Gateway API and the feature gate are there.
            "upgradeStrategy": {"type": "None"},
            "serveConfigV2": yaml.safe_dump(serve_config(profile_path), sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,  # Ray adds GPU workers as Serve replicas need them
                "autoscalerOptions": {"securityContext": CONTAINER_SECURITY},
                "headGroupSpec": {
                    # 0.0.0.0: the KubeRay operator reaches the dashboard through the head Service;
                    # the overlay's NetworkPolicy admits only the operator to port 8265.
                    "rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0"},
                    "template": _pod(head, "head", grace_s, gpu=False),
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "gpu",
                        "replicas": 3,
                        "minReplicas": 3,
                        "maxReplicas": max_gpus,
                        "rayStartParams": {},
                        "template": _pod(worker, "gpu-worker", grace_s, gpu=True),
                    }
                ],
            },
        },
    }


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2) as readable ``|`` blocks; no ``&id001`` anchors."""

    def ignore_aliases(self, data) -> bool:
        return True


_BlockDumper.add_representer(
    str,
    lambda dumper, text: dumper.represent_scalar(
        "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None
    ),
)


def expected_files() -> dict[Path, str]:
    files = {copy: source.read_text() for copy, source in COPIES.items()}
    header = "# Generated by scripts/gen_k8s.py from configs/gpu-qwen3-vl-8b.yaml: do not edit.\n"
    files[RAYSERVICE] = header + yaml.dump(
        rayservice(GPU_PROFILE), Dumper=_BlockDumper, sort_keys=False
    )
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    stale = []
    for path, text in expected_files().items():
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path.relative_to(REPO))
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if args.check and stale:
        print(f"stale (run python scripts/gen_k8s.py): {[str(p) for p in stale]}", file=sys.stderr)
        return 1
    print("written: " + ", ".join(map(str, stale)) if stale else "up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
