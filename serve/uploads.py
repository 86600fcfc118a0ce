"""Request bodies read as a stream, with the size limit enforced while reading.

``read_multipart`` feeds python-multipart's streaming parser chunk by chunk: file parts go to
``SpooledTemporaryFile`` (in memory up to ``spool_threshold_bytes``, then on disk), and the upload,
field and media-count limits stop the read the moment they are crossed, so a 2 GB upload costs at
most one chunk of memory before its 413.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from tempfile import SpooledTemporaryFile

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from serve.protocol import APIError, ServerConfig, bad_request, check_media_counts, check_media_type
from encoders.limits import human_size

FILE_FIELDS = ("image", "video", "audio")


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is over the {human_size(limit)} upload limit", "payload_too_large")


def check_content_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request("Content-Length must be a whole number of bytes")
        if int(declared) > limit:
            raise too_large(limit)


async def _limited(request: Request, limit: int) -> AsyncIterator[bytes]:
    check_content_length(request, limit)
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise too_large(limit)
        yield chunk


async def read_body(request: Request, limit: int) -> bytearray:
    """The whole body (JSON), refused with 413 as soon as it passes ``limit``; one buffer, no joined copy."""
    body = bytearray()
    async for chunk in _limited(request, limit):
        body += chunk
    return body


async def within(timeout_s: float, reading):
    """Awaits ``reading`` (a body read), or 408 once ``timeout_s`` passed: a slow body must not hold its slot."""
    try:
        return await asyncio.wait_for(reading, timeout_s)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s; send it faster or in "
                            "a smaller request", "request_timeout") from None


@dataclass
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    name: str = ""
    data: bytearray | None = None  # a field
    file: SpooledTemporaryFile | None = None


@dataclass
class MultipartForm:
    fields: dict[str, list[str]] = field(default_factory=dict)
    images: list[SpooledTemporaryFile] = field(default_factory=list)
    videos: list[SpooledTemporaryFile] = field(default_factory=list)
    audios: list[SpooledTemporaryFile] = field(default_factory=list)

    @property
    def files(self) -> list[SpooledTemporaryFile]:
        return self.images + self.videos + self.audios

    def close(self) -> None:
        for f in self.files:
            f.close()


class _FormBuilder:
    """python-multipart callbacks -> MultipartForm; raises APIError from inside ``parser.write``."""

    def __init__(self, config: ServerConfig):
        self.config, self.form = config, MultipartForm()
        self.part = _Part()
        self._header_name, self._header_value = b"", b""
        self.pending_writes: list[tuple[SpooledTemporaryFile, bytes]] = []

    def on_part_begin(self):
        self.part = _Part()

    def on_header_field(self, data, start, end):
        self._header_name += data[start:end]

    def on_header_value(self, data, start, end):
        self._header_value += data[start:end]

    def on_header_end(self):
        self.part.headers[self._header_name.decode("latin-1").lower()] = self._header_value.decode("latin-1")
        self._header_name, self._header_value = b"", b""

    def on_headers_finished(self):
        _, options = parse_options_header(self.part.headers.get("content-disposition", ""))
        if b"name" not in options:
            raise bad_request("a multipart part has no name in its Content-Disposition", "bad_multipart")
        self.part.name = options[b"name"].decode("utf-8", "replace")
        if self.part.name in FILE_FIELDS:
            check_media_type(self.part.headers.get("content-type", ""), self.part.name)
            files = getattr(self.form, self.part.name + "s")
            self.part.file = SpooledTemporaryFile(max_size=self.config.spool_threshold_bytes)
            files.append(self.part.file)
            check_media_counts(len(self.form.images), len(self.form.videos), self.config, len(self.form.audios))
        else:
            self.part.data = bytearray()
            if sum(map(len, self.form.fields.values())) >= 64:
                raise bad_request("too many form fields", "bad_multipart")

    def on_part_data(self, data, start, end):
        if self.part.file is not None:
            self.pending_writes.append((self.part.file, bytes(data[start:end])))
            return
        self.part.data += data[start:end]
        if len(self.part.data) > self.config.max_field_bytes:
            raise APIError(413, f"form field {self.part.name!r} is over {human_size(self.config.max_field_bytes)}",
                           "field_too_large")

    def on_part_end(self):
        if self.part.data is not None:
            try:
                value = self.part.data.decode("utf-8")
            except UnicodeDecodeError:
                raise bad_request(f"form field {self.part.name!r} is not UTF-8 text") from None
            self.form.fields.setdefault(self.part.name, []).append(value)


def multipart_boundary(request: Request, config: ServerConfig) -> bytes:
    """The checks that need no body (type, boundary, declared length): done before admission."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        raise APIError(415, f"/v1/generate takes multipart/form-data, got {content_type.decode('latin-1')!r}",
                       "unsupported_media_type")
    if not options.get(b"boundary"):
        raise bad_request("multipart/form-data without a boundary", "bad_multipart")
    check_content_length(request, config.max_upload_bytes)
    return options[b"boundary"]


async def read_multipart(request: Request, config: ServerConfig) -> MultipartForm:
    boundary = multipart_boundary(request, config)
    builder = _FormBuilder(config)
    callbacks = {name: getattr(builder, name) for name in dir(builder) if name.startswith("on_")}
    try:
        parser = MultipartParser(boundary, callbacks)
        async for chunk in _limited(request, config.max_upload_bytes):
            try:
                parser.write(chunk)
            except APIError:
                raise
            except Exception as exc:  # python-multipart's parse errors
                raise bad_request(f"malformed multipart body: {exc}", "bad_multipart") from None
            for file, data in builder.pending_writes:
                if getattr(file, "_rolled", False):  # on disk: off the event loop
                    await run_in_threadpool(file.write, data)
                else:
                    file.write(data)
            builder.pending_writes.clear()
        parser.finalize()
    except BaseException:
        builder.form.close()
        raise
    for file in builder.form.files:
        file.seek(0)
    return builder.form
