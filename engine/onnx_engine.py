"""The ONNX Runtime backend: a continuous-batching generation loop over ``OnnxModel``.

Why a loop of our own: onnxruntime-genai's generator does not run these graphs. Its config
has fixed input lists (nothing fills a deepstack input; the deepstack pull request is still
open upstream), and its continuous-batching ``Engine`` takes decoder-only models, so a
vision-language model would be served one request at a time. The loop here is small:

1. **Admit**: requests waiting and free slots (``max_num_seqs``): each is prefilled on its
   own (vision encoder per image, then the decoder over the prompt) and its first token is
   sampled and sent.
2. **Decode**: every running sequence advances one token in one batched decoder call.
3. **Finish**: a sequence that sampled an end token, reached ``max_tokens`` or a stop string,
   or whose client left, leaves the batch at once; its slot is free for the next admit.

It runs in a thread of its own (ONNX Runtime releases the GIL while it computes), and hands
each request's tokens to its event loop as they come. Sampling is greedy at temperature 0,
else temperature / top-k / top-p with a per-request seed, as vLLM samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.backend import GenerationDelta, Prepared
from engine.config import ModelConfig
from engine.defuse import control_token_pattern, defuse_control_tokens
from engine.errors import EngineError, RequestError
from engine.process import server_log
from engine.protocol import ChatCompletionRequest

# Request features the vLLM backend serves and this one does not: a 400 naming the field,
# never ignored.
_NOT_ON_ONNX = (
    ("n", lambda r: r.n > 1),
    ("logprobs", lambda r: r.logprobs),
    ("tools", lambda r: r.tool_choice_kind != "none"),
    ("response_format", lambda r: r.output_constraint_field == "response_format"),
    ("structured_outputs", lambda r: r.structured_outputs is not None),
    ("logit_bias", lambda r: bool(r.logit_bias)),
    ("presence_penalty", lambda r: bool(r.presence_penalty)),
    ("frequency_penalty", lambda r: bool(r.frequency_penalty)),
    ("repetition_penalty", lambda r: r.repetition_penalty not in (None, 1.0)),
    ("stop_token_ids", lambda r: bool(r.stop_token_ids)),
)
_ENGINE_KWARGS = {"max_num_seqs", "max_model_len", "providers", "intra_op_num_threads"}


@dataclass
class OnnxRequest:
    """One request inside the loop (the backend's ``Prepared`` handle)."""

    prompt: Any  # engine.onnx_model.Prompt
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    min_tokens: int
    ignore_eos: bool
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    loop: asyncio.AbstractEventLoop | None = None
    aborted: bool = False
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


class Sampler:
    """One request's next-token choice from its logits."""

    def __init__(self, request: OnnxRequest, eos: set[int]) -> None:
        self.request = request
        self.eos = np.fromiter(eos, dtype=np.int64)
        seed = None if request.seed is None else request.seed % 2**64  # the API allows < 0
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray, generated: int) -> int:
        request = self.request
        logits = logits.astype(np.float64, copy=True)
        if generated < request.min_tokens:  # ignore_eos does not mask: it does not stop
            logits[self.eos] = -np.inf
        if request.temperature <= 1e-5:
            return int(np.argmax(logits))
        logits /= request.temperature
        if 0 < request.top_k < len(logits):
            cutoff = np.partition(logits, -request.top_k)[-request.top_k]
            logits[logits < cutoff] = -np.inf
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if request.top_p < 1.0:
            order = np.argsort(-probs)
            keep = np.cumsum(probs[order]) - probs[order] < request.top_p
            mask = np.zeros_like(probs, dtype=bool)
            mask[order[keep]] = True
            probs = np.where(mask, probs, 0.0)
            probs /= probs.sum()
        return int(self.rng.choice(len(probs), p=probs))


@dataclass
class _Running:
    request: OnnxRequest
    sequence: Any  # engine.onnx_model.Sequence
    sampler: Sampler
    sent: int = 0  # characters of the detokenized text sent so far
    done: bool = False


