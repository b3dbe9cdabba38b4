"""Image decoding in a thread while another thread holds the GIL (a busy event loop): the
cost of Pillow feeding its decoder 64 KiB at a time, against the whole file in one call
(what ``engine.images.open_image`` sets), and of the request-body steps on the loop.

    python -m bench.decode_gil            # BENCHMARKS.md, "Images and the GIL"

Noise JPEGs as vLLM's benchmark client makes them (i.i.d. pixels: the worst case for
entropy decoding). No server, no engine: runs in seconds.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import io
import json
import threading
import time

import msgspec
import numpy as np
from blake3 import blake3
from PIL import Image

from engine.config import ImageLimits
from engine.images import content_id


def noise_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


def decode(data: bytes, target: tuple[int, int], whole: bool) -> None:
    image = Image.open(io.BytesIO(data))
    if whole:
        image.decodermaxblock = max(len(data), image.decodermaxblock)
    image.draft("RGB", target)
    image.load()


def best_ms(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - started) * 1000 / repeat)
    return best


class BusyLoop:
    """A thread of pure Python: holds the GIL but for the switch interval."""

    def __enter__(self) -> BusyLoop:
        self._running = True
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()
        return self

    def _spin(self) -> None:
        while self._running:
            pass

    def __exit__(self, *exc) -> None:
        self._running = False
        self._thread.join()


def main() -> None:
    phone, small = noise_jpeg(4032, 3024), noise_jpeg(336, 336)
    print("| image | loop | 64 KiB pieces (Pillow's default) | whole file in one call |")
    print("|---|---|---|---|")
    for name, data, target, repeat in (
        ("4032x3024 noise JPEG", phone, (922, 691), 2),
        ("336x336 noise JPEG", small, (336, 336), 50),
    ):
        for busy in (False, True):
            row = []
            for whole in (False, True):
                step = functools.partial(decode, data, target, whole)
                with BusyLoop() if busy else contextlib.nullcontext():
                    row.append(best_ms(step, repeat))
            loop = "busy" if busy else "idle"
            print(
                f"| {name} ({len(data) // 1000} KB) | {loop} | {row[0]:.1f} ms | {row[1]:.1f} ms |"
            )
    payload = base64.b64encode(phone).decode()
    body = json.dumps({"messages": [{"content": [{"url": "data:image/jpeg;base64," + payload}]}]})
    raw = body.encode()
    limits = ImageLimits()
    print()
    print(f"| step, {len(raw) / 1e6:.1f} MB body of one phone photo | ms |")
    print("|---|---|")
    steps = {
        "stdlib: bytes.decode + json.loads": lambda: json.loads(raw.decode("utf-8")),
        "msgspec.json.decode (bytes)": lambda: msgspec.json.decode(raw),
        "blake2b of the JPEG (before)": lambda: hashlib.blake2b(phone, digest_size=16).digest(),
        "BLAKE3 of the JPEG (content_id)": lambda: content_id(phone, limits),
        "BLAKE3 alone": lambda: blake3(phone).digest(),
    }
    for step, fn in steps.items():
        print(f"| {step} | {best_ms(fn, 5):.1f} |")


if __name__ == "__main__":
    main()
