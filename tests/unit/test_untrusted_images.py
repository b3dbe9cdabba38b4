"""Hostile image URLs and image bytes: always a named 4xx, never a 500, never a wrong fetch."""

from __future__ import annotations

import asyncio
import http.server
import io
import random
import struct
import threading
import time
import zlib

import pytest
from PIL import Image

from engine import fetch
from engine.config import ImageLimits
from engine.errors import RequestError
from engine.images import build_conversation, decode_image
from engine.intake import parse_request
from tests.utils import encode, noise_image, png_header_only

LIMITS = ImageLimits(allowed_url_hosts=["cdn.shop.example"])


@pytest.mark.parametrize(
    "url",
    [
        "http://[",
        "http://[127.0.0.1]/",
        "https://cdn\uff20shop.example/a.png",
        "https://cdn.shop.example:abc/a.png",
        "https://cdn.shop.example:99999/",
        "https://cdn.shop\x00.example/a.png",
        "https://cdn.shop.example/a b.png",
        "https://" + "a" * 100 + ".example/a.png",
        "https://cdn.shop.example/" + "a" * 70_000,
        "ftp://cdn.shop.example/a.png",
        "file:///etc/passwd",
    ],
    ids=[
        "open-bracket",
        "ipv4-in-brackets",
        "fullwidth-at",
        "port-abc",
        "port-range",
        "control-char",
        "space",
        "label-too-long",
        "65k-chars",
        "ftp",
        "file",
    ],
)
def test_malformed_urls_are_invalid_image_url(url):
    with pytest.raises(RequestError) as info:
        fetch.check_remote_url(url, LIMITS, param="p")
    assert info.value.status_code == 400 and info.value.code == "invalid_image_url"


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example/a.png",
        "http://cdn.shop.example/a.png",
        "https://cdn.shop.example:8443/a.png",
        "https://user:pw@cdn.shop.example/a.png",
    ],
    ids=["host", "plain-http", "port", "credentials"],
)
def test_allow_list_covers_host_scheme_port(url):
    with pytest.raises(RequestError) as info:
        fetch.check_remote_url(url, LIMITS, param="p")
    assert info.value.status_code == 400
    assert info.value.code in ("image_host_not_allowed", "invalid_image_url")


def test_allow_listed_https_url_passes_case_insensitively():
    limits = ImageLimits(allowed_url_hosts=["CDN.shop.example"])
    target = fetch.check_remote_url("https://cdn.shop.example/a.jpg", limits, param="p")
    assert (target.scheme, target.host, target.port) == ("https", "cdn.shop.example", 443)


def test_a_name_resolving_to_loopback_is_refused_unless_the_profile_allows_it():
    limits = ImageLimits(allowed_url_hosts=["localhost"])
    target = fetch.check_remote_url("https://localhost/a.png", limits, param="p")
    with pytest.raises(RequestError) as info:
        asyncio.run(fetch.resolve(target, limits, param="p"))
    assert info.value.code == "image_host_not_allowed" and "non-public" in info.value.message
    allowed = limits.model_copy(update={"allow_private_addresses": True})
    assert asyncio.run(fetch.resolve(target, allowed, param="p")) == target


@pytest.mark.parametrize(
    "address",
    [
        "10.0.0.7",
        "169.254.169.254",
        "::ffff:127.0.0.1",
        "fd00::1",
        "64:ff9b::a00:1",
        "2002:a00:1::",
        "::10.0.0.1",
        "2001:0:4136:e378:8000:63bf:f5ff:fffe",
        "0.0.0.0",
    ],
    ids=[
        "private",
        "metadata",
        "mapped",
        "ula",
        "nat64",
        "6to4",
        "ipv4-compatible",
        "teredo",
        "unspecified",
    ],
)
def test_private_addresses_are_not_public_however_spelled(address):
    assert not fetch._public(address)


@pytest.mark.parametrize("address", ["93.184.215.14", "2606:4700::1111", "64:ff9b::808:808"])
def test_public_addresses_are(address):
    assert fetch._public(address)


