"""The chat route answers its errors with the FastAPI app's handlers: ours, and Ray Serve's
for its own errors, the nearest class winning. No server, no engine."""

from __future__ import annotations

import asyncio
import json

from fastapi.responses import JSONResponse

from engine.errors import RequestError
from engine.ingress import HttpApp


class _Overloaded(RuntimeError):
    pass


def _answer(app: HttpApp, exc: Exception) -> tuple[int, dict]:
    response = asyncio.run(app.error_answer(exc))
    return response.status_code, json.loads(response.body)


def test_errors_get_the_handler_of_their_nearest_class():
    app = HttpApp(server=None)  # the plain routes are never called here
    # Ray Serve registers a plain function for its overload errors
    app.add_exception_handler(_Overloaded, lambda _, exc: JSONResponse({"ray": 1}, 503))

    status, body = _answer(app, RequestError("bad temperature", param="temperature"))
    assert status == 400 and body["error"]["param"] == "temperature"
    assert _answer(app, _Overloaded("busy")) == (503, {"ray": 1})
    status, body = _answer(app, KeyError("boom"))  # anything else: a 500 in OpenAI's shape
    assert status == 500 and "error" in body