class OnnxEngine:
    """The generation loop, in a thread; ``submit`` from any event loop."""

    def __init__(self, model: Any, max_num_seqs: int, name: str = "onnx") -> None:
        from engine.metrics import ONNX_DECODE_BATCH

        self._batch_size = ONNX_DECODE_BATCH.labels(name)
        self.model = model
        self.max_num_seqs = max_num_seqs
        self._inbox: queue.Queue[OnnxRequest] = queue.Queue()
        self._running: list[_Running] = []
        self._stopped = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="onnx-engine", daemon=True)
        self._thread.start()

    def submit(self, request: OnnxRequest) -> None:
        request.loop = asyncio.get_running_loop()
        self._inbox.put(request)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def stop(self) -> None:
        """End the loop; requests running or waiting get an error, not silence."""
        self._stopped.set()
        self._inbox.put(None)  # type: ignore[arg-type]  # wakes an idle loop

    # -- the loop --------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stopped.is_set():
                self._admit()
                if self._running:
                    self._decode()
        except BaseException as exc:  # noqa: BLE001 - a dead loop fails every request clearly
            self.error = exc
            server_log().error("ONNX engine loop failed", exc_info=exc)
        finally:  # whatever ended the loop, nobody is left waiting
            gone = self.error or EngineError("the ONNX engine stopped", status_code=503)
            for running in self._running:
                self._send(running.request, gone)
            while True:
                try:
                    request = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if request is not None:
                    self._send(request, gone)

    def _admit(self) -> None:
        while len(self._running) < self.max_num_seqs and not self._stopped.is_set():
            try:
                request = self._inbox.get(block=not self._running)
            except queue.Empty:
                return
            if request is None:  # stop()
                return
            if request.aborted:
                continue
            try:
                logits, sequence = self.model.prefill(request.prompt)
                running = _Running(request, sequence, Sampler(request, self.model.eos_token_ids))
                self._advance(running, logits)
            except Exception as exc:  # noqa: BLE001 - this request fails, the engine serves on
                server_log().error("ONNX prefill failed", exc_info=exc)
                self._send(request, exc)
                continue
            if not self._finished(running):
                self._running.append(running)

    def _decode(self) -> None:
        live = [r for r in self._running if not r.request.aborted]
        self._running = live
        if not live:
            return
        tokens = [r.sequence.tokens[-1] for r in live]
        self._batch_size.observe(len(live))
        logits = self.model.decode([r.sequence for r in live], tokens)
        for running, row in zip(live, logits, strict=True):
            self._advance(running, row)
        self._running = [r for r in live if not self._finished(r)]

    def _advance(self, running: _Running, logits: np.ndarray) -> None:
        """Sample one token, send the new text and finish the request if it is done. Text is
        held back while it ends in a partial character, and by the longest stop string less
        one character (that much could still become a stop), as vLLM's detokenizer does."""
        request, sequence = running.request, running.sequence
        token = running.sampler(logits, len(sequence.tokens))
        sequence.tokens.append(token)
        generated = len(sequence.tokens)
        reason = None
        if token in self.model.eos_token_ids and not request.ignore_eos:
            reason = "stop" if generated > request.min_tokens else None
        if reason is None and generated >= request.max_tokens:
            reason = "length"
        text = self.model.tokenizer.decode(sequence.tokens, skip_special_tokens=True)
        if request.stop and generated >= request.min_tokens:
            search_from = max(0, running.sent - max(map(len, request.stop)) + 1)
            hits = [at for stop in request.stop if (at := text.find(stop, search_from)) != -1]
            if hits:
                text, reason = text[: min(hits)], "stop"
        end = len(text)
        if reason is None:
            if text.endswith("\ufffd"):  # a multi-byte character not complete yet
                end = len(text) - 1
            end -= max(map(len, request.stop), default=1) - 1
        end = max(end, running.sent)
        delta = text[running.sent : end]
        running.sent = end
        running.done = reason is not None
        self._send(request, (delta, reason))

    @staticmethod
    def _finished(running: _Running) -> bool:
        return running.done or running.request.aborted

    @staticmethod
    def _send(request: OnnxRequest, item: Any) -> None:
        if request.loop is None:
            return
        with contextlib.suppress(RuntimeError):  # its event loop closed: nobody to tell
            request.loop.call_soon_threadsafe(request.outbox.put_nowait, item)


