"""Command line: ``python -m engine serve [--config FILE]`` and ``python -m engine generate``.

``serve`` starts a local Ray, deploys the profile, prints the URL once /health answers and
stays up. The process you start is a small supervisor; the server (Ray and all it starts)
runs in a child in a process group of its own, so a signal to your process group reaches
only the supervisor, which passes it on once:

- SIGTERM or SIGINT (Ctrl-C): drain. /health and new requests get 503 at once, requests in
  flight finish (up to ``server.drain_timeout_s``), then Serve and Ray stop. A second signal
  stops without waiting.
- Whatever way the server ends, the supervisor then ends every process still carrying the
  server's instance id; if the supervisor itself is SIGKILLed, a watcher does it
  (``engine.lifecycle``). Nothing is left holding the port.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import traceback

from engine import lifecycle
from engine.config import DEFAULT_PROFILE, AppConfig, load_config, tier_config
from engine.lifecycle import free_port, wait_for_health

_coordinator = None  # the drain coordinator actor's handle, once Ray is up
SERVER_CHILD_ENV = "QWEN3VL_SERVER_CHILD"  # set in the supervised server process
STOP_BOUND_S = 10.0  # Serve's own shutdown may take this long; then processes are ended


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
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats := free_port("", avoid={port})),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port("", avoid={port, stats})),
    }


class StartupInterrupted(Exception):
    """A stop signal arrived before the server was healthy."""


def start(config: AppConfig, on_signal=None, stopping: threading.Event | None = None) -> str:
    """Start local Ray + Serve, deploy ``config``, wait for health; return the base URL.
    ``on_signal`` handles SIGINT/SIGTERM from the moment Ray is up (ray.init installs a
    SIGTERM handler that aborts the process); once ``stopping`` is set, start-up gives up."""
    for model in config.models:
        model.resolved_model_path()  # build generated checkpoints once, before any replica
    if config.ingress_mode == "direct":
        # The replica binds the API port without SO_REUSEADDR (Ray Serve's choice): right
        # after another server on this port stopped, its closed connections may hold it.
        port = config.server.port
        lifecycle.wait_port_bindable(
            config.server.host,
            port,
            timeout_s=90,
            on_wait=lambda: print(
                f"Port {port} is still held by a previous server's closed connections "
                "(TIME_WAIT, up to 60 s); waiting",
                flush=True,
            ),
        )
    # Inherited by the raylet and every worker.
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
    if on_signal is not None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
    # The drain coordinator the ingress replicas follow (engine.lifecycle); a named actor
    # lives only while a handle to it does, so this process keeps one.
    global _coordinator
    _coordinator = (
        lifecycle.lifecycle_actor_class()
        .options(name=lifecycle.LIFECYCLE_ACTOR, namespace=lifecycle.LIFECYCLE_NAMESPACE)
        .remote()
    )
    # In direct mode the ingress replica's own server listens on the API port; Ray Serve still
    # runs a (fallback) proxy actor, even with proxy_location="Disabled", and it would take
    # port 8000: it gets a free loopback port that nothing uses.
    proxy = {"host": config.server.host, "port": config.server.port}
    if config.ingress_mode == "direct":
        proxy = {"host": "127.0.0.1", "port": free_port(avoid={config.server.port})}
    serve.start(http_options=proxy)
    serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)
    host = "127.0.0.1" if config.server.host in ("0.0.0.0", "::") else config.server.host
    base = f"http://{host}:{config.server.port}"

    def still_wanted() -> None:
        if stopping is not None and stopping.is_set():
            raise StartupInterrupted("stopped before the server was healthy")

    wait_for_health(base + "/health", config.server.startup_timeout_s, check=still_wanted)
    return base


def drain(timeout_s: float, forced: threading.Event) -> None:
    """Tell the ingress replicas to drain; wait until they have, ``timeout_s`` at most, or
    until ``forced`` is set (a second signal)."""
    import ray

    if _coordinator is None:  # Ray never came up
        return
    ray.get(_coordinator.drain.remote())
    waiting = _coordinator.wait_drained.remote(timeout_s)
    while not forced.is_set():
        ready, _ = ray.wait([waiting], timeout=0.5)
        if ready:
            left = [name for name, done in ray.get(ready[0]).items() if not done]
            if left:
                print(f"Drain timed out after {timeout_s:g}s; stopping anyway", flush=True)
            return


def stop() -> None:
    """Stop Serve (bounded: its controller can take 30 s to give up) and Ray."""
    import ray
    from ray import serve

    stopper = threading.Thread(target=serve.shutdown, daemon=True)
    stopper.start()
    stopper.join(STOP_BOUND_S)
    if stopper.is_alive():
        # Shutting Ray down under a thread still in Serve's shutdown makes that thread's next
        # call into Ray abort this process (exit 1, "The core worker has already been
        # shutdown"; seen in CI). The drain is over: leave the rest to the supervisor, which
        # ends every process of this server (engine.lifecycle.terminate).
        print(f"Serve still stopping after {STOP_BOUND_S:g}s; ending its processes", flush=True)
        sys.stderr.flush()
        os._exit(0)
    ray.shutdown()


def supervise(argv: list[str]) -> int:
    """Run the server as a child in its own session; pass SIGTERM/SIGINT on; when it ends,
    end whatever it left. A watcher ends everything if this process is SIGKILLed."""
    instance = lifecycle.instance_id()
    child = subprocess.Popen(
        [sys.executable, "-m", "engine", *argv],
        # its own process group, in this session: Linux's autogroup scheduling gives each
        # session an equal CPU share, so a new session would ignore a nice level given to us
        env={**os.environ, SERVER_CHILD_ENV: "1"},
        process_group=0,
    )
    lifecycle.start_reaper(instance, group=child.pid)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _: child.send_signal(signum))
    try:
        return child.wait()
    finally:
        lifecycle.terminate(instance, group=child.pid)


def cmd_serve(args: argparse.Namespace) -> int:
    if os.environ.get(SERVER_CHILD_ENV) != "1":
        return supervise(args.argv)
    config = tier_config(
        load_config(args.config),
        args.serve_only,
        dict(r.split("=", 1) for r in args.remote),
        args.single_replica,
    )
    overrides = {k: v for k, v in (("port", args.port), ("host", args.host)) if v is not None}
    if overrides:
        config = config.model_copy(update={"server": config.server.model_copy(update=overrides)})
    stopping, forced, drained = threading.Event(), threading.Event(), threading.Event()

    def drain_in_background() -> None:
        print(
            f"Draining (up to {config.drain_timeout_s:g}s; signal again to stop now)...", flush=True
        )
        try:
            drain(config.drain_timeout_s, forced)
        finally:
            drained.set()

    def on_first_signal() -> None:
        # The drain starts at once, from a thread: the main thread may be in start-up still
        # (clients can see /health before this process does).
        stopping.set()
        threading.Thread(target=drain_in_background, daemon=True).start()

    signals = lifecycle.StopSignals(on_first_signal, forced.set)
    try:
        try:
            base = start(config, signals.handler, stopping)
            print(
                f"Serving {', '.join(config.model_names)} at {base}/v1 (Ctrl-C to stop)", flush=True
            )
        except StartupInterrupted:
            pass
        # Short waits: the kernel may hand a signal to any thread (Ray's too), and Python runs
        # its handler only once the main thread runs again; a wait without a timeout would
        # not end for it.
        while not drained.wait(0.25):
            pass
        print("Shutting down...", flush=True)
    except Exception:
        # stop() may end this process (os._exit) before the traceback would be printed
        traceback.print_exc()
        sys.stderr.flush()
        raise
    finally:
        stop()
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.config import GENERATED_PREFIX, resolve_model

    print(resolve_model(GENERATED_PREFIX + args.preset))
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
    serve_p.add_argument(
        "--serve-only",
        metavar="MODEL",
        help="serve just this model of the profile, as primary (a fallback tier's pods)",
    )
    serve_p.add_argument(
        "--remote",
        metavar="MODEL=URL",
        action="append",
        default=[],
        help="reach this fallback at URL instead of running it here",
    )
    serve_p.add_argument(
        "--single-replica",
        action="store_true",
        help="one replica per model, no Ray Serve autoscaling (Kubernetes scales the pods)",
    )
    serve_p.set_defaults(func=cmd_serve)
    gen_p = sub.add_parser("generate", help="write a generated Qwen3-VL checkpoint, print its path")
    gen_p.add_argument("preset", nargs="?", default="tiny", choices=["tiny", "small"])
    gen_p.set_defaults(func=cmd_generate)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
