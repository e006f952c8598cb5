"""REST connections: aiohttp's low-level server with the read timeouts it lacks.

aiohttp closes a connection that sits idle between requests (`keepalive_timeout`,
counted from the connect and from each response), but has no limit on reading a
request's headers once they have started, and on SIGTERM it waits, up to the shutdown
timeout, for a request whose body never comes (it even stops reading the socket, so the
body cannot come). Here:

* a request's headers must be complete within `header_timeout` of their first byte,
  else the client gets 408 and the connection closes (nginx's client_header_timeout);
* the body timeout is the body reader's (`http_body`), where the waiting happens;
* a body the parser gives up on (bad chunked framing) fails its reader at once, where
  aiohttp leaves it waiting;
* an answer that closes the connection while the request's body is unread (a refusal
  for size or a stall) closes it at once instead of reading the rest (lingering);
* on shutdown, a connection whose request is still arriving (headers or body), or that
  lingers after its answer, closes at once, as idle ones do: only requests the server
  is working on get the drain time.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from fleetserve.server.json_codec import error_body

log = logging.getLogger(__name__)
JSON = "application/json"


def _answer(status: int, reason: str, message: str) -> bytes:
    body = error_body(message)
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {JSON}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class Listener(web.Server):
    """`web.Server` whose connections are `Connection`s."""

    def __init__(self, handler: Any, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.header_timeout = header_timeout
        self.header_timed_out = _answer(
            408, "Request Timeout", f"the request headers took longer than {header_timeout:g} s"
        )

    def __call__(self) -> RequestHandler:
        return Connection(self, loop=self._loop, **self._kwargs)


class Connection(RequestHandler):
    __slots__ = ("_header_timer", "_listener", "_payload")

    def __init__(self, listener: Listener, **kwargs: Any) -> None:
        super().__init__(listener, **kwargs)
        self._listener = listener
        self._header_timer: asyncio.TimerHandle | None = None
        self._payload: StreamReader = EMPTY_PAYLOAD  # the body of the last request parsed

    def data_received(self, data: bytes) -> None:
        # bytes after a complete body start the next request: its headers are now timed
        between = self._payload.is_eof()
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:  # a request's headers are complete
            message, payload = self._messages[-1]
            if not self._payload.is_eof():
                # only a parse error ends a body early: aiohttp queues its 400 but leaves
                # the handler reading that body waiting for ever; it must hear it
                error = getattr(message, "message", "unparsable")
                self._payload.set_exception(RequestPayloadError(error))
            self._payload = payload
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
        elif between and data and self._header_timer is None and not self._close:
            self._header_timer = self._loop.call_later(
                self._listener.header_timeout, self._headers_timed_out
            )

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        # a request still being served finishes first; the keep-alive timeout that
        # follows its response then bounds the rest
        if self.transport is not None and not self._request_in_progress:
            self.transport.write(self._listener.header_timed_out)
            self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse (the handler never saw it):
        JSON like every other error, logged at DEBUG (not aiohttp's ERROR with a
        traceback, which any client could fill the log with)."""
        if request.writer.output_size > 0:  # aiohttp's contract: too late to answer
            raise ConnectionError("the response has started: cannot answer an error")
        message = message or HTTPStatus(status).phrase
        if status >= 500:
            log.error("request from %s failed: %s", request.remote, message, exc_info=exc)
        else:
            log.debug("unparsable request from %s: %s", request.remote, message)
        response = web.Response(status=status, body=error_body(message), content_type=JSON)
        response.force_close()
        return response

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        answered = await super().finish_response(request, resp, start_time)
        if not resp.keep_alive and not request.content.is_eof():
            self.force_close()  # refused unread (too large, stalled): read none of the rest
        return answered

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        request = self._current_request
        if not self._request_in_progress or (request is not None and not request.content.is_eof()):
            # idle, lingering after an answer, or still receiving its request: nothing
            # the server works on, so nothing to drain
            self.force_close()
        await super().shutdown(timeout)
