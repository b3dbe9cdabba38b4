"""The two error kinds of the serving path.

``RequestError``: the client sent something we will not serve (4xx, actionable message).
``EngineError``: the engine failed (5xx; health goes red when the engine is dead).
``error_payload`` turns any exception into an OpenAI-style status, body and headers, in
one place; unexpected errors say nothing of their internals (the log has them).
"""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException

from engine.protocol import error_body


class RequestError(Exception):
    """A client error: becomes an OpenAI-style 4xx JSON error."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 400,
        code: str = "invalid_request",
        param: str | None = None,
        error_type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.headers = headers or {}
        self.message = message
        self.status_code = status_code
        self.code = code
        self.param = param
        self.error_type = error_type


class EngineError(Exception):
    """The engine could not serve a valid request (5xx)."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 500,
        code: str = "engine_error",
        error_type: str = "server_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.code = code
        self.error_type = error_type


def error_payload(exc: Exception) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, OpenAI-style body and headers of an error."""
    if isinstance(exc, RequestError):
        body = error_body(exc.message, error_type=exc.error_type, code=exc.code, param=exc.param)
        return exc.status_code, body, exc.headers
    if isinstance(exc, EngineError):
        body = error_body(exc.message, error_type=exc.error_type, code=exc.code)
        return exc.status_code, body, {}
    if isinstance(exc, HTTPException):
        body = error_body(str(exc.detail), error_type="invalid_request_error", code=exc.status_code)
        return exc.status_code, body, {}
    body = error_body(
        "internal error; the server logged it", error_type="server_error", code="internal"
    )
    return 500, body, {}
