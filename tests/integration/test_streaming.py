"""Streams carry every token as it is made, and image decoding never pauses them.

Counted, not timed: vLLM merges the deltas a consumer has not picked up yet, so a stream
whose loop fell behind (or that dropped tokens without text) has fewer events than tokens.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from PIL import Image, ImageDraw

from tests.conftest import MODEL
from tests.utils import data_url, encode, image_message, noise_image

pytestmark = pytest.mark.slow
TOKENS = 64
URL = data_url(encode(noise_image(336, 336, seed=21), "JPEG"), "image/jpeg")


async def _stream(http: httpx.AsyncClient, max_tokens: int, image_url: str = URL) -> dict:
    """One streaming request: its content events (arrival times) and its usage."""
    body = {
        "model": MODEL,
        "messages": image_message(image_url),
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events, usage, served = [], None, None
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        served = response.headers["x-served-model"]
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                events.append(time.monotonic())
            elif chunk.get("usage"):
                usage = chunk["usage"]
    return {"events": events, "tokens": usage["completion_tokens"], "served": served}


def _photo(i: int) -> Image.Image:
    """A 4000x3000 image that compresses well (gradients): small to send, costly to decode."""
    size = (4000, 3000)
    bands = [
        Image.linear_gradient("L").resize(size),
        Image.radial_gradient("L").resize(size),
        Image.linear_gradient("L").rotate(90).resize(size),
    ]
    photo = Image.merge("RGB", bands)
    ImageDraw.Draw(photo).rectangle((100 * i, 100, 100 * i + 500, 600), fill=(40 * i, 80, 200))
    return photo


def _events_per_token(streams: list[dict]) -> float:
    """The share of all tokens that arrived as events of their own."""
    return sum(len(s["events"]) for s in streams) / sum(s["tokens"] for s in streams)


async def _concurrent_streams(base_url: str, concurrency: int, rounds: int) -> list[dict]:
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
        streams = []
        for _ in range(rounds):
            streams += await asyncio.gather(*(_stream(http, TOKENS) for _ in range(concurrency)))
    return streams


@pytest.mark.parametrize("concurrency, rounds", [(1, 8), (8, 2)])
def test_every_token_arrives_as_its_own_event(server, concurrency, rounds):
    """A stream loop that falls behind merges whole streams (issue 11 measured a median ITL
    of 0.01 ms: a handful of events per 64 tokens). A pause of the whole machine for a few
    decode steps (CI once saw 4 concurrent streams lose 5 events each: 1000 of 1024 tokens
    as events) is not that, so the line is on the share over all streams, with a floor
    per stream far above what merged streams reach."""
    streams = asyncio.run(_concurrent_streams(server.base_url, concurrency, rounds))
    assert all(s["tokens"] == TOKENS for s in streams)
    counts = sorted(len(s["events"]) for s in streams)
    assert _events_per_token(streams) >= 0.95, f"content events per {TOKENS}-token stream: {counts}"
    assert counts[0] >= 0.75 * TOKENS, f"content events per {TOKENS}-token stream: {counts}"
    # At concurrency 8 half of the streams overflow to the fallback (its Ray handle path).
    if concurrency == 8:
        assert len({s["served"] for s in streams}) == 2


def test_phone_photos_being_decoded_do_not_pause_a_stream(server):
    """Six 12 MP PNG photos (small files, ~0.2 s of CPU each to decode) arrive while a
    stream runs. On the event loop they would stall it for over a second and vLLM would
    merge the stalled tokens; off the loop the stream keeps its tokens and no long gap.

    Measured on a 2-core machine, 10 runs each: decoded on the loop, 143-244 of the 400
    tokens arrive as events of their own; off the loop, 368-400. The few merges left come
    from two busy-waiting engines and six requests' parsing competing for two cores (CI
    saw 371), so the line sits between the two ranges, not at the quiet-machine 95%."""
    photos = [data_url(encode(_photo(i))) for i in range(6)]

    async def scenario():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as http:
            stream = asyncio.ensure_future(_stream(http, 400))
            await asyncio.sleep(0.5)  # the stream is under way
            uploads = [
                http.post(
                    "/v1/chat/completions",
                    json={"model": MODEL, "messages": image_message(url), "max_tokens": 2},
                )
                for url in photos
            ]
            answers = await asyncio.gather(*uploads)
            return await stream, answers

    stream, answers = asyncio.run(scenario())
    assert [a.status_code for a in answers] == [200] * len(photos)
    assert stream["tokens"] == 400
    assert len(stream["events"]) >= 340, f"{len(stream['events'])} events for 400 tokens"
    gaps = [b - a for a, b in zip(stream["events"], stream["events"][1:], strict=False)]
    # Decoded on the loop the six photos would stop the stream for six decodes at once (~2 s
    # on the machine this was set on, where a pause stayed under 1 s off the loop). On a slower
    # one (AVX2-only; one decode 0.2-0.3 s alone) two cores shared by six decoding threads,
    # two engines and the stream paused it for 1.2-2.1 s (CI: 2.0 s, ten decodes of 0.2 s):
    # there the event count above is what tells the loop from a thread, and this bound only
    # catches a stall of more than fifteen decodes (the six photos, one after another, 2.5x).
    decode_s = min(_decode_time(photos[0]) for _ in range(2))
    bound = max(2.5, 15 * decode_s)
    assert max(gaps) < bound, (
        f"longest pause between tokens: {max(gaps):.2f}s (one decode {decode_s:.2f}s)"
    )


def _decode_time(url: str) -> float:
    import base64
    import io

    data = base64.b64decode(url.split(",", 1)[1])
    start = time.perf_counter()
    Image.open(io.BytesIO(data)).convert("RGB")
    return time.perf_counter() - start
