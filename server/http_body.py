"""Request bodies at the REST edge: bounded, decoded and timed, read one way everywhere.

A body larger than the limit is refused from its Content-Length before any of it is
read. A compressed body (Content-Encoding gzip or deflate) is inflated step by step and
cut at the limit, so a decompression bomb never grows in memory. A client that stops
sending mid-body is answered 408 after the body timeout, counted between two reads (as
nginx's client_body_timeout), so a slow but steady upload is never cut. A body refused
for its size, its stall or its framing is not read on: the connection closes after the
answer (other answers given before a body was read linger to read it, as aiohttp does,
so that the client, still sending, gets the answer rather than a reset).
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from fleetserve.server.errors import InvalidArgument

T = TypeVar("T")

# Content-Encoding -> zlib's wbits: gzip framing, or zlib framing (RFC 9110's "deflate")
ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
ACCEPTED = "gzip, deflate"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Refused(InvalidArgument):
    """A request refused at the HTTP layer, with its own status (400, 408, 415); `close`:
    the rest of its body is not read, the connection closes after the answer."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        headers: dict[str, str] | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status, self.headers, self.close = status, headers, close


def too_large(limit: int, what: str = "request body", name: str = "limit") -> Refused:
    return Refused(f"{what} exceeds the {name} of {limit} bytes", close=True)


def check_length(
    request: web.BaseRequest, limit: int, what: str = "request body", name: str = "limit"
) -> None:
    """Refuse from the header what could not fit: nothing of it is read."""
    length = request.content_length
    if length is not None and length > limit:
        raise too_large(limit, f"{what} of {length} bytes", name)


def identity_only(request: web.BaseRequest, what: str) -> None:
    """Bodies streamed to disk are taken as sent: a Content-Encoding is 415."""
    encoding = request.headers.get("Content-Encoding")
    if encoding is not None and encoding.strip().lower() != "identity":
        raise Refused(
            f"{what} takes no Content-Encoding (got {encoding!r}): send it uncompressed",
            415, {"Accept-Encoding": "identity"},
        )  # fmt: skip


class _Inflate:
    """One gzip or deflate stream, inflated at most `room` bytes past what was asked."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._zlib = zlib.decompressobj(ENCODINGS[name])
        self._started = False

    def __call__(self, data: bytes, room: int) -> bytes:
        """At most room + 1 bytes: one past the limit says the body is too large."""
        self._started = self._started or bool(data)
        try:
            return self._zlib.decompress(data, room + 1)
        except zlib.error as exc:
            raise Refused(f"the request body does not decode as {self.name}: {exc}") from None

    def finish(self) -> None:
        if self._started and not self._zlib.eof:
            raise Refused(f"the request body does not decode as {self.name}: it is truncated")
        if self._zlib.unused_data:
            raise Refused(f"the request body does not decode as {self.name}: data after its end")


def _decoder(request: web.BaseRequest) -> _Inflate | None:
    encoding = request.headers.get("Content-Encoding")
    if encoding is None:
        return None
    name = encoding.strip().lower()
    if name == "identity":
        return None
    if name not in ENCODINGS:
        raise Refused(
            f"Content-Encoding {encoding!r} is not supported (use {ACCEPTED})",
            415, {"Accept-Encoding": ACCEPTED},
        )  # fmt: skip
    return _Inflate(name)


async def read(request: web.BaseRequest, limit: int, timeout: float) -> bytes:
    """The whole body, decoded, at most `limit` bytes (decoded); `timeout`: seconds the
    client may pause between two chunks."""
    check_length(request, limit)
    decode = _decoder(request)
    payload = request.content
    try:
        if decode is None and payload.is_eof():  # all here already: no wait, no timer
            body = await payload.read()
            if len(body) > limit:
                raise too_large(limit)
            return body
        await proceed(request)
        loop = asyncio.get_running_loop()
        chunks, size = [], 0
        async with asyncio.timeout(timeout) as deadline:
            while chunk := await payload.readany():
                deadline.reschedule(loop.time() + timeout)
                if decode is not None:
                    chunk = decode(chunk, limit - size)
                size += len(chunk)
                if size > limit:
                    raise too_large(limit)
                chunks.append(chunk)
        if decode is not None:
            decode.finish()
        return b"".join(chunks)
    except TimeoutError:
        raise timed_out(timeout) from None
    except (RequestPayloadError, HttpProcessingError) as exc:
        raise malformed(exc) from None


async def within(timeout: float, step: Awaitable[T]) -> T:
    """One step of reading a streamed body, bounded by the body timeout."""
    try:
        async with asyncio.timeout(timeout):
            return await step
    except TimeoutError:
        raise timed_out(timeout) from None
    except (RequestPayloadError, HttpProcessingError) as exc:
        raise malformed(exc) from None


async def stream(request: web.BaseRequest, timeout: float, size: int) -> AsyncIterator[bytes]:
    """The body as sent, in chunks of at most `size` bytes (for uploads to disk; the
    caller has called `proceed`)."""
    while chunk := await within(timeout, request.content.read(size)):
        yield chunk


async def proceed(request: web.BaseRequest) -> None:
    """Tell a client that sent `Expect: 100-continue` to send its body, once its headers
    passed every check: it waits for this, or for the refusal, before sending it."""
    expect = request.headers.get("Expect")
    if expect is not None and expect.lower() == "100-continue" and request.version >= (1, 1):
        await request.writer.write(CONTINUE)
        request.writer.output_size = 0  # the response itself has not started


def timed_out(timeout: float) -> Refused:
    return Refused(f"the request body stalled: nothing received for {timeout:g} s", 408, close=True)


def malformed(exc: Exception) -> Refused:
    return Refused(f"the request body is malformed: {exc}", close=True)
