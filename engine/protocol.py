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

MAX_TOP_LOGPROBS = 20  # OpenAI's bound, and vLLM's default max_logprobs


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


_TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function names


class ToolCallFunction(_Lenient):
    name: str = Field(pattern=_TOOL_NAME)
    arguments: str = Field(max_length=1_000_000)  # a JSON object, as text (OpenAI's shape)


class ToolCall(_Lenient):
    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: ToolCallFunction


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=128)  # an assistant's calls
    tool_call_id: str | None = Field(None, max_length=128)  # what a tool message answers


class FunctionDefinition(_Lenient):
    name: str = Field(pattern=_TOOL_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema of the arguments object
    strict: bool | None = None


class Tool(_Lenient):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Lenient):
    name: str = Field(pattern=_TOOL_NAME)


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Lenient):
    name: str = Field("response", pattern=_TOOL_NAME)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object with its schema")
        return self


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs`` extension: exactly one constraint."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = Field(None, min_length=1, max_length=10_000)
    choice: list[str] | None = Field(None, min_length=1, max_length=1024)
    grammar: str | None = Field(None, min_length=1, max_length=100_000)
    json_object: Literal[True] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [
            k
            for k in ("json_", "regex", "choice", "grammar", "json_object")
            if getattr(self, k) is not None
        ]
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar, json_object")
        return self


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The OpenAI chat-completions request we serve, plus vLLM's ``ignore_eos``,
    ``min_tokens``, ``repetition_penalty``, ``stop_token_ids`` and ``structured_outputs``;
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
    n: int = Field(1, ge=1, le=128, description="Choices; the profile's limits.max_n bounds it.")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, max_length=1024)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] | None = Field(
        None, max_length=64
    )
    ignore_eos: bool = False
    allow_fallback: bool | None = Field(
        None, description="False: only the requested model may answer (429 when saturated)."
    )
    min_tokens: int | None = Field(None, ge=0)

    @field_validator("logit_bias")
    @classmethod
    def _token_ids_and_bounded_bias(cls, value: dict[str, float] | None):
        for key, bias in (value or {}).items():
            if not (key.isascii() and key.isdigit() and len(key) <= 10):
                raise ValueError(f"logit_bias keys are token ids, got {key[:32]!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values lie in [-100, 100], got {bias}")
        return value

    @property
    def tool_choice_kind(self) -> str:
        """none, auto, required or named (tools given without tool_choice: auto)."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    @property
    def forced_tool_call(self) -> bool:
        return self.tool_choice_kind in ("named", "required")

    @property
    def output_constraint_field(self) -> str | None:
        """The request field that constrains the output's format, if any."""
        if self.structured_outputs is not None:
            return "structured_outputs"
        if self.response_format is not None and self.response_format.type != "text":
            return "response_format"
        return None

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
METADATA_ONLY = frozenset({"user", "metadata", "store", "safety_identifier", "prompt_cache_key"})
# OpenAI fields this server does not serve -> the values that ask for nothing (accepted).
NOT_SERVED: dict[str, tuple[Any, ...]] = {
    "functions": (None, []),  # OpenAI's deprecated form of tools
    "function_call": (None, "none"),
    "modalities": (None, ["text"]),
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
    request_id: str, model: str, choices: list[dict[str, Any]], usage: Usage
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage.as_dict(),
    }


def choice_body(
    index: int,
    text: str,
    finish_reason: str | None,
    tool_calls: list[dict[str, Any]] | None = None,
    logprobs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One choice of a non-streaming answer (content is null when only tools were called)."""
    message: dict[str, Any] = {"role": "assistant", "content": text or (None if tool_calls else "")}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "index": index,
        "message": message,
        "logprobs": None if logprobs is None else {"content": logprobs},
        "finish_reason": finish_reason,
    }


class ChunkEncoder:
    """Pre-renders the constant part of a stream's chunks; a plain chunk (one choice, text
    only) is one string concatenation."""

    def __init__(self, request_id: str, model: str) -> None:
        self._meta = {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }
        head = json.dumps(self._meta)[:-1]
        self._head = "data: " + head + ', "choices": [{"index": 0, "delta": '
        self._usage_head = "data: " + head + ', "choices": [], "usage": '
        self._started: set[int] = set()  # choices whose first chunk (with the role) went out

    def delta(
        self,
        text: str,
        finish_reason: str | None = None,
        index: int = 0,
        tool_calls: list[dict[str, Any]] | None = None,
        logprobs: list[dict[str, Any]] | None = None,
    ) -> str:
        first = index not in self._started
        if first:
            self._started.add(index)
        if index or tool_calls is not None or logprobs is not None:
            return self._rich_delta(first, text, finish_reason, index, tool_calls, logprobs)
        if first:
            delta = '{"role": "assistant", "content": ' + json.dumps(text, ensure_ascii=False) + "}"
        elif text:
            delta = '{"content": ' + json.dumps(text, ensure_ascii=False) + "}"
        else:
            delta = "{}"
        reason = "null" if finish_reason is None else json.dumps(finish_reason)
        return self._head + delta + ', "logprobs": null, "finish_reason": ' + reason + "}]}\n\n"

    def _rich_delta(self, first, text, finish_reason, index, tool_calls, logprobs) -> str:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text or (first and not tool_calls):
            delta["content"] = text
        if tool_calls:
            delta["tool_calls"] = tool_calls
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": None if logprobs is None else {"content": logprobs},
            "finish_reason": finish_reason,
        }
        chunk = {**self._meta, "choices": [choice]}
        return "data: " + json.dumps(chunk, ensure_ascii=False) + "\n\n"

    def usage(self, usage: Usage) -> str:
        return self._usage_head + json.dumps(usage.as_dict()) + "}\n\n"

    @staticmethod
    def error(body: dict[str, Any]) -> str:
        return "data: " + json.dumps(body) + "\n\n"

    DONE = "data: [DONE]\n\n"