def test_the_fetch_connects_to_the_checked_address_under_the_urls_name(monkeypatch):
    async def public(host, port):
        return [(2, 1, 6, "", ("93.184.215.14", port))]

    monkeypatch.setattr(fetch, "_getaddrinfo", public)
    target = fetch.check_remote_url("https://cdn.shop.example/p/a.jpg?v=2", LIMITS, param="p")
    pinned = asyncio.run(fetch.resolve(target, LIMITS, param="p"))
    url, headers, extensions = fetch.request_for(pinned)
    assert url == "https://93.184.215.14:443/p/a.jpg?v=2"
    assert headers == {"Host": "cdn.shop.example"}
    assert extensions == {"sni_hostname": "cdn.shop.example"}  # TLS verifies the name


class _Host(http.server.ThreadingHTTPServer):
    """Serves a PNG with a cookie, slowly if asked; records the headers it was sent."""

    def __init__(self, payload: bytes, byte_delay_s: float = 0.0) -> None:
        self.seen: list[dict[str, str]] = []
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                host.seen.append(dict(self.headers))
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("Set-Cookie", "session=secret; Path=/")
                self.end_headers()
                for i in range(len(payload)):
                    if byte_delay_s:
                        time.sleep(byte_delay_s)
                    self.wfile.write(payload[i : i + 1])
                    self.wfile.flush()

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def _local_limits(port: int, **extra) -> ImageLimits:
    return ImageLimits(
        allowed_url_hosts=["127.0.0.1"],
        allowed_url_schemes=["http"],
        allowed_url_ports=[port],
        allow_private_addresses=True,
        **extra,
    )


