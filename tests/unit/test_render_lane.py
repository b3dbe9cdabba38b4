"""engine.llm.RenderLane: vLLM's renderer on one conversation at a time, in arrival order;
small images on the event loop, large ones on its thread, never two at once."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from PIL import Image

from engine.llm import RenderLane, _pixels
from fixtures.tiny_model import ensure_model


def chat(*sizes: tuple[int, int], text: str = "what is this?") -> list[dict]:
    parts = [{"type": "image_pil", "image_pil": Image.new("RGB", size)} for size in sizes]
    return [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [*parts, {"type": "text", "text": text}]},
    ]


class FakeRenderer:
    """``render_chat``'s shape; records where and in which order it ran, and overlaps."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self.calls: list[tuple[str, str]] = []  # (text, thread name)
        self.running = 0
        self.overlaps = 0
        self._lock = threading.Lock()

    def render_chat(self, conversations, chat_params, tok_params):
        with self._lock:
            self.running += 1
            self.overlaps += self.running > 1
        try:
            (conversation,) = conversations
            text = conversation[-1]["content"][-1]["text"]
            self.calls.append((text, threading.current_thread().name))
            time.sleep(self.seconds)
            return conversations, [{"prompt_token_ids": [1, 2, 3], "text": text}]
        finally:
            with self._lock:
                self.running -= 1


def test_pixels_counts_every_decoded_image_and_nothing_else():
    assert _pixels(chat()) == 0
    assert _pixels(chat((336, 336))) == 336 * 336
    assert _pixels(chat((100, 200), (30, 10))) == 100 * 200 + 30 * 10
    assert _pixels([{"role": "user", "content": "plain text"}]) == 0


def test_small_images_render_on_the_loop_and_large_ones_on_the_lanes_thread():
    renderer = FakeRenderer()
    lane = RenderLane(renderer.render_chat, inline_max_pixels=512 * 512)

    async def main():
        small = await lane.render(chat((336, 336), text="small"), None, None)
        large = await lane.render(chat((1024, 768), text="large"), None, None)
        text_only = await lane.render(chat(text="text"), None, None)
        return small, large, text_only

    try:
        small, large, text_only = asyncio.run(main())
    finally:
        lane.close()
    assert (small["text"], large["text"], text_only["text"]) == ("small", "large", "text")
    loop_thread = threading.main_thread().name
    threads = dict(renderer.calls)
    assert threads["small"] == loop_thread and threads["text"] == loop_thread
    assert threads["large"].startswith("render")


def test_renders_run_one_at_a_time_in_arrival_order():
    renderer = FakeRenderer(seconds=0.01)
    lane = RenderLane(renderer.render_chat, inline_max_pixels=512 * 512)
    sizes = [(336, 336), (1024, 768)] * 6

    async def main():
        return await asyncio.gather(
            *(lane.render(chat(size, text=str(i)), None, None) for i, size in enumerate(sizes))
        )

    try:
        results = asyncio.run(main())
    finally:
        lane.close()
    assert [r["text"] for r in results] == [str(i) for i in range(len(sizes))]
    assert [text for text, _ in renderer.calls] == [str(i) for i in range(len(sizes))]
    assert renderer.overlaps == 0


def test_the_loop_runs_between_two_inline_renders():
    renderer = FakeRenderer(seconds=0.005)
    lane = RenderLane(renderer.render_chat, inline_max_pixels=512 * 512)
    ticks: list[int] = []  # renders done when a token-passing task ran

    async def ticker():
        while len(renderer.calls) < 8:
            ticks.append(len(renderer.calls))
            await asyncio.sleep(0)

    async def main():
        tick = asyncio.ensure_future(ticker())
        await asyncio.gather(
            *(lane.render(chat((64, 64), text=str(i)), None, None) for i in range(8))
        )
        await tick

    try:
        asyncio.run(main())
    finally:
        lane.close()
    # A wave of renders never holds the loop for more than one render at a stretch.
    assert set(range(8)) <= set(ticks)


def test_a_cancelled_large_render_holds_the_lane_until_its_thread_is_done():
    renderer = FakeRenderer(seconds=0.2)
    lane = RenderLane(renderer.render_chat, inline_max_pixels=512 * 512)

    async def main():
        large = asyncio.ensure_future(lane.render(chat((2000, 1500), text="large"), None, None))
        await asyncio.sleep(0.05)  # the thread is rendering
        small = asyncio.ensure_future(lane.render(chat((64, 64), text="small"), None, None))
        await asyncio.sleep(0)
        large.cancel()
        await asyncio.wait({large})
        await small
        return large

    try:
        large = asyncio.run(main())
    finally:
        lane.close()
    assert large.cancelled()
    assert [text for text, _ in renderer.calls] == ["large", "small"]
    assert renderer.overlaps == 0


@pytest.fixture(scope="module")
def renderer(tmp_path_factory):
    """vLLM's own renderer for the generated tiny Qwen3-VL (no engine)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.renderers.registry import renderer_from_config

    path = ensure_model("tiny", tmp_path_factory.mktemp("models"))
    args = EngineArgs(model=str(path), max_model_len=4096, limit_mm_per_prompt={"image": 4})
    return renderer_from_config(args.create_engine_config())


def test_the_lane_gives_the_engine_what_vllms_own_async_render_gives(renderer):
    from vllm.renderers.params import ChatParams, TokenizeParams

    chat_params = ChatParams(chat_template_kwargs={"add_generation_prompt": True})
    tok_params = TokenizeParams(max_total_tokens=4096, max_output_tokens=16)
    noise = np.random.default_rng(0).integers(0, 255, (336, 336, 3), dtype=np.uint8)
    small = Image.fromarray(noise)
    large = small.resize((1024, 768))

    def conversation(image: Image.Image, text: str) -> list[dict]:
        part = {"type": "image_pil", "image_pil": image, "uuid": f"{text}-{image.width}"}
        return [{"role": "user", "content": [part, {"type": "text", "text": text}]}]

    lane = RenderLane(renderer.render_chat, inline_max_pixels=512 * 512)

    async def main():
        found = []
        for image, text in ((small, "small"), (large, "large")):
            ours = await lane.render(conversation(image, text), chat_params, tok_params)
            _, (theirs,) = await renderer.render_chat_async(
                [conversation(image, text)], chat_params, tok_params
            )
            found.append((ours, theirs))
        return found

    try:
        found = asyncio.run(main())
    finally:
        lane.close()
    for ours, theirs in found:
        assert ours["prompt_token_ids"] == theirs["prompt_token_ids"]
        assert ours["mm_hashes"] == theirs["mm_hashes"]
        assert len(ours["prompt_token_ids"]) > 16  # the image's tokens are in the prompt
