"""Ray Serve's HTTP hook for the ingress replica's own server (direct ingress, also behind HAProxy).

Ray Serve 2.60 watches each direct-ingress request for a client hang-up itself: a receive
proxy task that reads the connection into a queue, the request in a task of its own, and an
``asyncio.wait`` over both (``ReplicaActor._direct_ingress_asgi``). Each costs the request
event-loop turns before our route runs and every body chunk a queue hop, on the one loop that
also passes 32 streams' tokens on. Our routes see a hang-up themselves (``EventStream``
closes the call when Starlette sees the disconnect; ``ChatService.complete`` waits on the
connection's own ``receive``), so ``OwnDisconnects`` marks every request with Ray's own
per-request switch, ``x-request-disconnect-disabled: ?1``, and Ray awaits the app directly.

Ray's own timeout header (``x-request-timeout-seconds``) is dropped for the same reason: a
Serve timeout would take the slow path again and answer 408 in plain text. The deadline is
ours (``x-request-timeout-s``, ``admission.request_timeout_s``) and answers OpenAI JSON.

Ray loads the hook from ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (``config.serve_env``)
in every HTTP server it starts; only a replica's gets the middleware. Serve's Python proxy (in
HAProxy mode, the backup for a route with no replica up) keeps its own disconnect handling: it
calls the replica through a handle, and only its watch would cancel that call.
"""

from __future__ import annotations

from starlette.middleware import Middleware

DISCONNECT_DISABLED = (b"x-request-disconnect-disabled", b"?1")
_DROPPED = frozenset({DISCONNECT_DISABLED[0], b"x-request-timeout-seconds"})


class OwnDisconnects:
    """Pure ASGI middleware: every HTTP request says the app watches for its disconnect."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            headers = [h for h in scope["headers"] if h[0] not in _DROPPED]
            headers.append(DISCONNECT_DISABLED)
            scope["headers"] = headers
        await self.app(scope, receive, send)


def middlewares() -> list[Middleware]:
    """Ray Serve's HTTP callback: the middlewares around a replica's ASGI entry point."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        serve.get_replica_context()
    except RayServeException:  # Serve's proxy actor
        return []
    return [Middleware(OwnDisconnects)]