def test_fetch_keeps_no_cookies_and_ignores_proxy_variables(monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # would fail every fetch if read
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    png = encode(noise_image(8, 8))
    host = _Host(png)
    limits = _local_limits(host.server_port)
    url = f"http://127.0.0.1:{host.server_port}/a.png"

    async def twice() -> list[bytes]:
        client = fetch.fetch_client()
        target = fetch.check_remote_url(url, limits, param="p")
        got = [
            await fetch.fetch_image_bytes(target, limits, param="p", client=client)
            for _ in range(2)
        ]
        await client.aclose()
        return got

    assert asyncio.run(twice()) == [png, png]
    assert all("Cookie" not in seen for seen in host.seen)
    host.shutdown()


def test_one_total_timeout_covers_a_host_that_trickles_bytes():
    host = _Host(b"x" * 100, byte_delay_s=0.1)  # 10 s in all, each byte well within any phase
    limits = _local_limits(host.server_port, fetch_timeout_s=0.5)
    target = fetch.check_remote_url(f"http://127.0.0.1:{host.server_port}/", limits, param="p")

    async def attempt() -> None:
        client = fetch.fetch_client()
        try:
            await fetch.fetch_image_bytes(target, limits, param="p", client=client)
        finally:
            await client.aclose()

    started = time.monotonic()
    with pytest.raises(RequestError) as info:
        asyncio.run(attempt())
    assert info.value.code == "image_fetch_timeout"
    assert time.monotonic() - started < 2.0
    host.shutdown()


# -- image bytes ---------------------------------------------------------------------------


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _with_chunk(png: bytes, chunk: bytes) -> bytes:
    return png[:33] + chunk + png[33:]  # after the IHDR


def _palette_png_with_long_transparency() -> bytes:
    buffer = io.BytesIO()
    Image.new("P", (4, 4)).save(buffer, "PNG")  # a 256-colour palette by default
    png = buffer.getvalue()
    at = png.index(b"IDAT") - 4
    return png[:at] + _chunk(b"tRNS", b"\x00" * 300) + png[at:]


CRAFTED = {
    "ppm-header": b"P6\n10 10\n255\n" + b"\x00" * 300,
    "xpm-header": b"/* XPM */\nstatic char *x[] = {\n",
    "sgi-header": b"\x01\xda" + b"\x00" * 600,
    "dds-header": b"DDS |" + b"\x00" * 200,
    "ftex-header": b"FTEX" + b"\x00" * 200,
    "truncated-jpeg-header": encode(noise_image(64, 64), "JPEG")[:40],
    "truncated-png": encode(noise_image(64, 64))[:200],
    "corrupt-webp": encode(noise_image(64, 64), "WEBP")[:30] + b"\xff" * 200,
    "ztxt-bomb": _with_chunk(
        encode(noise_image(8, 8)), _chunk(b"zTXt", b"k\x00\x00" + zlib.compress(b"a" * 20_000_000))
    ),
    "iccp-bomb": _with_chunk(
        encode(noise_image(8, 8)), _chunk(b"iCCP", b"p\x00\x00" + zlib.compress(b"a" * 20_000_000))
    ),
    "palette-trns-longer-than-palette": _palette_png_with_long_transparency(),
    "garbage-exif": encode(
        noise_image(16, 16), "JPEG", exif=b"Exif\x00\x00MM\x00*\xff\xff\xff\xff"
    ),
}


@pytest.mark.parametrize("name", list(CRAFTED))
def test_crafted_image_bytes_are_a_400_or_a_clean_image(name):
    try:
        image = decode_image(CRAFTED[name], ImageLimits(), param="p")
    except RequestError as error:
        assert error.status_code == 400, error.message
        assert error.code in ("invalid_image_data", "unsupported_image_format"), error.code
    else:
        assert image.mode == "RGB" and min(image.size) >= 1


def test_random_mutations_of_valid_images_never_escape_as_other_errors():
    """600 seeded mutations (bit flips, truncations, spliced junk) of JPEG, PNG and WebP."""
    rng = random.Random(12)
    sources = [encode(noise_image(48, 32, seed=3), kind) for kind in ("JPEG", "PNG", "WEBP")]
    outcomes = {"ok": 0, "refused": 0}
    for i in range(600):
        data = bytearray(sources[i % 3])
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(len(data))
            kind = rng.random()
            if kind < 0.6:
                data[at] ^= 1 << rng.randrange(8)
            elif kind < 0.8:
                del data[at:]
                data += b"\x00"
            else:
                data[at:at] = rng.randbytes(rng.randint(1, 16))
        try:
            decode_image(bytes(data), ImageLimits(), param="p")
            outcomes["ok"] += 1
        except RequestError as error:
            assert error.status_code in (400, 413)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 50, outcomes  # the mutations do hit the error paths


def test_aspect_ratio_is_refused_from_the_header():
    with pytest.raises(RequestError) as info:
        decode_image(png_header_only(30_000, 100), ImageLimits(), param="p")
    assert info.value.code == "image_aspect_ratio" and "200" in info.value.message


def test_the_long_side_is_capped_too():
    limits = ImageLimits(max_short_side_px=768, max_long_side_px=1000)
    image = decode_image(encode(noise_image(300, 2000, seed=4)), limits, param="p")
    assert image.size == (150, 1000)


def test_gif_is_still_named():
    with pytest.raises(RequestError) as info:
        decode_image(encode(noise_image(8, 8).convert("P"), "GIF"), ImageLimits(), param="p")
    assert info.value.code == "unsupported_image_format" and "GIF" in info.value.message


@pytest.mark.parametrize("role", ["system", "developer", "assistant"])
def test_an_image_outside_a_user_message_is_a_400_before_any_decoding(role):
    url = "data:image/png;base64,AAAA"  # never decoded: the role is checked first
    body = {
        "model": "m",
        "messages": [
            {"role": role, "content": [{"type": "image_url", "image_url": {"url": url}}]},
            {"role": "user", "content": "hi"},
        ],
    }
    import json

    request = parse_request(json.dumps(body).encode())
    with pytest.raises(RequestError) as info:
        asyncio.run(build_conversation(request, ImageLimits(), None, None))
    assert info.value.code == "image_not_in_user_message"
    assert info.value.param == "messages.0.content.0.image_url"
