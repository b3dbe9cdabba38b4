"""OpenAI chat-completions wire format: request models, response and error bodies.

Requests are validated once, here, by pydantic. A request field is honoured (a field of
``ChatCompletionRequest``), metadata only (``METADATA_ONLY``), or refused by name: OpenAI's
fields not served yet (``NOT_SERVED``) unless their value asks for nothing, anything else
always (as OpenAI refuses an unrecognized argument). Responses and stream chunks are plain JSON built from dicts: on the hot path
(one SSE chunk per token batch) that is several times cheaper than model serialisation.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Lenient):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL

    @model_validator(mode="before")
    @classmethod
    def _url_as_string(cls, data: Any) -> Any:
        # Some clients send {"image_url": "data:..."}; accept it like vLLM does.
        if isinstance(data, dict) and isinstance(data.get("image_url"), str):
            return {**data, "image_url": {"url": data["image_url"]}}
        return data


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat-completions request we serve (plus vLLM's ignore_eos);
    other top-level fields are kept in ``model_extra`` for ``unsupported_field``."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # int64, as OpenAI's API
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="Only n=1 is served.")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    ignore_eos: bool = False
    allow_fallback: bool | None = Field(
        None, description="False: only the requested model may answer (429 when saturated)."
    )
    min_tokens: int | None = Field(None, ge=0)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 8 or any(not 0 < len(s) <= 512 for s in stops):
            raise ValueError("stop takes at most 8 non-empty strings of at most 512 characters")
        return stops

    @property
    def output_token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# Every request field is honoured (a field of ChatCompletionRequest), metadata only, or a 400
# naming it (``intake.check_supported``): nothing is ignored in silence.
# Accepted and not acted on: identification and bookkeeping, nothing that changes the answer.
METADATA_ONLY = frozenset(
    {"user", "metadata", "store", "safety_identifier", "prompt_cache_key", "parallel_tool_calls"}
)
# OpenAI fields this server does not serve yet -> the values that ask for nothing (accepted).
NOT_SERVED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "logit_bias": (None, {}),
    "service_tier": (None, "auto", "default"),
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "moderation": (None,),
    "prompt_cache_options": (None,),
    "prompt_cache_retention": (None,),
}


def unsupported_field(request: ChatCompletionRequest) -> str | None:
    """The first field of ``request`` this server would otherwise ignore, or None."""
    for name, value in (request.model_extra or {}).items():
        if name in METADATA_ONLY:
            continue
        if name not in NOT_SERVED or value not in NOT_SERVED[name]:
            return name
    return None


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def error_body(
    message: str, *, error_type: str, code: str | int, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error envelope."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def completion_body(
    request_id: str, model: str, text: str, finish_reason: str | None, usage: Usage
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage.as_dict(),
    }


class ChunkEncoder:
    """Pre-renders the constant part of a stream's chunks; each chunk is one string concat."""

    def __init__(self, request_id: str, model: str) -> None:
        head = json.dumps(
            {
                "id": request_id,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
            }
        )[:-1]
        self._head = "data: " + head + ', "choices": [{"index": 0, "delta": '
        self._usage_head = "data: " + head + ', "choices": [], "usage": '
        self._first = True

    def delta(self, text: str, finish_reason: str | None = None) -> str:
        if self._first:
            self._first = False
            delta = '{"role": "assistant", "content": ' + json.dumps(text, ensure_ascii=False) + "}"
        elif text:
            delta = '{"content": ' + json.dumps(text, ensure_ascii=False) + "}"
        else:
            delta = "{}"
        reason = "null" if finish_reason is None else json.dumps(finish_reason)
        return self._head + delta + ', "logprobs": null, "finish_reason": ' + reason + "}]}\n\n"

    def usage(self, usage: Usage) -> str:
        return self._usage_head + json.dumps(usage.as_dict()) + "}\n\n"

    @staticmethod
    def error(body: dict[str, Any]) -> str:
        return "data: " + json.dumps(body) + "\n\n"

    DONE = "data: [DONE]\n\n"
