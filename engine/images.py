"""Image intake: fetch or decode, enforce limits, normalise, before the engine sees it.

Every check raises ``RequestError`` naming the problem. Order matters for safety: the
byte cap comes before decoding, the pixel cap is read from the header before any pixel
is decoded (decompression bombs), large JPEGs are decoded in draft mode at a reduced
scale, then EXIF orientation, RGB, and a downscale to ``max_short_side_px``.
"""

from __future__ import annotations

import asyncio
import binascii
import io
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pybase64
from blake3 import blake3
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from engine.config import ImageLimits
from engine.errors import RequestError
from engine.fetch import check_remote_url, fetch_image_bytes, too_many_bytes
from engine.protocol import ChatCompletionRequest

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never grey pixels
Image.MAX_IMAGE_PIXELS = None  # we enforce our own, configurable cap before decoding
# MPO: a JPEG with extra pictures appended (what many phone cameras write); its first frame
# is an ordinary JPEG.
_PARSERS = ("JPEG", "PNG", "WEBP")  # Pillow's JPEG parser also opens MPO
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,", re.I)


def data_url_payload(url: str, limits: ImageLimits, *, param: str) -> str:
    """The base64 payload of a ``data:<mime>;base64,...`` URL, its size checked (cheap)."""
    match = _DATA_URL.match(url)
    if not match:
        raise RequestError(
            "image data URL must look like 'data:image/png;base64,<data>'",
            code="invalid_image_url",
            param=param,
        )
    payload = url[match.end() :]
    # base64 inflates by 4/3: reject before decoding anything we would refuse anyway.
    if len(payload) * 3 // 4 > limits.max_image_bytes + 3:
        raise too_many_bytes(len(payload) * 3 // 4, limits, param)
    return payload


_URL_SAFE = str.maketrans("-_", "+/")
_WHITESPACE = re.compile(r"[ \t\r\n]+")


def decode_base64(payload: str, limits: ImageLimits, *, param: str) -> bytes:
    """Standard base64 on the fast path; also what encoders commonly emit instead:
    line-wrapped (MIME, 76 columns), URL-safe alphabet, padding left off."""
    try:
        data = pybase64.b64decode(payload, validate=True)  # SIMD: ~30x the stdlib's speed
    except (binascii.Error, ValueError):
        lenient = _WHITESPACE.sub("", payload).translate(_URL_SAFE)
        lenient += "=" * (-len(lenient) % 4)
        try:
            data = pybase64.b64decode(lenient, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(
                "image data URL is not valid base64", code="invalid_image_data", param=param
            ) from None
    if len(data) > limits.max_image_bytes:
        raise too_many_bytes(len(data), limits, param)
    return data


def decode_data_url(url: str, limits: ImageLimits, *, param: str) -> bytes:
    """Bytes of a ``data:<mime>;base64,...`` URL, with the byte cap checked first."""
    return decode_base64(data_url_payload(url, limits, param=param), limits, param=param)


def decode_image(data: bytes, limits: ImageLimits, *, param: str) -> Image.Image:
    """Decode, check and normalise one encoded image to an RGB ``PIL.Image``."""
    return normalize_image(open_image(data, limits, param=param), limits, param=param)


def open_image(data: bytes, limits: ImageLimits, *, param: str) -> Image.Image:
    """Read the header (no pixels yet) and check format and size."""
    if len(data) > limits.max_image_bytes:
        raise too_many_bytes(len(data), limits, param)
    try:
        # Only our formats' parsers see the bytes (none of PPM, XPM, SGI, DDS, ... headers).
        image = Image.open(io.BytesIO(data), formats=_PARSERS)  # the header only
        # All the bytes to the decoder in one call: Pillow feeds it 64 KiB at a time and
        # takes the GIL back between calls, each time waiting out the switch interval while
        # the event loop is busy. A 7 MB phone photo then decoded in 664 ms instead of 103
        # (BENCHMARKS.md, 2026-12-06; python -m bench.decode_gil).
        image.decodermaxblock = max(len(data), ImageFile.MAXBLOCK)
    except UnidentifiedImageError:
        other = _sniff(data)
        if other:
            raise RequestError(
                f"image format {other} is not supported; send JPEG, PNG or WebP",
                code="unsupported_image_format",
                param=param,
            ) from None
        raise RequestError(
            "image data is not a JPEG, PNG or WebP image", code="invalid_image_data", param=param
        ) from None
    except Exception as exc:  # noqa: BLE001 - any parser failure on untrusted bytes
        raise _corrupt(exc, param) from None
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise RequestError(
            f"image is {width}x{height} = {width * height} pixels; the limit is "
            f"{limits.max_image_pixels}",
            code="image_too_large",
            param=param,
        )
    if width < 1 or height < 1:
        raise RequestError("image has no pixels", code="invalid_image_data", param=param)
    if max(width, height) > limits.max_aspect_ratio * min(width, height):
        raise RequestError(
            f"image is {width}x{height}; its long side may be at most "
            f"{limits.max_aspect_ratio:g} times its short side",
            code="image_aspect_ratio",
            param=param,
        )
    return image


_MAGIC = [
    (b"GIF8", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"ftypheic", 4, "HEIC"),
    (b"ftypavif", 4, "AVIF"),
]


def _sniff(data: bytes) -> str | None:
    """The name of a common image format we do not serve, for a helpful error."""
    return next((name for magic, at, name in _MAGIC if data[at : at + len(magic)] == magic), None)


def _corrupt(exc: BaseException, param: str) -> RequestError:
    detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
    return RequestError(
        f"image data is corrupt or truncated ({detail})", code="invalid_image_data", param=param
    )


def normalize_image(image: Image.Image, limits: ImageLimits, *, param: str) -> Image.Image:
    """Decode the pixels of an opened image: upright (EXIF), RGB, both sides capped.
    Whatever the bytes make Pillow raise is the client's corrupt image, never a 500."""
    width, height = image.size
    try:
        if image.format in ("JPEG", "MPO"):
            # libjpeg decodes at 1/2, 1/4 or 1/8 scale in draft mode. Accept a draft a little
            # below the target (a 12 MP photo decodes at 1/4, not 1/2: 4x fewer pixels): the
            # model's processor resizes to multiples of its patch size anyway.
            image.draft("RGB", _target_size(width, height, limits, slack=0.9))
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        image = _to_rgb(image)
        target = _target_size(*image.size, limits)
        if target != image.size:
            image = image.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
    except Exception as exc:  # noqa: BLE001 - any decoder failure on untrusted bytes
        raise _corrupt(exc, param) from None
    return image


def _target_size(width: int, height: int, limits: ImageLimits, slack: float = 1.0):
    scale = min(
        1.0,
        slack * limits.max_short_side_px / min(width, height),
        slack * limits.max_long_side_px / max(width, height),
    )
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


async def build_conversation(
    request: ChatCompletionRequest,
    limits: ImageLimits,
    fetch_client,
    decoder: DecodePool,
    *,
    alone: bool = False,
) -> list[dict[str, Any]]:
    """The messages in vLLM's chat format, every image decoded, checked and normalised.

    ``fetch_client`` is a callable returning the shared ``httpx.AsyncClient`` (made lazily);
    ``decoder`` runs the decoding off the event loop; ``alone``: no other request is in
    flight (``load_image``).
    """
    n_images = sum(
        1
        for m in request.messages
        if isinstance(m.content, list)
        for p in m.content
        if p.type == "image_url"
    )
    if n_images > limits.max_images_per_request:
        raise RequestError(
            f"request has {n_images} images; at most {limits.max_images_per_request} are allowed",
            code="too_many_images",
            param="messages",
        )
    conversation = []
    for i, message in enumerate(request.messages):
        role = "system" if message.role == "developer" else message.role
        turn: dict[str, Any] = {"role": role}
        if message.tool_calls:
            turn["tool_calls"] = [call.model_dump() for call in message.tool_calls]
        if message.tool_call_id is not None:
            turn["tool_call_id"] = message.tool_call_id
        conversation.append(turn)
        if not isinstance(message.content, list):
            turn["content"] = message.content or ""
            continue
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(message.content):
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
            else:
                param = f"messages.{i}.content.{j}.image_url"
                if message.role != "user":  # as Qwen3-VL's chat template: user turns only
                    raise RequestError(
                        f"images are only allowed in user messages, not in a {message.role} "
                        "message",
                        code="image_not_in_user_message",
                        param=param,
                    )
                image, content_id = await load_image(
                    part.image_url.url, limits, param, fetch_client, decoder, alone=alone
                )
                parts.append({"type": "image_pil", "image_pil": image, "uuid": content_id})
        turn["content"] = parts
    return conversation


async def load_image(
    url: str,
    limits: ImageLimits,
    param: str,
    fetch_client,
    decoder: DecodePool,
    *,
    alone: bool = False,
) -> tuple[Image.Image, str]:
    """One image_url, from a data: URL or an allow-listed host, ready for the engine, with
    a content id (vLLM's multimodal cache key, so it need not hash the pixels). Small images
    with few bytes decode on the loop (well under a millisecond); the rest on the decode pool
    (small ones in its wide lane), so that no image decode pauses the token streams (a 336 px
    JPEG of noise, 68 KB, takes 1.1 ms: at c=32 those decodes were 13% of the loop's busy
    time). ``alone`` (no other request in flight, so no stream to pause): every small image
    decodes on the loop, saving the hop to a thread and back (~0.5 ms at c=1)."""
    from engine import metrics

    started = time.perf_counter()
    if url[:5].lower() == "data:":
        data = decode_data_url(url, limits, param=param)
    else:
        target = check_remote_url(url, limits, param=param)
        data = await fetch_image_bytes(target, limits, param=param, client=fetch_client())
    image = open_image(data, limits, param=param)
    width, height = image.size
    small = width * height <= limits.inline_decode_max_pixels
    if small and (alone or len(data) <= limits.inline_decode_max_bytes):
        result = _finish(image, data, limits, param)
    else:
        result = await decoder.run(_finish, image, data, limits, param, small=small)
    metrics.IMAGE_PREPROCESS.observe(time.perf_counter() - started)
    return result


def _finish(image: Image.Image, data: bytes, limits: ImageLimits, param: str):
    return normalize_image(image, limits, param=param), content_id(data, limits)


def content_id(data: bytes, limits: ImageLimits) -> str:
    """vLLM's multimodal cache key for an image: the bytes and the normalisation settings
    (same id, same pixels). BLAKE3, as vLLM's own hasher: a cryptographic hash, so no
    client can make another's image collide, at ~4 GB/s (blake2b took 10 ms of a decode
    thread per 7 MB phone photo)."""
    hasher = blake3(f"{limits.max_short_side_px}x{limits.max_long_side_px};".encode())
    hasher.update(data)
    return hasher.hexdigest(length=16)


class DecodePool:
    """Image decoding off the event loop, in two lanes of bounded width. Large images (more
    than ``ImageLimits.inline_decode_max_pixels``) take one of ``workers`` slots (default:
    one per core): a burst of phone photos then costs bounded CPU and memory (each running
    decode holds at most one full-size image) and never pauses the token streams on the
    loop. Small images (bytes over the inline cap, e.g. a 336 px JPEG of noise, 68 KB) take
    one of ``small_workers`` slots (default: four per core; at most 512x512 px each, so
    their memory is bounded by the lane's width): their CPU is a millisecond, but each waits
    for the GIL on its way in and out while the loop is busy, so a narrow lane queues a
    burst of them (at c=32 arrivals come in waves) for tens of milliseconds. Requests
    beyond a lane's width wait their turn in asyncio, where a deadline or a disconnect can
    still cancel them. A slot is freed when its thread finishes, not when its waiter gives
    up, so the bound also holds for work that can no longer be cancelled."""

    def __init__(self, workers: int = 0, small_workers: int = 0) -> None:
        self.workers = workers or _cores()
        self.small_workers = small_workers or 4 * _cores()
        self._pool = ThreadPoolExecutor(
            self.workers + self.small_workers, thread_name_prefix="image-decode"
        )
        self._slots: dict[asyncio.AbstractEventLoop, tuple[asyncio.Semaphore, ...]] = {}
        self.waiting = 0  # requests waiting for a slot

    async def run(self, fn, *args, small: bool = False):
        from engine import metrics

        loop = asyncio.get_running_loop()
        lanes = self._slots.get(loop) or self._slots.setdefault(
            loop, (asyncio.Semaphore(self.workers), asyncio.Semaphore(self.small_workers))
        )
        slots = lanes[small]
        self.waiting += 1
        metrics.IMAGE_DECODES_WAITING.set(self.waiting)
        try:
            await slots.acquire()
        finally:
            self.waiting -= 1
            metrics.IMAGE_DECODES_WAITING.set(self.waiting)
        future = self._pool.submit(fn, *args)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(slots.release))
        return await asyncio.wrap_future(future)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
