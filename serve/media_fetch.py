"""Media named by URL in a chat request: data: URLs are already bytes; http(s) URLs of allowed hosts are
fetched here.

A fetch goes only to an allowed port (80 and 443 unless configured). The host name is resolved once and
every address it gives is checked: loopback, private, link-local, multicast, reserved and other
non-global ranges (IPv4 and IPv6, IPv4-mapped included) are refused unless
``allow_private_media_addresses``. The connection then goes to the checked address, with the name in the
``Host`` header and as TLS SNI (the certificate is checked against the name), so a DNS answer that
changes between check and connect cannot move it. No redirects, no proxy from the environment. All of a
request's fetches share one byte budget (what the upload limit leaves after the body) and one deadline
(``media_fetch_timeout_s`` from the first byte asked to the last byte read), so a slow source cannot
hold a worker.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket

import httpx

from encoders.limits import human_size
from serve.chat import MediaRef
from serve.protocol import APIError, ServerConfig, bad_request, check_media_type

DEFAULT_PORTS = {"http": 80, "https": 443}


def blocked_reason(address: str) -> str | None:
    """Why a fetch may not connect to ``address`` (an IP), or None for a public address."""
    ip = ipaddress.ip_address(address.split("%")[0])  # no IPv6 scope id
    if ip.version == 6 and (ip.ipv4_mapped or ip.sixtofour):  # ::ffff:a.b.c.d, 2002:AABB:CCDD::: a.b.c.d
        ip = ip.ipv4_mapped or ip.sixtofour
    checks = (("loopback", ip.is_loopback), ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
              ("unspecified", ip.is_unspecified), ("reserved", ip.is_reserved), ("private", ip.is_private),
              ("not globally routable", not ip.is_global))
    return next((name for name, hit in checks if hit), None)


async def resolve(host: str, port: int) -> list[str]:
    """The addresses of ``host``, once (an IP literal is itself)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


class _Budget:
    def __init__(self, num_bytes: int, limit: int):
        self.left, self.limit = num_bytes, limit

    def take(self, num_bytes: int) -> None:
        self.left -= num_bytes
        if self.left < 0:
            raise APIError(413, f"the media fetched for this request are over the {human_size(self.limit)} upload "
                                "limit (the request body counts too)", "payload_too_large")


async def _checked_address(url: httpx.URL, kind: str, config: ServerConfig) -> str:
    port = url.port or DEFAULT_PORTS[url.scheme]
    if port not in config.allowed_media_ports:
        raise bad_request(f"this server fetches media only from ports {list(config.allowed_media_ports)}, not "
                          f"{port}; send the {kind} inline as a data: URL", "remote_media_refused")
    try:
        addresses = await resolve(url.host, port)
    except (OSError, UnicodeError):
        raise bad_request(f"could not resolve the host {url.host!r} of the {kind} URL", "media_fetch_failed") from None
    for address in addresses:
        reason = blocked_reason(address)
        if reason is not None and not config.allow_private_media_addresses:
            raise bad_request(f"{url.host!r} resolves to a {reason} address ({address}); this server fetches media "
                              f"only from public addresses; send the {kind} inline as a data: URL",
                              "remote_media_refused")
    if not addresses:
        raise bad_request(f"the host {url.host!r} of the {kind} URL has no address", "media_fetch_failed")
    return addresses[0]


async def fetch(url: str, kind: str, config: ServerConfig, budget: _Budget) -> bytes:
    try:
        target = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise bad_request(f"the {kind} URL is malformed: {exc}", "bad_media") from None
    address = await _checked_address(target, kind, config)
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    try:
        async with httpx.AsyncClient(timeout=config.media_fetch_timeout_s, follow_redirects=False,
                                     trust_env=False) as client:
            async with client.stream("GET", target.copy_with(host=address), extensions=extensions,
                                     headers={"Host": target.netloc.decode("ascii")}) as response:
                if response.is_redirect:
                    raise bad_request(f"the {kind} at {url!r} redirects (HTTP {response.status_code}); this server "
                                      "does not follow redirects: give the final URL", "media_fetch_failed")
                if response.status_code != 200:
                    raise bad_request(f"fetching the {kind} at {url!r} gave HTTP {response.status_code}",
                                      "media_fetch_failed")
                check_media_type(response.headers.get("content-type", ""), kind)
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > budget.left:
                    budget.take(int(declared))
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    budget.take(len(chunk))
                    data += chunk
                return bytes(data)
    except httpx.HTTPError as exc:
        raise bad_request(f"could not fetch the {kind} at {url!r}: {exc}", "media_fetch_failed") from None


async def resolve_media(refs: list[MediaRef], config: ServerConfig, budget_bytes: int | None = None,
                        kinds: tuple[str, ...] = ("image", "video")) -> tuple[list[bytes], ...]:
    """One list of bytes per kind in ``kinds`` (default: images, videos), in order; fetched items share
    ``budget_bytes`` (default: the upload limit) and one deadline."""
    budget = _Budget(config.max_upload_bytes if budget_bytes is None else budget_bytes, config.max_upload_bytes)

    async def fetch_all():
        return [ref.data if ref.data is not None else await fetch(ref.url, ref.kind, config, budget) for ref in refs]

    if all(ref.data is not None for ref in refs):
        datas = [ref.data for ref in refs]
    else:
        try:
            datas = await asyncio.wait_for(fetch_all(), config.media_fetch_timeout_s)
        except asyncio.TimeoutError:
            raise bad_request(f"fetching this request's media took over {config.media_fetch_timeout_s:g} s; use a "
                              "faster host or send the media inline", "media_fetch_timeout") from None
    return tuple([d for ref, d in zip(refs, datas) if ref.kind == kind] for kind in kinds)
