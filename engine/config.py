"""Serving configuration: YAML profiles validated by pydantic.

This is the only module that reads YAML or the environment. A profile names the models
(each a vLLM engine; every vLLM engine argument passes through ``engine_kwargs``), the
routing tiers, the image limits and the HTTP/Ray settings. CPU and GPU profiles differ
only here: the code path is the same.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_PROFILE = CONFIG_DIR / "cpu-tiny.yaml"
GENERATED_PREFIX = "generated:"
MODEL_SOURCES = "qwen3vl_serve.model_sources"  # entry-point group: a name -> resolve(spec)
# Ray processes at normal priority (Ray starts workers at niceness 15, behind the engine);
# replica log lines (one per request, keyed by its id) written when they happen: throughput
# mode would buffer 1000 of them; and forwarded to the server's output as they come: Ray's
# log deduplication holds lines that look alike across replicas ("<model>: vLLM ...") and
# was seen to hold one until shutdown.
DEFAULT_RAY_ENV = {
    "RAY_worker_niceness": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
    "RAY_DEDUP_LOGS": "0",
}
# How HTTP reaches the ingress replica (BENCHMARKS.md has the measurements):
#   direct   the replica's own HTTP server (Ray Serve direct ingress) listens on the API port:
#            no proxy hop, a client that hangs up is seen at once, tokens leave as they come.
#            One ingress replica per server (a Kubernetes pod; the local default).
#   haproxy  Ray Serve's HAProxy on the API port in front of several ingress replicas.
#   proxy    Ray Serve's Python proxy actor (Ray's default; slowest).
#   auto     direct when the primary runs one replica, else haproxy.
IngressMode = Literal["auto", "direct", "haproxy", "proxy"]
_THROUGHPUT_MODE = {
    # user code on the replica's main event loop, gRPC between actors, direct ingress
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # the replica's HTTP server leaves hang-ups to our routes (engine/serve_http.py)
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "engine.serve_http:middlewares",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageLimits(_Strict):
    """What the ingress accepts as an image, checked before the engine sees it."""

    max_image_bytes: int = Field(20 * 1024 * 1024, gt=0, description="Encoded size cap per image.")
    max_image_pixels: int = Field(
        40_000_000, gt=0, description="Width x height cap, read from the header before decoding."
    )
    max_short_side_px: int = Field(
        768, gt=0, description="Downscale so the short side is at most this many pixels."
    )
    max_long_side_px: int = Field(
        3072, gt=0, description="Downscale so the long side is at most this many pixels too."
    )
    max_aspect_ratio: float = Field(
        200,
        ge=1,
        description="Refuse images longer than this many times their width (or "
        "wider than tall): Qwen-VL's image processor refuses them past 200.",
    )
    max_images_per_request: int = Field(4, ge=0, description="Images allowed in one request.")
    allowed_url_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts whose image URLs may be fetched; empty = data: URLs only.",
    )

    @field_validator("allowed_url_hosts")
    @classmethod
    def _lower_case_hosts(cls, hosts: list[str]) -> list[str]:
        return [h.lower() for h in hosts]  # compared with a URL's (lower-case) host name

    allowed_url_schemes: list[Literal["http", "https"]] = Field(
        default_factory=lambda: ["https"], description="Schemes of fetched image URLs."
    )
    allowed_url_ports: list[int] = Field(
        default_factory=list,
        description="Ports of fetched image URLs; empty = the scheme's "
        "default port only (443, 80).",
    )
    allow_private_addresses: bool = Field(
        False,
        description="Fetch from hosts that resolve to loopback, private, link-local "
        "or other non-public addresses (off: an allow-listed name cannot reach the cluster).",
    )
    max_url_chars: int = Field(8192, gt=0, description="Length cap of a fetched image URL.")
    fetch_timeout_s: float = Field(
        10.0, gt=0, description="Total time for one image fetch: connect, headers and body."
    )
    decode_threads: int = Field(
        0,
        ge=0,
        description="Images over inline_decode_max_pixels decoded at once, off the event "
        "loop; 0 = one per core.",
    )
    small_decode_threads: int = Field(
        0,
        ge=0,
        description="Images up to inline_decode_max_pixels but over inline_decode_max_bytes "
        "decoded at once, off the event loop, in a lane of their own; 0 = four per core.",
    )
    inline_decode_max_pixels: int = Field(
        262_144,
        ge=0,
        description="Images up to this many pixels (512x512) and inline_decode_max_bytes decode "
        "on the event loop (well under a millisecond, no thread hop); larger ones on the decode "
        "threads.",
    )
    inline_decode_max_bytes: int = Field(
        32_768,
        ge=0,
        description="Encoded size up to which a small image decodes on the event loop while "
        "other requests are in flight (alone, a request decodes every small image there). JPEG "
        "decoding time follows the compressed size: 336x336 px of noise (68 KB) take 1.1 ms, "
        "a smooth picture of that size (3 KB) 0.4 ms.",
    )


class RequestLimits(_Strict):
    """Bounds on one request's shape, checked before any work (413/400)."""

    max_body_bytes: int = Field(
        32 * 1024 * 1024, gt=0, description="Request body size cap (images included)."
    )
    max_messages: int = Field(512, ge=1, description="Messages in one request.")
    max_content_parts: int = Field(512, ge=1, description="Content parts over all messages.")
    max_text_chars: int = Field(
        1_000_000, ge=1, description="Characters of text over all messages (about 250k tokens)."
    )
    max_n: int = Field(
        8,
        ge=1,
        le=128,
        description="Most choices (n) in one request; each is a sequence in the engine, while "
        "admission counts the request once.",
    )


