"""The replica's HTTP hook: Ray Serve loads it, and it leaves hang-ups and deadlines to us."""

from __future__ import annotations

import asyncio

import pytest
import ray.serve
from ray.serve._private.http_util import (
    call_function_from_import_path,
    parse_disconnect_disabled_header,
    parse_request_timeout_header,
    validate_http_proxy_callback_return,
)

from engine.config import AppConfig, load_config
from engine.serve_http import OwnDisconnects

HOOK = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"


def _config(**server) -> AppConfig:
    base = load_config(None).model_dump()
    return AppConfig.model_validate(base | {"server": base["server"] | server})


def _scope_after(headers: list[tuple[bytes, bytes]], scope_type: str = "http") -> dict:
    seen = {}

    async def app(scope, receive, send):
        seen.update(scope)

    scope = {"type": scope_type, "headers": list(headers)}
    asyncio.run(OwnDisconnects(app)(scope, None, None))
    return seen


def test_every_http_request_skips_serves_disconnect_watch_and_timeout():
    seen = _scope_after(
        [
            (b"content-type", b"application/json"),
            (b"x-request-disconnect-disabled", b"?0"),
            (b"x-request-timeout-seconds", b"0.001"),
            (b"x-request-timeout-s", b"5"),
        ]
    )
    headers = dict(seen["headers"])
    # Ray's own parsers read them as: disconnects not watched, no Serve timeout.
    assert parse_disconnect_disabled_header(headers) is True
    assert parse_request_timeout_header(headers, None) is None
    # Ours and the rest are untouched, and the flag is there once.
    assert headers[b"x-request-timeout-s"] == b"5"
    assert headers[b"content-type"] == b"application/json"
    assert [k for k, _ in seen["headers"]].count(b"x-request-disconnect-disabled") == 1


def test_other_scopes_pass_unchanged():
    assert _scope_after([(b"a", b"b")], "websocket")["headers"] == [(b"a", b"b")]


@pytest.mark.parametrize("server", [{}, {"ingress": "haproxy"}])
def test_the_hook_is_set_where_a_replica_serves_http_and_ray_accepts_it(server, monkeypatch):
    path = _config(**server).serve_env()[HOOK]
    # Serve's proxy actor (no replica context here) keeps its own disconnect handling ...
    assert validate_http_proxy_callback_return(call_function_from_import_path(path)) == []
    # ... and a replica's server gets the middleware.
    monkeypatch.setattr(ray.serve, "get_replica_context", lambda: object())
    middlewares = validate_http_proxy_callback_return(call_function_from_import_path(path))
    assert [m.cls for m in middlewares] == [OwnDisconnects]


def test_the_python_proxy_keeps_rays_own_disconnect_handling():
    assert HOOK not in _config(ingress="proxy").serve_env()