class OnnxBackend:
    """``engine.backend.Backend`` over an exported model on ONNX Runtime."""

    uses_conversation = True
    kv_cache_usage = None

    def __init__(self, config: ModelConfig) -> None:
        from engine.onnx_model import OnnxModel

        kwargs = dict(config.engine_kwargs)
        unknown = set(kwargs) - _ENGINE_KWARGS
        if unknown:
            raise ValueError(
                f"{config.name}: engine_kwargs the ONNX runtime does not take: {sorted(unknown)}"
            )
        self.name = config.name
        self.max_model_len = int(kwargs.get("max_model_len", 4096))
        self.model = OnnxModel(
            config.resolved_model_path(),
            kwargs.get("providers"),
            kwargs.get("intra_op_num_threads"),
        )
        self.engine = OnnxEngine(self.model, int(kwargs.get("max_num_seqs", 8)), self.name)
        self._control_tokens = control_token_pattern(self.model.tokenizer)
        server_log().info(
            "%s: ONNX Runtime %s, providers %s, quantization %s",
            self.name,
            _ort_version(),
            self.model.providers,
            self.model.config.get("quantization"),
        )

    async def prepare(
        self, request_id: str, request: ChatCompletionRequest, conversation: list[dict[str, Any]]
    ) -> Prepared[OnnxRequest]:
        for name, asks in _NOT_ON_ONNX:
            if asks(request):
                raise RequestError(
                    f"{name} is not supported by this model's runtime (ONNX Runtime)",
                    code="unsupported_parameter",
                    param=name,
                )
        defuse_control_tokens(conversation, self._control_tokens)
        try:
            prompt = await asyncio.to_thread(self.model.render, conversation)
        except ValueError as exc:  # the processor's word on a bad image or prompt
            raise RequestError(str(exc), param="messages") from None
        prompt_tokens = len(prompt.input_ids)
        limit = request.output_token_limit
        if prompt_tokens + (limit or 1) > self.max_model_len:
            raise RequestError(
                f"the prompt is {prompt_tokens} tokens (images included) and max_tokens is "
                f"{limit}; this model's context is {self.max_model_len} tokens",
                code="context_length_exceeded",
                param="max_tokens" if limit else "messages",
            )
        defaults = self.model.generation_defaults
        handle = OnnxRequest(
            prompt=prompt,
            max_tokens=limit or self.max_model_len - prompt_tokens,
            temperature=_pick(request.temperature, defaults.get("temperature"), 1.0),
            top_p=_pick(request.top_p, defaults.get("top_p"), 1.0),
            top_k=_pick(request.top_k, defaults.get("top_k"), 0),
            seed=request.seed,
            stop=request.stop or [],
            min_tokens=request.min_tokens or 0,
            ignore_eos=request.ignore_eos,
        )
        return Prepared(request_id, prompt_tokens, handle)

    async def generate(self, prepared: Prepared[OnnxRequest]) -> AsyncIterator[GenerationDelta]:
        handle = prepared.handle
        if not self.engine.alive:
            raise EngineError("the ONNX engine is not running", status_code=503)
        self.engine.submit(handle)
        finished = False
        try:
            while not finished:
                item = await handle.outbox.get()
                if isinstance(item, BaseException):
                    raise EngineError(f"generation failed: {item}") from item
                text, reason = item
                finished = reason is not None
                yield GenerationDelta(text, 1, reason, prepared.prompt_tokens)
        finally:
            if not finished:
                handle.aborted = True  # the loop drops it before its next step

    async def abort(self, prepared: Prepared[OnnxRequest]) -> None:
        prepared.handle.aborted = True

    async def check_health(self) -> None:
        if not self.engine.alive:
            raise EngineError(f"the ONNX engine stopped: {self.engine.error!r}", status_code=503)

    async def metrics_text(self) -> None:
        return None

    async def aclose(self) -> None:
        self.engine.stop()


def _pick(value: Any, default: Any, fallback: Any) -> Any:
    return value if value is not None else (default if default is not None else fallback)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
