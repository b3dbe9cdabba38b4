"""One choice's raw output (text and tokens per engine step) in OpenAI's terms.

``ChoiceShaper`` turns each step of one choice into what the client gets: content text,
tool-call deltas and log-probabilities. How the text becomes tool calls depends on the
request's ``tool_choice`` (``ChatCompletionRequest.tool_choice_kind``):

- ``none``: the text is the content.
- ``named``: structured output made the text the function's arguments (a JSON object), so
  it streams as that call's ``arguments``.
- ``required``: structured output made the text a JSON array of ``{"name", "parameters"}``
  (``tool_call_schema``); each call is sent once its element is complete.
- ``auto``: the model decides; Qwen3 writes ``<tool_call>{"name": ..., "arguments": ...}
  </tool_call>`` (hermes style), parsed as it streams by vLLM's own hermes parser, which is
  what ``vllm serve --tool-call-parser hermes`` uses for Qwen3.

A choice that made tool calls (``auto``, ``required``) finishes with ``tool_calls``
(``length`` stays ``length``); a named call finishes with ``stop``, as OpenAI's API and vLLM's
server answer a forced function. ``parallel_tool_calls: false`` keeps an ``auto`` choice to
its first call, as vLLM does.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from engine.errors import RequestError
from engine.protocol import ChatCompletionRequest

_DECODER = json.JSONDecoder()


def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_call_schema(request: ChatCompletionRequest) -> dict[str, Any]:
    """The JSON Schema ``tool_choice: required`` constrains the output to: one or more calls
    (at most one when ``parallel_tool_calls`` is false) of the given functions, as vLLM
    builds it (``vllm.tool_parsers.utils``): each function's ``$defs`` move to the root, where
    its ``$ref``s then resolve; two functions defining one name differently is a 400."""
    calls, definitions = [], {}
    for i, tool in enumerate(request.tools or ()):
        parameters = dict(tool.function.parameters or {"type": "object", "properties": {}})
        for name, definition in parameters.pop("$defs", {}).items():
            if definitions.setdefault(name, definition) != definition:
                raise RequestError(
                    f"tools define $defs/{name} in two different ways",
                    param=f"tools.{i}.function.parameters",
                )
        calls.append(
            {
                "properties": {
                    "name": {"type": "string", "enum": [tool.function.name]},
                    "parameters": parameters,
                },
                "required": ["name", "parameters"],
            }
        )
    schema: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": {"type": "object", "anyOf": calls},
    }
    if request.parallel_tool_calls is False:
        schema["maxItems"] = 1
    if definitions:
        schema["$defs"] = definitions
    return schema


def named_tool_schema(request: ChatCompletionRequest) -> dict[str, Any]:
    """The arguments schema of the function ``tool_choice`` names."""
    name = request.tool_choice.function.name  # type: ignore[union-attr]
    (tool,) = [t for t in request.tools or () if t.function.name == name]
    return tool.function.parameters or {"type": "object", "properties": {}}


def openai_logprobs(
    token_ids: Sequence[int], steps: Sequence[dict[int, Any]] | None, top_n: int
) -> list[dict[str, Any]]:
    """vLLM's per-token ``{token_id: Logprob}`` maps as OpenAI ``logprobs.content`` entries:
    the sampled token's log-probability and the ``top_n`` most likely tokens at its step."""
    entries = []
    for token_id, step in zip(token_ids, steps or (), strict=False):
        chosen = step.get(token_id)
        ranked = sorted(step.values(), key=lambda lp: lp.rank if lp.rank is not None else 1 << 30)
        entries.append(
            {
                **_token_entry(chosen, token_id),
                "top_logprobs": [_token_entry(lp, None) for lp in ranked[:top_n]],
            }
        )
    return entries


def _token_entry(logprob: Any, token_id: int | None) -> dict[str, Any]:
    text = logprob.decoded_token if logprob is not None else None
    if text is None:
        text = f"token_id:{token_id}"
    value = max(float(logprob.logprob), -9999.0) if logprob is not None else -9999.0
    return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8", "replace"))}


