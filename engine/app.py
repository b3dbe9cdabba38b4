"""Build the Ray Serve application for a profile.

One deployment per replica set of the primary model: ``OpenAIServer`` holds the OpenAI
ingress and the model's vLLM engine in the same replica, so tokens never cross a Ray
actor boundary on their way to the client (measured in BENCHMARKS.md).
"""

from __future__ import annotations

from ray.serve import Application

from engine.config import AppConfig
from engine.ingress import OpenAIServer

APP_NAME = "qwen3vl"


def build_app(config: AppConfig) -> Application:
    """The application that serves ``config``'s primary model behind the OpenAI API."""
    primary = config.primary
    return OpenAIServer.options(
        name="OpenAIServer",
        num_replicas=primary.num_replicas,
        max_ongoing_requests=primary.max_ongoing_requests,
        ray_actor_options=primary.ray_actor_options,
        health_check_period_s=10,
        health_check_timeout_s=60,
        graceful_shutdown_timeout_s=30,
    ).bind(config)
