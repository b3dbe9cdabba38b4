"""Command line: ``python -m engine serve [--config FILE]`` and ``python -m engine generate``.

``serve`` starts a local Ray, deploys the profile, prints the URL once /health answers,
stays up, and shuts Serve and Ray down on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time
import urllib.request

from engine.config import DEFAULT_PROFILE, AppConfig, load_config, tier_config


def wait_for_health(url: str, timeout_s: float, check=None) -> None:
    """Poll ``url`` until it answers 200, or raise after ``timeout_s``. ``check()``, if given,
    runs before every poll and raises to give up early (e.g. the server process died)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if check is not None:
            check()
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer 200 within {timeout_s:.0f}s")
        time.sleep(1)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def haproxy_env(port: int) -> dict[str, str]:
    """Ray Serve's HAProxy keeps its config, sockets and state under one fixed path and binds
    fixed stats/metrics ports: a second server on the same host would crash on them. These
    settings give each server (keyed by its API port) its own paths and free ports."""
    base = f"/tmp/haproxy-serve-{port}"
    return {
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{base}/haproxy.cfg",
        "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{base}/admin.sock",
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": base,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{base}/server-state",
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{base}/metrics.sock",
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port("")),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port("")),
    }


def start(config: AppConfig) -> str:
    """Start local Ray + Serve, deploy ``config``, wait for health; return the base URL."""
    for model in config.models:
        model.resolved_model_path()  # build generated checkpoints once, before any replica
    # Inherited by the raylet and every worker. In direct mode the ingress replica listens on
    # the API port itself, and Ray Serve's proxy (which nothing uses) on a free local port.
    proxy_port = config.server.port
    if config.ingress_mode == "direct":
        proxy_port = free_port()
    os.environ.update(config.serve_env())
    if config.ingress_mode == "haproxy":
        for key, value in haproxy_env(config.server.port).items():
            os.environ.setdefault(key, value)  # explicit settings win
    import ray
    from ray import serve

    from engine.app import APP_NAME, build_app

    ray.init(
        # Always a Ray instance of our own: plain init() joins one already running on this
        # host (another server's), and deploying there would replace that server's app.
        address="local",
        num_cpus=config.server.ray_num_cpus,
        include_dashboard=False,
        log_to_driver=os.environ.get("QWEN3VL_RAY_LOGS", "1") == "1",
    )
    serve.start(http_options={"host": config.server.host, "port": proxy_port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)
    host = "127.0.0.1" if config.server.host in ("0.0.0.0", "::") else config.server.host
    base = f"http://{host}:{config.server.port}"
    wait_for_health(base + "/health", config.server.startup_timeout_s)
    return base


def stop() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def cmd_serve(args: argparse.Namespace) -> int:
    config = tier_config(load_config(args.config), args.serve_only,
                         dict(r.split("=", 1) for r in args.remote), args.single_replica)  # fmt: skip
    overrides = {k: v for k, v in (("port", args.port), ("host", args.host)) if v is not None}
    if overrides:
        config = config.model_copy(update={"server": config.server.model_copy(update=overrides)})
    stopping = threading.Event()
    try:
        base = start(config)
        # After ray.init: Ray's core worker installs a SIGTERM handler that aborts the process.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stopping.set())
        print(f"Serving {', '.join(config.model_names)} at {base}/v1 (Ctrl-C to stop)", flush=True)
        stopping.wait()
        print("Shutting down...", flush=True)
    finally:
        stop()
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.testing.tiny_model import ensure_model

    print(ensure_model(args.preset))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", help="serve a profile over HTTP")
    serve_p.add_argument(
        "--config", default=None, help=f"YAML profile (default {DEFAULT_PROFILE.name})"
    )
    serve_p.add_argument("--port", type=int, default=None, help="override server.port")
    serve_p.add_argument(
        "--host", default=None, help="override server.host (0.0.0.0 in a container)"
    )
    serve_p.add_argument("--serve-only", metavar="MODEL", help="serve just this model of the "
                         "profile, as primary (a fallback tier's pods)")  # fmt: skip
    serve_p.add_argument("--remote", metavar="MODEL=URL", action="append", default=[],
                         help="reach this fallback at URL instead of running it here")  # fmt: skip
    serve_p.add_argument("--single-replica", action="store_true", help="one replica per model, "
                         "no Ray Serve autoscaling (Kubernetes scales the pods)")  # fmt: skip
    serve_p.set_defaults(func=cmd_serve)
    gen_p = sub.add_parser("generate", help="write a generated Qwen3-VL checkpoint, print its path")
    gen_p.add_argument("preset", nargs="?", default="tiny", choices=["tiny", "small"])
    gen_p.set_defaults(func=cmd_generate)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
