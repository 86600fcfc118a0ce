"""Media named by URL in a chat request: data: URLs are already bytes; http(s) URLs of allowed hosts are
fetched here (no redirects, a timeout, the upload size limit enforced while reading)."""
from __future__ import annotations

import httpx

from serve.chat import MediaRef
from serve.protocol import APIError, ServerConfig, bad_request, check_media_type


async def fetch(url: str, kind: str, config: ServerConfig) -> bytes:
    limit = config.max_upload_bytes
    try:
        async with httpx.AsyncClient(timeout=config.media_fetch_timeout_s, follow_redirects=False) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise bad_request(f"fetching the {kind} at {url!r} gave HTTP {response.status_code}",
                                      "media_fetch_failed")
                check_media_type(response.headers.get("content-type", ""), kind)
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > limit:
                        raise APIError(413, f"the {kind} at {url!r} is over the {limit}-byte limit",
                                       "payload_too_large")
                return bytes(data)
    except httpx.HTTPError as exc:
        raise bad_request(f"could not fetch the {kind} at {url!r}: {exc}", "media_fetch_failed") from None


async def resolve_media(refs: list[MediaRef], config: ServerConfig) -> tuple[list[bytes], list[bytes]]:
    """(images, videos) as bytes, in order."""
    images, videos = [], []
    for ref in refs:
        data = ref.data if ref.data is not None else await fetch(ref.url, ref.kind, config)
        (images if ref.kind == "image" else videos).append(data)
    return images, videos