class ChoiceShaper:
    """One choice of one request, step by step (``step``), in OpenAI's terms."""

    def __init__(
        self,
        request: ChatCompletionRequest,
        hermes_parser: Callable[[], Any] | None = None,
    ) -> None:
        self.kind = request.tool_choice_kind
        self._single_call = request.parallel_tool_calls is False
        self.top_n = (request.top_logprobs or 0) if request.logprobs else None
        self._name = request.tool_choice.function.name if self.kind == "named" else None  # type: ignore[union-attr]
        self._id = tool_call_id()
        self._text = ""
        self._token_ids: list[int] = []
        self._calls_sent = 0  # required: array elements sent; named/auto: calls begun
        self._scan_at = 0  # required: where the next array element may start
        self._parser = hermes_parser() if self.kind == "auto" and hermes_parser else None
        self._content_sent = 0  # auto: characters of the text sent as content

    def step(
        self,
        text: str,
        token_ids: Sequence[int],
        logprobs: Sequence[dict[int, Any]] | None,
        finish_reason: str | None,
    ) -> tuple[str, list[dict[str, Any]] | None, list[dict[str, Any]] | None, str | None]:
        """(content, tool-call deltas, logprobs entries, finish reason) of one step."""
        entries = None
        if self.top_n is not None:
            entries = openai_logprobs(token_ids, logprobs, self.top_n)
        previous_text, previous_ids = self._text, self._token_ids
        self._text += text
        self._token_ids = [*previous_ids, *token_ids]
        content, calls = "", None
        if self.kind == "none":
            content = text
        elif self.kind == "named":
            calls = self._named(text)
        elif self.kind == "required":
            calls = self._required()
        else:
            content, calls = self._auto(previous_text, previous_ids, text, token_ids)
            if finish_reason is not None and not self._calls_sent:
                content += self._unsent_content()
        if finish_reason == "stop" and self._calls_sent and self.kind != "named":
            finish_reason = "tool_calls"
        return content, calls, entries, finish_reason

    # -- the three ways text becomes calls -----------------------------------------------
    def _named(self, text: str) -> list[dict[str, Any]] | None:
        if not self._calls_sent:
            self._calls_sent = 1
            call = {"name": self._name, "arguments": text}
            return [{"index": 0, "id": self._id, "type": "function", "function": call}]
        return [{"index": 0, "function": {"arguments": text}}] if text else None

    def _required(self) -> list[dict[str, Any]] | None:
        """Every array element completed since the last step, as a whole call."""
        calls = []
        text = self._text
        while True:
            start = self._scan_at
            while start < len(text) and text[start] in "[, \n\t\r":
                start += 1
            if start >= len(text) or text[start] != "{":
                break
            try:
                element, end = _DECODER.raw_decode(text, start)
            except ValueError:
                break  # not complete yet
            self._scan_at = end
            call = {"name": element.get("name"), "arguments": json.dumps(element.get("parameters"))}
            calls.append(
                {
                    "index": self._calls_sent,
                    "id": tool_call_id(),
                    "type": "function",
                    "function": call,
                }
            )
            self._calls_sent += 1
        return calls or None

    def _auto(
        self, previous_text: str, previous_ids: list[int], text: str, token_ids: Sequence[int]
    ) -> tuple[str, list[dict[str, Any]] | None]:
        if self._parser is None:
            self._content_sent += len(text)
            return text, None
        delta = self._parser.extract_tool_calls_streaming(
            previous_text, self._text, text, previous_ids, self._token_ids, list(token_ids), None
        )
        if delta is None:
            return "", None
        calls = [c.model_dump(exclude_none=True) for c in delta.tool_calls or ()]
        if self._single_call:
            calls = [c for c in calls if c["index"] == 0]
        if calls:
            self._calls_sent = max(self._calls_sent, 1 + max(c["index"] for c in calls))
        content = delta.content or ""
        self._content_sent += len(content)
        return content, calls or None

    def _unsent_content(self) -> str:
        """At the end, text the parser held back (a ``<tool_call`` prefix that never became
        one) is content after all. (Content is always a prefix of the text.)"""
        rest = self._text[self._content_sent :]
        self._content_sent = len(self._text)
        return rest
