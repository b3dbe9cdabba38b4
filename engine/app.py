"""Build the Ray Serve application for a profile.

- ``OpenAIServer`` (the ingress) holds the OpenAI API and the primary model's vLLM engine in
  one replica, so the primary's tokens never cross a Ray actor boundary (BENCHMARKS.md).
- Every fallback model is a ``ModelServer`` deployment of its own, with its own replicas
  and autoscaling; the ingress reaches it through a streaming handle.
"""

from __future__ import annotations

import re

from ray.serve import Application

from engine.config import AppConfig
from engine.ingress import OpenAIServer
from engine.remote import ModelServer

APP_NAME = "qwen3vl"


def deployment_name(model_name: str) -> str:
    """Ray Serve deployment name of a fallback model ('Qwen/Qwen3-VL-2B' -> 'ModelServer-Qwen-Qwen3-VL-2B')."""
    return "ModelServer-" + re.sub(r"[^A-Za-z0-9_-]+", "-", model_name).strip("-")


def build_app(config: AppConfig) -> Application:
    """The application that serves ``config`` behind the OpenAI API."""
    fallbacks = {
        model.name: ModelServer.options(
            name=deployment_name(model.name), **model.deployment_options(config.drain_timeout_s)
        ).bind(model)
        for model in config.fallbacks
        if model.url is None  # remote tiers run elsewhere
    }
    options = config.primary.deployment_options(config.drain_timeout_s)
    return OpenAIServer.options(name="OpenAIServer", **options).bind(config, fallbacks)


def app_builder(args: dict) -> Application:
    """Ray Serve application builder for a Ray cluster deploy (KubeRay's RayService:
    ``import_path: engine.app:app_builder``); ``args["profile"]`` is the YAML profile, inlined."""
    return build_app(AppConfig.model_validate(args["profile"]))