class SaturationPolicy(_Strict):
    """When a model counts as saturated (fallback starts) and full (nothing more may wait)."""

    max_running_requests: int | None = Field(
        None, ge=1, description="Requests the engine runs at once; default: max_num_seqs."
    )
    max_waiting_requests: int = Field(
        0, ge=0, description="Requests allowed to queue in the engine before it is saturated."
    )
    max_kv_cache_usage: float = Field(
        0.95, gt=0, le=1, description="KV-cache usage (0..1) at which it is saturated."
    )
    resume_fraction: float = Field(
        0.75,
        gt=0,
        lt=1,
        description="Hysteresis: saturation ends only when every signal is below this "
        "fraction of its threshold.",
    )
    max_queued_requests: int = Field(
        64, ge=0, description="Bounded waiting: requests queued beyond max_running_requests."
    )


def resolve_model(model: str) -> str:
    """``SOURCE:SPEC`` (``generated:tiny``) through the model source registered under SOURCE
    (an entry point; the ``generated`` source is ``export.variants``, which builds the
    checkpoint on first use); anything else is a path or HF repo id, as is."""
    from importlib.metadata import entry_points

    source, sep, spec = model.partition(":")
    if not sep or "/" in source:  # a repo id or a path
        return model
    found = entry_points(group=MODEL_SOURCES, name=source)
    if not found:
        raise ValueError(
            f"model {model!r}: no model source {source!r} is installed "
            f"(entry points of group {MODEL_SOURCES!r})"
        )
    return str(next(iter(found)).load()(spec))


