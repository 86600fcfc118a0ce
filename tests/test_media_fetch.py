"""Fetching chat media from allowed hosts: the address check, the connection to the checked address, no
redirects, one deadline and one byte budget per request; against a media host on 127.0.0.1."""
from __future__ import annotations

import asyncio
import time

import pytest

from serve.chat import MediaRef
from serve.media_fetch import blocked_reason, resolve_media
from serve.protocol import APIError, ServerConfig
from server_fixtures import media_host, png_bytes

IMAGE = png_bytes(20, 20, seed=11)


@pytest.mark.parametrize("address, reason", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"), ("2002:7f00:1::", "loopback"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"), ("fc00::1", "private"),
    ("fd12:3456::1", "private"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("fe80::1%eth0", "link-local"),
    ("224.0.0.1", "multicast"), ("239.255.255.250", "multicast"), ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("100.64.0.1", "not globally routable"), ("240.0.0.1", "reserved"),
    ("8.8.8.8", None), ("2606:4700:4700::1111", None), ("::ffff:8.8.8.8", None),
])
def test_address_check(address, reason):
    assert blocked_reason(address) == reason


def _config(port: int, **options) -> ServerConfig:
    return ServerConfig(**{"allowed_media_hosts": ("127.0.0.1", "media.test"), "allowed_media_ports": (port,),
                           "allow_private_media_addresses": True, "media_fetch_timeout_s": 1.0, **options})


def _fetch(config: ServerConfig, *paths: str, host: str = "127.0.0.1", port: int | None = None,
           budget: int | None = None):
    port = port or config.allowed_media_ports[0]
    refs = [MediaRef("image", url=f"http://{host}:{port}{p}") for p in paths]
    return asyncio.run(resolve_media(refs, config, budget))


def _refused(config, *paths, status=400, code=None, **kw) -> APIError:
    with pytest.raises(APIError) as raised:
        _fetch(config, *paths, **kw)
    assert raised.value.status == status and (code is None or raised.value.code == code), raised.value.message
    return raised.value


def test_fetches_an_allowed_url():
    with media_host({"/a.png": IMAGE}) as host:
        assert _fetch(_config(host.port), "/a.png", "/a.png") == ([IMAGE, IMAGE], [])


def test_private_addresses_and_other_ports_are_refused_by_default():
    with media_host({"/a.png": IMAGE}) as host:
        error = _refused(_config(host.port, allow_private_media_addresses=False), "/a.png",
                         code="remote_media_refused")
        assert "loopback" in error.message
        error = _refused(_config(host.port, allowed_media_ports=(80, 443)), "/a.png", port=host.port,
                         code="remote_media_refused")
        assert str(host.port) in error.message
        assert host.hosts == []  # neither was contacted


def test_connects_to_the_checked_address_with_the_name_as_host(monkeypatch):
    """A name is resolved once; the connection goes to that address (no second lookup to rebind)."""
    lookups = []

    async def resolve(name, port):
        lookups.append(name)
        return ["127.0.0.1"] if len(lookups) == 1 else ["10.9.9.9"]  # a rebinding DNS answer

    monkeypatch.setattr("serve.media_fetch.resolve", resolve)
    with media_host({"/a.png": IMAGE}) as host:
        assert _fetch(_config(host.port), "/a.png", host="media.test") == ([IMAGE], [])
        assert lookups == ["media.test"] and host.hosts == [f"media.test:{host.port}"]
        lookups.clear()
        monkeypatch.setattr("serve.media_fetch.resolve", lambda name, port: _answer(["93.184.215.14", "10.0.0.7"]))
        error = _refused(_config(host.port, allow_private_media_addresses=False), "/a.png", host="media.test",
                         code="remote_media_refused")
        assert "10.0.0.7" in error.message  # one private answer among public ones is enough to refuse


async def _answer(addresses):
    return addresses


def test_redirects_are_refused():
    with media_host({"/a.png": IMAGE}) as host:
        error = _refused(_config(host.port), "/redirect", code="media_fetch_failed")
        assert "redirect" in error.message
        assert host.hosts == [f"127.0.0.1:{host.port}"]  # /a.png was never asked for


def test_a_trickling_source_hits_the_deadline():
    with media_host({}, stall_s=20) as host:
        start = time.monotonic()
        _refused(_config(host.port, media_fetch_timeout_s=1.0), "/stall", code="media_fetch_timeout")
        assert time.monotonic() - start < 3.0
        for _ in range(100):  # the connection was dropped, not left to trickle on
            if host.stalls_dropped_after_s:
                break
            time.sleep(0.02)
        assert host.stalls_dropped_after_s and host.stalls_dropped_after_s[0] < 3.0


def test_one_byte_budget_for_all_items():
    big = IMAGE + b"\0" * (600_000 - len(IMAGE))
    with media_host({"/big.png": big}) as host:
        config = _config(host.port, max_upload_bytes=1_000_000)
        assert _fetch(config, "/big.png") == ([big], [])  # one fits
        _refused(config, "/big.png", "/big.png", status=413, code="payload_too_large")  # two do not
        _refused(config, "/big.png", status=413, budget=500_000)  # what the body left


@pytest.mark.parametrize("url", ["http://media.test:abc/x.png", "http://media.test/\u0000.png",
                                 "http://media.test/" + "a" * 70_000])
def test_a_malformed_url_is_a_400(url):
    config = _config(80)
    with pytest.raises(APIError) as raised:
        asyncio.run(resolve_media([MediaRef("image", url=url)], config, None))
    assert raised.value.status == 400
