"""A tiny OpenAI-style streaming server with known, deterministic timing, for testing the harness.

    python -m bench.fake_server --port 8900 --ttft-ms 100 --itl-ms 20

Each chat completion streams ``max_tokens`` one-token chunks: the first after ``ttft_ms``,
the rest ``itl_ms`` apart, then a usage chunk and ``[DONE]``. The n-th request (1-based, in
arrival order) is refused with ``--error-status`` when n is a multiple of ``--error-every``,
and is answered as ``--served-models[n % len]`` (the ``x-served-model`` header). With zero
delays it answers as fast as asyncio can write, which is how the harness's own speed is measured.
``--role-chunk`` first sends a role-only chunk (``{"role": "assistant", "content": ""}``, as
vLLM's server does) at ``ttft_ms`` and the tokens from then on, ``itl_ms`` apart: a client
that took the first *content* for the first token, or counted chunks instead of ``usage``,
would measure something else than vLLM's client.

Plain asyncio streams and hand-written HTTP/1.1 (keep-alive, chunked): no framework overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import json


class FakeChatServer:
    def __init__(
        self,
        ttft_s: float = 0.0,
        itl_s: float = 0.0,
        served_models: tuple[str, ...] = ("fake-model",),
        error_every: int = 0,
        error_status: int = 429,
        prompt_tokens: int = 100,
        role_chunk: bool = False,
    ) -> None:
        self.ttft_s, self.itl_s = ttft_s, itl_s
        self.served_models = served_models
        self.error_every, self.error_status = error_every, error_status
        self.prompt_tokens = prompt_tokens
        self.role_chunk = role_chunk
        self.count = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                headers = dict(
                    (k.strip().lower(), v.strip())
                    for k, _, v in (line.partition(":") for line in header_lines if line)
                )
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                method, path, _ = request_line.split(" ", 2)
                if method == "POST" and path == "/v1/chat/completions":
                    await self.chat(json.loads(body), writer, headers.get("x-request-id"))
                elif path in ("/health", "/v1/models"):
                    data = {
                        "object": "list",
                        "data": [{"id": m, "object": "model"} for m in self.served_models],
                    }
                    self.respond(writer, 200, json.dumps(data).encode())
                else:
                    self.respond(writer, 404, b'{"error": {"message": "not found"}}')
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @staticmethod
    def respond(writer: asyncio.StreamWriter, status: int, payload: bytes, extra: str = "") -> None:
        writer.write(
            f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n{extra}"
            f"content-length: {len(payload)}\r\n\r\n".encode()
            + payload
        )

    async def chat(
        self, body: dict, writer: asyncio.StreamWriter, request_id: str | None = None
    ) -> None:
        self.count += 1
        n = self.count
        model = self.served_models[n % len(self.served_models)]
        served = f"x-served-model: {model}\r\n"
        if request_id is not None:  # echoed, as our server does: traces join across tiers
            served += f"x-request-id: {request_id}\r\n"
        if self.error_every and n % self.error_every == 0:
            error = {
                "error": {
                    "message": f"request {n} refused",
                    "type": "rate_limited",
                    "code": self.error_status,
                }
            }
            self.respond(writer, self.error_status, json.dumps(error).encode(), served)
            return
        tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            + served.encode()
            + b"transfer-encoding: chunked\r\n\r\n"
        )
        head = f'{{"id": "chatcmpl-{n}", "object": "chat.completion.chunk", "model": "{model}", '

        def event(payload: str) -> bytes:
            data = f"data: {payload}\n\n".encode()
            return b"%x\r\n%s\r\n" % (len(data), data)

        token = (
            head + '"choices": [{"index": 0, "delta": {"content": "tok"}, "finish_reason": null}]}'
        )
        last = token.replace('"finish_reason": null', '"finish_reason": "length"')
        if self.role_chunk:
            await asyncio.sleep(self.ttft_s)
            role = '{"role": "assistant", "content": ""}'
            writer.write(event(token.replace('{"content": "tok"}', role)))
        for i in range(tokens):
            delay = self.ttft_s if i == 0 and not self.role_chunk else self.itl_s
            if delay:
                await writer.drain()
                await asyncio.sleep(delay)
            writer.write(event(last if i == tokens - 1 else token))
        usage = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": tokens,
            "total_tokens": self.prompt_tokens + tokens,
        }
        writer.write(event(head + f'"choices": [], "usage": {json.dumps(usage)}}}'))
        writer.write(event("[DONE]") + b"0\r\n\r\n")


async def serve(server: FakeChatServer, host: str, port: int) -> None:
    listener = await asyncio.start_server(server.handle, host, port, backlog=4096)
    async with listener:
        await listener.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8900)
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    parser.add_argument("--itl-ms", type=float, default=0.0)
    parser.add_argument("--served-models", default="fake-model", help="comma-separated")
    parser.add_argument("--error-every", type=int, default=0)
    parser.add_argument("--error-status", type=int, default=429)
    parser.add_argument("--role-chunk", action="store_true", help="a role-only chunk first")
    args = parser.parse_args()
    server = FakeChatServer(
        args.ttft_ms / 1000,
        args.itl_ms / 1000,
        tuple(args.served_models.split(",")),
        args.error_every,
        args.error_status,
        role_chunk=args.role_chunk,
    )
    from bench.client import run_async

    run_async(serve(server, args.host, args.port))


if __name__ == "__main__":
    main()
