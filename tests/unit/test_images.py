"""Image intake limits and normalisation, without a server."""

from __future__ import annotations

import asyncio
import base64

import pytest
from PIL import Image

from engine.config import ImageLimits
from engine.errors import RequestError
from engine.fetch import check_remote_url
from engine.images import content_id, decode_data_url, decode_image, load_image, open_image
from tests.utils import data_url, encode, noise_image, png_header_only

LIMITS = ImageLimits()


def test_large_jpeg_is_downscaled_to_the_short_side_cap():
    photo = encode(noise_image(4032, 3024, seed=2), "JPEG", quality=85)  # phone photo
    image = decode_image(photo, LIMITS, param="p")
    assert image.mode == "RGB"
    # libjpeg's draft mode decodes it at 1/4 scale: up to 10% under the cap, never over it
    assert image.size == (1008, 756)


def test_small_image_keeps_its_size():
    image = decode_image(encode(noise_image(300, 200)), LIMITS, param="p")
    assert image.size == (300, 200)


def test_exif_orientation_is_applied():
    base = Image.new("RGB", (60, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = encode(base, "JPEG", exif=exif.tobytes())
    image = decode_image(data, LIMITS, param="p")
    assert image.size == (20, 60)


def test_transparent_png_is_composited_on_white():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    image = decode_image(encode(rgba), LIMITS, param="p")
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)


def test_webp_is_accepted():
    image = decode_image(encode(noise_image(64, 48), "WEBP"), LIMITS, param="p")
    assert image.size == (64, 48)


def test_gif_is_rejected_by_format():
    with pytest.raises(RequestError) as info:
        decode_image(encode(noise_image(8, 8).convert("P"), "GIF"), LIMITS, param="p")
    assert info.value.code == "unsupported_image_format" and "GIF" in info.value.message


def test_pixel_cap_is_checked_from_the_header():
    with pytest.raises(RequestError) as info:
        decode_image(png_header_only(20000, 20000), LIMITS, param="messages.0")
    assert info.value.code == "image_too_large"
    assert info.value.param == "messages.0"


def test_byte_cap_applies_before_base64_decoding():
    limits = ImageLimits(max_image_bytes=1000)
    url = "data:image/png;base64," + base64.b64encode(b"x" * 5000).decode()
    with pytest.raises(RequestError) as info:
        decode_data_url(url, limits, param="p")
    assert info.value.status_code == 413 and "limit is 1000 bytes" in info.value.message


def test_truncated_png_is_rejected():
    data = encode(noise_image(128, 128))
    with pytest.raises(RequestError) as info:
        decode_image(data[: len(data) // 3], LIMITS, param="p")
    assert info.value.code == "invalid_image_data"


@pytest.mark.parametrize(
    "url, code",
    [
        ("ftp://example.com/a.png", "invalid_image_url"),
        ("https://evil.example/a.png", "image_host_not_allowed"),
        ("file:///etc/passwd", "invalid_image_url"),
    ],
)
def test_remote_urls_need_an_allow_listed_http_host(url, code):
    with pytest.raises(RequestError) as info:
        check_remote_url(url, ImageLimits(allowed_url_hosts=["cdn.shop.example"]), param="p")
    assert info.value.code == code


def test_allow_listed_host_passes():
    limits = ImageLimits(allowed_url_hosts=["CDN.shop.example"])
    assert check_remote_url("https://cdn.shop.example/a.jpg", limits, param="p")


@pytest.mark.parametrize(
    "spell",
    [
        lambda b64: b64,
        lambda b64: "\r\n".join(b64[i : i + 76] for i in range(0, len(b64), 76)),  # MIME
        lambda b64: b64.replace("+", "-").replace("/", "_"),  # URL-safe alphabet
        lambda b64: b64.rstrip("="),  # padding left off
    ],
    ids=["standard", "line-wrapped", "url-safe", "unpadded"],
)
@pytest.mark.parametrize("scheme", ["data:", "DATA:"])
def test_common_base64_spellings_and_scheme_case_are_accepted(spell, scheme):
    png = encode(noise_image(64, 48, seed=5))
    b64 = base64.b64encode(png).decode()
    assert "+" in b64 or "/" in b64  # the alphabet difference is exercised
    url = f"{scheme}image/png;base64,{spell(b64)}"
    assert decode_data_url(url, LIMITS, param="p") == png


def test_base64_that_is_not_base64_in_any_spelling_is_a_400():
    with pytest.raises(RequestError) as err:
        decode_data_url("data:image/png;base64,@@not*base64@@", LIMITS, param="p")
    assert err.value.code == "invalid_image_data"


def test_mpo_jpeg_from_a_phone_camera_is_accepted():
    import io

    first, second = noise_image(320, 240, seed=6), noise_image(320, 240, seed=7)
    buffer = io.BytesIO()
    first.save(buffer, "MPO", save_all=True, append_images=[second], quality=90)
    assert Image.open(io.BytesIO(buffer.getvalue())).format == "MPO"
    image = decode_image(buffer.getvalue(), LIMITS, param="p")
    assert image.size == (320, 240) and image.mode == "RGB"


class _CountingPool:
    """Stands in for the decode pool: runs the work at once and counts it."""

    def __init__(self) -> None:
        self.runs: list[bool] = []  # small or not, per run

    async def run(self, fn, *args, small: bool = False):
        self.runs.append(small)
        return fn(*args)


@pytest.mark.parametrize(
    "image, alone, lanes",
    [
        (Image.new("RGB", (336, 336), "orange"), False, []),  # small and cheap: inline
        (noise_image(336, 336, seed=1), False, [True]),  # few pixels, many bytes: small lane
        (Image.new("RGB", (1024, 768), "orange"), False, [False]),  # many pixels: one per core
        # No other request in flight (no stream to pause): every small image inline ...
        (noise_image(336, 336, seed=1), True, []),
        # ... but never a large one: a new request may come while it decodes.
        (Image.new("RGB", (1024, 768), "orange"), True, [False]),
    ],
)
def test_only_small_cheap_images_decode_on_the_event_loop(image, alone, lanes):
    data = encode(image, "JPEG")
    pool = _CountingPool()
    url = data_url(data, "image/jpeg")
    decoded, _ = asyncio.run(load_image(url, LIMITS, "image", lambda: None, pool, alone=alone))
    assert pool.runs == lanes, f"{len(data)} bytes, {image.size}"
    assert decoded.mode == "RGB"


def test_each_decode_lane_runs_at_most_its_width_at_once():
    """Large images: one per slot of the narrow lane (bounded CPU and memory); small ones
    in their own wider lane, so a burst of them does not queue behind a phone photo."""
    import threading
    import time

    from engine.images import DecodePool

    pool = DecodePool(workers=2, small_workers=3)
    running = {False: 0, True: 0}
    most = {False: 0, True: 0}
    lock = threading.Lock()

    def work(small: bool) -> None:
        with lock:
            running[small] += 1
            most[small] = max(most[small], running[small])
        time.sleep(0.02)
        with lock:
            running[small] -= 1

    async def burst() -> None:
        jobs = [pool.run(work, small, small=small) for small in [False] * 6 + [True] * 9]
        await asyncio.gather(*jobs)

    asyncio.run(burst())
    assert most == {False: 2, True: 3}
    assert pool.waiting == 0


def test_the_cache_key_of_an_image_follows_its_bytes_and_the_normalisation():
    """vLLM reuses processed pixels by this id: another image, or the same bytes normalised
    to another size, must never share one."""
    data = encode(noise_image(64, 48, seed=2), "JPEG")
    other = encode(noise_image(64, 48, seed=3), "JPEG")
    smaller = ImageLimits(max_short_side_px=LIMITS.max_short_side_px // 2)
    shorter = ImageLimits(max_long_side_px=LIMITS.max_long_side_px // 2)
    ids = {content_id(d, lim) for d, lim in ((data, LIMITS), (other, LIMITS), (data, smaller))}
    ids.add(content_id(data, shorter))
    assert len(ids) == 4
    assert content_id(data, LIMITS) == content_id(bytes(data), ImageLimits())
    assert len(content_id(data, LIMITS)) == 32  # 128 bits, hex


def test_an_image_goes_to_its_decoder_in_one_piece():
    """Pillow feeds a decoder 64 KiB at a time and takes the GIL back between pieces; with
    the event loop busy each piece waited out the switch interval (a phone photo 7x slower)."""
    data = encode(noise_image(640, 480, seed=4), "JPEG")
    assert len(data) > 65536
    image = open_image(data, LIMITS, param="image")
    assert image.decodermaxblock >= len(data)
    assert decode_image(data, LIMITS, param="image").size == (640, 480)