class ModelConfig(_Strict):
    """One served model: a vLLM engine (or an ONNX export on ONNX Runtime) inside a Ray
    Serve deployment."""

    name: str = Field(description="Model id clients send in `model` and see in /v1/models.")
    model: str = Field(
        "",
        description="HF repo id, local checkpoint dir, or 'generated:tiny'/'generated:small' "
        "for a checkpoint the project generates (fixtures/tiny_model.py); "
        "'generated:small+w8a8-int8' (or +w4a16, +fp8-dynamic) for its quantized variant.",
    )
    url: str | None = Field(
        None,
        description="Fallbacks only: base URL of another server of this project that serves "
        "this model (in Kubernetes, the fallback tier's Service). No engine starts here; "
        "overflow requests are forwarded there over HTTP, strict and streaming.",
    )
    runtime: Literal["vllm", "onnx"] = Field(
        "vllm",
        description="What runs the model: 'vllm' (AsyncLLM), or 'onnx' (an export of "
        "`python -m export onnx` on ONNX Runtime, engine/onnx_engine.py).",
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="vllm: passed as is to vLLM's AsyncEngineArgs. onnx: max_num_seqs, "
        "max_model_len, providers, intra_op_num_threads.",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment of the replica process (e.g. VLLM_CPU_KVCACHE_SPACE).",
    )
    num_replicas: int = Field(1, ge=1, description="Ray Serve replicas of this model.")
    render_lane: bool = Field(
        True,
        description="vllm: render chats (chat template, tokenizer, multimodal processor) one at "
        "a time in arrival order, small ones on the event loop and larger ones in one thread "
        "(engine.llm.RenderLane); off: vLLM's render_chat_async, as vLLM's server does. "
        "Measured on 2 cores against it: median TTFT ~0.6-0.7x at 8 and 32 concurrent "
        "streams, request throughput higher at 8 and even at 32 (BENCHMARKS.md).",
    )
    inline_render_max_pixels: int = Field(
        262_144,
        ge=0,
        description="With render_lane: a chat whose images together have up to this many "
        "pixels (512x512) renders on the event loop; a larger one in the lane's thread.",
    )
    max_ongoing_requests: int = Field(
        512, ge=1, description="Requests one replica holds at once (engine batch + queue)."
    )
    ray_actor_options: dict[str, Any] = Field(
        default_factory=lambda: {"num_cpus": 1},
        description="Resources of one replica, e.g. {'num_gpus': 1} on GPU.",
    )
    autoscaling_config: dict[str, Any] | None = Field(
        None,
        description="Ray Serve autoscaling (min_replicas, max_replicas, "
        "target_ongoing_requests, upscale_delay_s, downscale_delay_s, ...); replaces "
        "num_replicas when set.",
    )
    saturation: SaturationPolicy = Field(default_factory=SaturationPolicy)

    @model_validator(mode="after")
    def _model_or_url(self) -> ModelConfig:
        if bool(self.model) == bool(self.url):
            raise ValueError(f"model {self.name!r}: set exactly one of `model` and `url`")
        return self

    def saturation_policy(self) -> SaturationPolicy:
        """The policy with max_running_requests filled in from the engine's max_num_seqs."""
        if self.saturation.max_running_requests is not None:
            return self.saturation
        running = int(self.engine_kwargs.get("max_num_seqs", 256))
        return self.saturation.model_copy(update={"max_running_requests": running})

    def deployment_options(self, drain_timeout_s: float) -> dict[str, Any]:
        """Ray Serve deployment options for this model's replicas. ``drain_timeout_s``: how
        long Ray Serve lets a stopping replica finish its requests (a RayService rollout)."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": self.ray_actor_options,
            "health_check_period_s": 10,
            "health_check_timeout_s": 60,
            "graceful_shutdown_timeout_s": drain_timeout_s,
        }
        if self.autoscaling_config is not None:
            options["autoscaling_config"] = self.autoscaling_config
        else:
            options["num_replicas"] = self.num_replicas
        return options

    def resolved_model_path(self) -> str:
        """The path or repo id vLLM loads; generated checkpoints are built if missing."""
        return resolve_model(self.model)


class RoutingConfig(_Strict):
    """Which model answers: the primary, then fallbacks in order (used by the router)."""

    primary: str = Field(description="Name of the model that serves by default.")
    fallbacks: list[str] = Field(
        default_factory=list, description="Smaller models to use when the primary is saturated."
    )


class AdmissionConfig(_Strict):
    """Deadlines and back-pressure for every request."""

    request_timeout_s: float = Field(
        300, gt=0, description="Default deadline; header x-request-timeout-s overrides it."
    )
    max_request_timeout_s: float = Field(
        600, gt=0, description="Largest deadline a header may ask (a drain waits this long)."
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds sent with a 429.")
    ttft_slo_s: float | None = Field(
        None,
        gt=0,
        description="p99 time to first token promised to admitted requests at "
        "any load. The bounded queues keep it on the hardware they were sized on; it is "
        "checked (`python -m bench soak`), not enforced: on a slower machine the same "
        "bounds wait longer.",
    )
    allow_fallback_by_default: bool = Field(
        True, description="Whether requests may be served by a fallback unless they opt out."
    )


class ServerConfig(_Strict):
    """HTTP and local-Ray settings of `python -m engine serve`."""

    host: str = Field("127.0.0.1", description="Interface the HTTP server binds.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    ray_num_cpus: int | None = Field(
        8,
        description="Logical CPUs for a local Ray (more than the cores: on 2 cores the ingress "
        "replica would otherwise never schedule). None = Ray's default.",
    )
    ingress: IngressMode = Field(
        "auto",
        description="How HTTP reaches the ingress replica: 'direct' (its own server on the "
        "API port, no proxy hop; one ingress replica), 'haproxy' (Ray Serve's HAProxy in "
        "front of several), 'proxy' (Ray's Python proxy actor), 'auto' (direct when the "
        "primary runs one replica, else haproxy).",
    )
    ray_env: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_RAY_ENV),
        description="Extra environment for the local Ray (the raylet and every worker).",
    )
    startup_timeout_s: float = Field(600, gt=0, description="How long to wait for /health.")
    drain_timeout_s: float | None = Field(
        None,
        gt=0,
        description="On SIGTERM, how long in-flight requests may run before the server stops; "
        "None = admission.max_request_timeout_s (the longest request allowed fits).",
    )


class AppConfig(_Strict):
    """A whole serving profile."""

    models: list[ModelConfig] = Field(min_length=1)
    routing: RoutingConfig | None = None
    images: ImageLimits = Field(default_factory=ImageLimits)
    limits: RequestLimits = Field(default_factory=RequestLimits)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)

    @model_validator(mode="after")
    def _check_names(self) -> AppConfig:
        if self.server.ingress == "direct" and (
            self.primary.autoscaling_config is not None or self.primary.num_replicas != 1
        ):
            raise ValueError(
                "server.ingress 'direct' serves one ingress replica; the primary has "
                "num_replicas/autoscaling_config for several: use 'haproxy' (or 'auto')"
            )
        drain = self.server.drain_timeout_s
        if drain is not None and drain < self.admission.max_request_timeout_s:
            raise ValueError(
                f"server.drain_timeout_s ({drain:g}) is shorter than admission."
                f"max_request_timeout_s ({self.admission.max_request_timeout_s:g}): a request "
                "allowed to run that long would be cut at shutdown"
            )
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        if self.routing is not None:
            for name in [self.routing.primary, *self.routing.fallbacks]:
                if name not in names:
                    raise ValueError(f"routing names {name!r}, which is not in models {names}")
        if self.primary.url:
            raise ValueError(
                f"the primary model {self.primary.name!r} needs a local `model`, not a `url`"
            )
        return self

    @property
    def primary(self) -> ModelConfig:
        """The model the ingress serves by default."""
        name = self.routing.primary if self.routing else self.models[0].name
        return next(m for m in self.models if m.name == name)

    @property
    def drain_timeout_s(self) -> float:
        """Seconds a SIGTERM waits for in-flight requests (at least the longest allowed)."""
        return self.server.drain_timeout_s or self.admission.max_request_timeout_s

    @property
    def ingress_mode(self) -> str:
        """The ingress mode, with 'auto' resolved from the primary's replica count."""
        if self.server.ingress != "auto":
            return self.server.ingress
        single = self.primary.autoscaling_config is None and self.primary.num_replicas == 1
        return "direct" if single else "haproxy"

    def serve_env(self) -> dict[str, str]:
        """Environment for the local Ray that puts the ingress mode in place."""
        env = dict(self.server.ray_env)
        mode, port = self.ingress_mode, self.server.port
        if mode == "direct":
            env |= _THROUGHPUT_MODE | {
                "RAY_SERVE_ENABLE_HA_PROXY": "0",
                # The ingress replica's HTTP server is allotted exactly the API port.
                "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
                "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),
                # A restarted replica gets the port back at once.
                "RAY_SERVE_PORT_QUARANTINE_S": "0",
                # One replica, no autoscaling: the controller need not wake 10 times a second
                # (on 2 cores each wake-up is taken from the engine; BENCHMARKS.md).
                "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
            }
        elif mode == "haproxy":
            env |= _THROUGHPUT_MODE | {
                "RAY_SERVE_ENABLE_HA_PROXY": "1",
                # A stopping replica behind HAProxy stays reachable this long (Ray's default
                # 30 s) for load balancers pointed at it to deregister it. Only our HAProxy,
                # which the controller reloads at once and which retries a refused
                # connection elsewhere, points at it; 30 s made every stop outlast
                # engine.__main__.STOP_BOUND_S.
                "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
            }
        return env

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.models]

    @property
    def fallbacks(self) -> list[ModelConfig]:
        """Models served by their own deployments (handles) or, with ``url``, over HTTP."""
        return [m for m in self.models if m.name != self.primary.name]


