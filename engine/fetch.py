"""Image URLs: the allow-list, where a name resolves, and one bounded fetch.

A URL is fetched only if its scheme, host and port are allow-listed and (unless the
profile allows private addresses) every address its host resolves to is public; the
connection then goes to the address that was checked, so a second DNS answer cannot
point it inside the cluster. The client keeps no cookies, reads no proxy variables or
``.netrc``, follows no redirects; one total timeout covers connect, headers and body.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from engine.config import ImageLimits
from engine.errors import RequestError

_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class Target:
    """A checked image URL: where to connect, and what to ask for there."""

    url: str  # as given
    scheme: str
    host: str  # lower-case name or address, as in the URL
    port: int
    connect_to: str | None = None  # the checked address (None: connect by name)


def fetch_client():
    """An HTTP client for users' image URLs: nothing of one request reaches another."""
    import httpx

    no_cookies = http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    # No kept-alive connections: a pinned connection is keyed by address, and a TLS session
    # checked for one allow-listed name must not serve another name on the same address.
    return httpx.AsyncClient(
        follow_redirects=False,
        trust_env=False,
        cookies=no_cookies,
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=0),
    )


def check_remote_url(url: str, limits: ImageLimits, *, param: str) -> Target:
    """Parse an image URL and check it against the allow-list, without resolving it."""
    if len(url) > limits.max_url_chars:
        raise _bad_url(
            f"image URL is {len(url)} characters; the limit is {limits.max_url_chars}", param
        )
    if not url.isprintable() or any(c.isspace() for c in url):
        raise _bad_url("image URL holds control or space characters", param)
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
        if host:
            host.encode("idna")  # refuses names no DNS could carry (labels over 63, ...)
    except (ValueError, UnicodeError):
        raise _bad_url("image URL is malformed", param) from None
    if parts.scheme not in ("http", "https") or not host:
        raise _bad_url("image_url must be a data: URL or an http(s) URL", param)
    if parts.username is not None or parts.password is not None:
        raise _bad_url("image URL must not carry credentials", param)
    if host not in limits.allowed_url_hosts:
        raise _not_allowed(
            f"image host {host!r} is not allow-listed; send the image as a data: URL", param
        )
    if parts.scheme not in limits.allowed_url_schemes:
        raise _not_allowed(f"image URLs must use {' or '.join(limits.allowed_url_schemes)}", param)
    port = _DEFAULT_PORTS[parts.scheme] if port is None else port
    allowed_ports = limits.allowed_url_ports or [_DEFAULT_PORTS[parts.scheme]]
    if port not in allowed_ports:
        raise _not_allowed(f"image URL port {port} is not allowed", param)
    return Target(url, parts.scheme, host, port)


async def resolve(target: Target, limits: ImageLimits, *, param: str) -> Target:
    """The target pinned to a checked public address (or as is, if private ones are allowed)."""
    if limits.allow_private_addresses:
        return target
    try:
        infos = await _getaddrinfo(target.host, target.port)
    except (OSError, UnicodeError):
        raise RequestError(
            f"image host {target.host!r} does not resolve", code="image_fetch_failed", param=param
        ) from None
    addresses = [info[4][0] for info in infos]
    if not addresses or not all(_public(a) for a in addresses):
        raise _not_allowed(f"image host {target.host!r} resolves to a non-public address", param)
    return Target(target.url, target.scheme, target.host, target.port, addresses[0])


async def _getaddrinfo(host: str, port: int):
    return await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)


_NAT64 = [ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48")]
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def _public(address: str) -> bool:
    """Globally routable, and so is any IPv4 address an IPv6 one carries (mapped, 6to4,
    Teredo, NAT64, IPv4-compatible): DNS64 must not lead to 10.0.0.0/8."""
    ip = ipaddress.ip_address(address.split("%")[0])
    addresses = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = [ip.ipv4_mapped, ip.sixtofour, ip.teredo[1] if ip.teredo else None]
        if any(ip in net for net in _NAT64) or ip in _IPV4_COMPATIBLE:
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        addresses += [a for a in embedded if a is not None]
    return all(a.is_global and not a.is_multicast for a in addresses)


def request_for(target: Target) -> tuple[str, dict[str, str], dict[str, str]]:
    """URL, headers and httpx extensions that reach the checked address under the URL's name
    (Host header, and the TLS server name that the certificate is verified against)."""
    if target.connect_to is None:
        return target.url, {}, {}
    parts = urlsplit(target.url)
    ip = ipaddress.ip_address(target.connect_to.split("%")[0])
    address = f"[{ip}]" if ip.version == 6 else str(ip)
    pinned = SplitResult(parts.scheme, f"{address}:{target.port}", parts.path, parts.query, "")
    default = target.port == _DEFAULT_PORTS[target.scheme]
    host_header = target.host if default else f"{target.host}:{target.port}"
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    return pinned.geturl(), {"Host": host_header}, extensions


async def fetch_image_bytes(target: Target, limits: ImageLimits, *, param: str, client) -> bytes:
    """Resolve (and check) and GET an image URL: one total timeout, a streaming byte cap."""
    import httpx

    try:
        async with asyncio.timeout(limits.fetch_timeout_s):
            url, headers, extensions = request_for(await resolve(target, limits, param=param))
            async with client.stream(
                "GET", url, headers=headers, extensions=extensions, timeout=limits.fetch_timeout_s
            ) as response:
                if response.status_code != 200:
                    raise RequestError(
                        f"fetching the image returned HTTP {response.status_code}",
                        code="image_fetch_failed",
                        param=param,
                    )
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > limits.max_image_bytes:
                        raise too_many_bytes(size, limits, param)
                    chunks.append(chunk)
                return b"".join(chunks)
    except (TimeoutError, httpx.TimeoutException):
        raise RequestError(
            f"fetching the image took longer than {limits.fetch_timeout_s:g}s",
            code="image_fetch_timeout",
            param=param,
        ) from None
    except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError, UnicodeError) as exc:
        raise RequestError(
            f"fetching the image failed ({type(exc).__name__})",
            code="image_fetch_failed",
            param=param,
        ) from None


def too_many_bytes(size: int, limits: ImageLimits, param: str) -> RequestError:
    return RequestError(
        f"image is {size} bytes; the limit is {limits.max_image_bytes} bytes",
        status_code=413,
        code="image_too_large",
        param=param,
    )


def _bad_url(message: str, param: str) -> RequestError:
    return RequestError(message, code="invalid_image_url", param=param)


def _not_allowed(message: str, param: str) -> RequestError:
    return RequestError(message, code="image_host_not_allowed", param=param)
