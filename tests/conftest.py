"""One live server per test session: the real CLI, Ray Serve, vLLM and the tiny Qwen3-VL."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest
import yaml

from bench.launch import free_port
from engine.config import CONFIG_DIR
from tests.utils import LiveServer

MODEL = "qwen3-vl-tiny"
FALLBACK = "qwen3-vl-tiny-fallback"
PRIMARY_SEQS, PRIMARY_QUEUE = 4, 16  # primary saturates at 4 in flight, queues at most 16 more
FALLBACK_SEQS, FALLBACK_QUEUE = 8, 8
CONTEXT = 8192  # the tiny model's full context: long generations for the cancellation tests
TTFT_SLO_S = 10.0  # p99 TTFT of admitted requests at twice capacity (measured: 6.2 s)


class _ImageHost(http.server.ThreadingHTTPServer):
    """A local HTTP server that serves one image and records every path it was asked for."""

    def __init__(self) -> None:
        self.requested: list[str] = []
        self.payload = b""
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                host.requested.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(host.payload)))
                self.end_headers()
                self.wfile.write(host.payload)

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture(scope="session")
def image_host():
    server = _ImageHost()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


@pytest.fixture(scope="session")
def server(tmp_path_factory, image_host) -> LiveServer:
    """The CPU fallback profile (two tiny engines) with test-sized limits: the primary runs
    4 sequences, 2 images per request, and the image host allow-listed as 'localhost' (not
    127.0.0.1): plain http on its port, a loopback address."""
    tmp: Path = tmp_path_factory.mktemp("server")
    profile = yaml.safe_load((CONFIG_DIR / "cpu-tiny-fallback.yaml").read_text())
    primary, fallback = profile["models"]
    for model in (primary, fallback):
        model["engine_kwargs"]["max_model_len"] = CONTEXT
    primary["engine_kwargs"]["max_num_seqs"] = PRIMARY_SEQS
    primary["saturation"]["max_queued_requests"] = PRIMARY_QUEUE
    fallback["engine_kwargs"]["max_num_seqs"] = FALLBACK_SEQS
    fallback["saturation"]["max_queued_requests"] = FALLBACK_QUEUE
    profile["images"] = {
        "max_images_per_request": 2,
        "allowed_url_hosts": ["localhost"],
        "allowed_url_schemes": ["http"],
        "allowed_url_ports": [image_host.server_port],
        "allow_private_addresses": True,
    }
    profile["server"]["port"] = free_port()
    profile["admission"]["ttft_slo_s"] = TTFT_SLO_S
    config_path = tmp / "profile.yaml"
    config_path.write_text(yaml.safe_dump(profile))
    live = LiveServer(config_path, profile["server"]["port"], tmp / "server.log")
    yield live
    code = live.stop()
    assert code == 0, (
        f"server did not shut down cleanly on SIGTERM (exit {code}):\n{live.log_tail()}"
    )


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def async_client(server):
    from openai import AsyncOpenAI

    return AsyncOpenAI(
        base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300
    )
