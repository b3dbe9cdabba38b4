"""Test helpers: a live server started through the real CLI, and image builders."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

from PIL import Image

from bench.launch import ServerProcess, engine_command
from engine.config import AppConfig


class LiveServer(ServerProcess):
    """``python -m engine serve`` in a subprocess: polls /health, fails fast if it dies.

    The server runs at niceness 5. vLLM's CPU engine busy-waits on both cores of a CI machine
    while it generates; a test client at the same priority can then wait seconds for a CPU,
    and its hang-ups, timeouts and metric reads would happen late. With the priority lowered
    the client acts when the test says; the server still gets every cycle the client leaves.
    """

    def __init__(self, config_path: Path, port: int, log_path: Path, timeout_s: float = 900):
        super().__init__(
            ["nice", "-n", "5", *engine_command(config_path)],
            f"http://127.0.0.1:{port}",
            log_path,
            timeout_s=timeout_s,
            # replica log lines forwarded to the server's output, as a user sees them
            env={"QWEN3VL_RAY_LOGS": "1"},
        )


def encode(image: Image.Image, fmt: str = "PNG", **save_kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **save_kwargs)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def noise_image(width: int = 336, height: int = 336, seed: int = 0) -> Image.Image:
    import random

    rng = random.Random(seed)
    return Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG claiming ``width`` x ``height`` with one tiny IDAT: a decompression bomb's
    header, built without allocating its pixels."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + chunk(b"IEND", b"")
    )


def image_message(url: str, text: str = "Describe the product in this picture.") -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": text},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }
    ]


def two_tier_config(seqs: tuple[int, int], queued: tuple[int, int], **sections) -> AppConfig:
    """A profile of a primary ``big`` and its fallback ``small`` (nothing started): running
    slots and queue bounds per tier, plus any other sections (``admission=...``)."""
    models = [
        {"name": name, "model": name, "engine_kwargs": {"max_num_seqs": n},
         "saturation": {"max_queued_requests": q}}
        for name, n, q in zip(("big", "small"), seqs, queued, strict=True)
    ]  # fmt: skip
    routing = {"primary": "big", "fallbacks": ["small"]}
    return AppConfig.model_validate({"models": models, "routing": routing, **sections})
