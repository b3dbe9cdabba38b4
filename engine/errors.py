"""The two error kinds of the serving path.

``RequestError``: the client sent something we will not serve (4xx, actionable message).
``EngineError``: the engine failed (5xx; health goes red when the engine is dead).
The ingress turns both into OpenAI-style JSON in one place.
"""

from __future__ import annotations


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
