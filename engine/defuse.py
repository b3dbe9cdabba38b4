"""Client text that spells a special token stays text, whatever the backend.

A word joiner after the first character of ``<|im_start|>``, ``<|image_pad|>``,
``<tool_call>``, ... keeps the tokenizer from reading it as the control token: no role
spoofing, no stray image placeholders, no forged tool calls. Applied to message text, tool
results, tool-call arguments and tool definitions before the chat template runs.
"""

from __future__ import annotations

import json
import re
from typing import Any

_WORD_JOINER = "\u2060"


def control_token_pattern(tokenizer: Any) -> re.Pattern[str] | None:
    """A pattern of the tokenizer's added and special tokens (``<|im_start|>``,
    ``<|image_pad|>``, ``<tool_call>``, ...): each is matched whole wherever it appears."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    tokens = {t.content for t in added.values()}
    tokens |= set(getattr(tokenizer, "all_special_tokens", None) or ())
    tokens = {t for t in tokens if len(t) > 1}
    if not tokens:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def defuse_control_tokens(conversation: list[dict[str, Any]], pattern: re.Pattern[str] | None):
    """Client text that spells a special token stays text: a word joiner after its first
    character keeps the tokenizer from reading it as the control token (no role spoofing
    with ``<|im_start|>``, no stray ``<|image_pad|>`` placeholders, no forged
    ``<tool_call>``). Message text, tool results and tool-call arguments; in place."""
    if pattern is None:
        return
    for message in conversation:
        content = message["content"]
        if isinstance(content, str):
            message["content"] = _defuse(content, pattern)
        else:
            for part in content:
                if part.get("type") == "text":
                    part["text"] = _defuse(part["text"], pattern)
        for call in message.get("tool_calls") or ():
            call["function"]["arguments"] = _defuse_arguments(
                call["function"]["arguments"], pattern
            )


def defuse_strings(value: Any, pattern: re.Pattern[str] | None) -> Any:
    """A JSON value (tool definitions) with every string in it, keys included, defused."""
    if pattern is None:
        return value
    if isinstance(value, str):
        return _defuse(value, pattern)
    if isinstance(value, dict):
        return {_defuse(k, pattern): defuse_strings(v, pattern) for k, v in value.items()}
    if isinstance(value, list):
        return [defuse_strings(item, pattern) for item in value]
    return value


def _defuse_arguments(arguments: str, pattern: re.Pattern[str]) -> str:
    """Tool-call arguments are JSON that the chat template re-serialises: defuse the decoded
    strings, or ``\\u003c|im_start|>`` in the text would come back a control token."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return _defuse(arguments, pattern)
    return json.dumps(defuse_strings(value, pattern), ensure_ascii=False)


def _defuse(text: str, pattern: re.Pattern[str]) -> str:
    return pattern.sub(lambda m: m[0][0] + _WORD_JOINER + m[0][1:], text)