def tier_config(
    config: AppConfig,
    serve_only: str | None = None,
    remotes: dict[str, str] | None = None,
    single_replica: bool = False,
) -> AppConfig:
    """The profile as one Kubernetes tier runs it (one Deployment per model tier):

    - ``serve_only``: this pod serves just that model, as its primary (the fallback tier);
    - ``remotes``: these fallbacks live in another tier, reached at the URL (the primary tier);
    - ``single_replica``: one replica per model and no Ray Serve autoscaling; the HPA scales pods.
    """
    models = list(config.models)
    routing = config.routing
    if serve_only is not None:
        models = [m for m in models if m.name == serve_only]
        if not models:
            raise ValueError(f"--serve-only {serve_only!r} is not in {config.model_names}")
        routing = None
    for name, url in (remotes or {}).items():
        if name not in [m.name for m in models] or name == config.primary.name:
            raise ValueError(f"--remote {name!r} must name a fallback of {config.model_names}")
        models = [
            m.model_copy(update={"model": "", "url": url}) if m.name == name else m for m in models
        ]
    if single_replica:
        models = [
            m.model_copy(update={"num_replicas": 1, "autoscaling_config": None}) for m in models
        ]
    return AppConfig.model_validate(
        config.model_dump()
        | {
            "models": [m.model_dump() for m in models],
            "routing": routing.model_dump() if routing else None,
        }
    )


def load_config(path: str | os.PathLike[str] | None = None) -> AppConfig:
    """Read and validate a YAML profile (default: ``QWEN3VL_CONFIG`` or configs/cpu-tiny.yaml)."""
    path = Path(path or os.environ.get("QWEN3VL_CONFIG") or DEFAULT_PROFILE)
    data = yaml.safe_load(path.read_text()) or {}
    return AppConfig.model_validate(data)
