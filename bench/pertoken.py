"""Per-token CPU of our plain streaming path (``VllmBackend.generate`` over a fake 64-step
vLLM output stream, plus the SSE encoding): no engine, so a change to the hot path can be
compared across checkouts without the engine's noise.

    PYTHONPATH=. python bench/pertoken.py after
    PYTHONPATH=/tmp/before python bench/pertoken.py before   # git worktree add /tmp/before REV
"""

import asyncio
import dataclasses
import inspect
import json
import sys
import time
from types import SimpleNamespace as NS

from engine.backend import Prepared
from engine.intake import parse_request
from engine.llm import VllmBackend, VllmRequest
from engine.protocol import ChunkEncoder

TOKENS = 64
outs = [
    NS(
        outputs=[
            NS(
                text="ab",
                token_ids=[1],
                finish_reason=None if i < TOKENS - 1 else "length",
                index=0,
                logprobs=None,
            )
        ],
        finished=i == TOKENS - 1,
    )
    for i in range(TOKENS)
]


class LLM:
    def generate(self, *a):
        async def gen():
            for o in outs:
                yield o

        return gen()


b = VllmBackend.__new__(VllmBackend)
b.llm = LLM()
req = parse_request(
    json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    ).encode()
)
nfields = len(dataclasses.fields(VllmRequest))
rich = "index" in inspect.signature(ChunkEncoder.delta).parameters


async def one():
    h = VllmRequest(None, None, "x", req) if nfields == 4 else VllmRequest(None, None, "x")
    enc = ChunkEncoder("r", "m")
    n = 0
    async for d in b.generate(Prepared("r", 10, h)):
        s = (
            enc.delta(d.text, d.finish_reason, d.index, d.tool_calls, d.logprobs)
            if rich
            else enc.delta(d.text, d.finish_reason)
        )
        n += len(s)
    return n


async def main():
    for _ in range(200):
        await one()
    best = []
    for _round in range(7):
        t = time.perf_counter()
        for _ in range(2000):
            await one()
        best.append((time.perf_counter() - t) / (2000 * TOKENS) * 1e6)
    print(f"{sys.argv[1]}: µs per token: min {min(best):.3f} median {sorted(best)[3]:.3f}")


if __name__ == "__main__":
    asyncio.run(main())
