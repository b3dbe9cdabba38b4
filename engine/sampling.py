"""A chat request's sampling parameters for vLLM: sampling, choices, log-probabilities,
stops, and the structured-output constraint its format asks for.

Structured output goes through vLLM's own structured-outputs backend (xgrammar in our
profiles, no hand-written decoder). Where the constraint comes from:

| request                                   | vLLM constraint                              |
|-------------------------------------------|----------------------------------------------|
| ``response_format: json_schema``          | the schema                                   |
| ``response_format: json_object``          | any JSON object                              |
| ``structured_outputs: {json|regex|choice|grammar|json_object}`` | the same (vLLM's extension) |
| ``tool_choice: {"type": "function", ...}``| that function's parameters (a schema)        |
| ``tool_choice: required``                 | an array of calls (``choices.tool_call_schema``) |

Every JSON constraint is sent as xgrammar's own grammar for that schema *without free
whitespace* (``compact_json``): an untrained or weak model then cannot fill ``max_tokens``
with newlines after a ``{`` (vLLM's server did exactly that here for a product schema).
It is done per request, not with the engine-wide
``structured_outputs_config.disable_any_whitespace``, so the engine's config is vLLM's
default for every other request (xgrammar's vLLM backend reads that flag only from the
engine config, not from ``StructuredOutputsParams``).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

from engine.choices import named_tool_schema, tool_call_schema
from engine.errors import RequestError
from engine.protocol import ChatCompletionRequest

# Request fields that map one to one onto vLLM's SamplingParams.
_PASSED_THROUGH = (
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "min_tokens",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "stop_token_ids",
)


def constraint_of(request: ChatCompletionRequest) -> tuple[dict[str, Any], str] | None:
    """The structured-output constraint (StructuredOutputsParams keywords) and the request
    field it came from, or None."""
    kind = request.tool_choice_kind
    if kind == "named":
        return {"json": named_tool_schema(request)}, "tool_choice"
    if kind == "required":
        return {"json": tool_call_schema(request)}, "tools"
    if request.structured_outputs is not None:
        given = request.structured_outputs.model_dump(by_alias=True, exclude_none=True)
        return given, "structured_outputs." + next(iter(given))
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"json_object": True}, "response_format"
    return {"json": fmt.json_schema.schema_}, "response_format.json_schema.schema"  # type: ignore[union-attr]


def compact_json(keywords: dict[str, Any], param: str) -> dict[str, Any]:
    """``keywords`` with a JSON schema or ``json_object`` constraint replaced by xgrammar's
    grammar for it with no free whitespace (vLLM's own xgrammar checks first: nesting depth,
    features xgrammar lacks); any other constraint unchanged."""
    if "json_object" in keywords:
        return {"grammar": _compact_grammar('{"type": "object"}')}
    schema = keywords.get("json")
    if schema is None:
        return keywords
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import check_json_nesting

    try:
        if isinstance(schema, str):
            schema = json.loads(schema)
        if not isinstance(schema, dict):
            raise ValueError("a JSON schema is an object")
        check_json_nesting(schema)  # before anything recurses into it
        return {"grammar": _compact_grammar(json.dumps(schema, sort_keys=True))}
    except (VLLMValidationError, ValueError, RuntimeError, TypeError) as exc:
        # xgrammar's messages start with "[time] file.cc:line: "
        message = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", str(exc).strip()) or repr(exc)
        raise RequestError(
            f"{param}: invalid JSON schema: {message}",
            code="invalid_structured_output",
            param=param,
        ) from None


@lru_cache(maxsize=256)
def _compact_grammar(schema: str) -> str:
    """xgrammar's grammar for ``schema`` (JSON text), once per schema."""
    import xgrammar
    from vllm.v1.structured_output.backend_xgrammar import (
        has_xgrammar_unsupported_json_features,
    )

    if has_xgrammar_unsupported_json_features(json.loads(schema)):
        raise ValueError("the schema uses features the grammar backend does not support")
    grammar = xgrammar.Grammar.from_json_schema(schema, any_whitespace=False, separators=(",", ":"))
    return str(grammar)


def sampling_params(
    request: ChatCompletionRequest, defaults: dict[str, Any], max_tokens: int, engine: Any
) -> Any:
    """vLLM ``SamplingParams`` for ``request`` (``defaults``: the model's generation config),
    validated against ``engine``'s model and structured-output backend: a constraint the
    backend cannot compile (an invalid schema or regex) is a 400 naming its field here,
    before anything is sent."""
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

    sampling = dict(defaults)
    for field in _PASSED_THROUGH:
        value = getattr(request, field)
        if value is not None:
            sampling[field] = value
    if request.logit_bias:
        sampling["logit_bias"] = {int(k): v for k, v in request.logit_bias.items()}
    if request.logprobs:
        sampling["logprobs"] = request.top_logprobs or 0
    if request.n > 1:
        sampling["n"] = request.n
    if request.tool_choice_kind != "none":
        # Qwen3's <tool_call> tags are special tokens in some tokenizers: keep them in the
        # text the parser reads (as vLLM's hermes parser does).
        sampling["skip_special_tokens"] = False
    constraint = constraint_of(request)
    param = None
    if constraint is not None:
        keywords, param = constraint
        keywords = compact_json(keywords, param)
        try:
            sampling["structured_outputs"] = StructuredOutputsParams(**keywords)
        except (VLLMValidationError, ValueError, TypeError) as exc:
            raise RequestError(f"{param}: {exc}", param=param) from None
    try:
        params = SamplingParams(
            **sampling,
            max_tokens=max_tokens,
            ignore_eos=request.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
        )
        if constraint is not None or request.logprobs or request.stop_token_ids:
            config = engine.vllm_config
            params.verify(
                engine.model_config,
                config.speculative_config,
                config.structured_outputs_config,
                engine.get_tokenizer(),
            )
    except (VLLMValidationError, ValueError) as exc:
        where = param or getattr(exc, "parameter", None)
        message = str(exc).strip()
        raise RequestError(
            f"{where}: {message}" if where else message,
            code="invalid_structured_output" if param else "invalid_sampling_params",
            param=where,
        ) from None
    return params


def tool_dicts(request: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """The tools as the chat template receives them (none when tool_choice is none: the
    model is not told of tools it may not call)."""
    if request.tool_choice_kind == "none":
        return None
    return [json.loads(tool.model_dump_json(exclude_none=True)) for tool in request.tools or ()]
