"""uvicorn's h11 connection, guarded against slow and abusive clients.

uvicorn bounds the idle time between two requests of a connection (keep-alive) but not the time a
client may take to send its headers or its body, and it counts connections only to refuse requests.
This protocol adds:

- a header timeout: a request's headers must be complete within ``header_timeout`` seconds of the
  connection (or of its first byte, on a kept-alive connection); else 408 and the connection is closed;
- a body timeout: while a request body is incomplete, ``body_timeout`` seconds without a byte close
  the connection (the route sees a client disconnect);
- a connection cap: beyond ``max_connections`` open connections a new one is answered 503 and closed;
- the OpenAI error envelope on the answers uvicorn itself gives to unparseable requests (400, and 431
  for headers over h11's size limit) instead of plain text.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

# The most bytes a request line and its headers may have (uvicorn's default h11_max_incomplete_event_size).
MAX_HEADER_BYTES = 16 * 1024


def raw_error(status: int, reason: str, message: str, code: str, type: str = "invalid_request_error",
              extra_headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 error response in the OpenAI envelope, closing the connection."""
    body = json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()
    headers = {"content-type": "application/json", "content-length": str(len(body)), "connection": "close",
               **(extra_headers or {})}
    head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return head.encode("latin-1") + body


class GuardedH11Protocol(H11Protocol):
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    max_connections: int = 1000

    @classmethod
    def configured(cls, header_timeout: float, body_timeout: float, max_connections: int) -> type[H11Protocol]:
        """A subclass with these limits, to pass as ``uvicorn.Config(http=...)``."""
        return type(cls.__name__, (cls,), {"header_timeout": header_timeout, "body_timeout": body_timeout,
                                           "max_connections": max_connections})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self.logger.warning("refused a connection: %d are open (--max-connections)", len(self.connections) - 1)
            self._reject(raw_error(503, "Service Unavailable", "The server has too many open connections; retry "
                                   "later.", "too_many_connections", type="server_error",
                                   extra_headers={"retry-after": "1"}))
            return
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._headers_too_large(data):
            self._reject_too_large()
            return
        super().data_received(data)
        self._update_timers()

    def _headers_too_large(self, data: bytes) -> bool:
        """h11 bounds only headers that arrive in pieces; one read can bring a larger block whole."""
        buffered = self.conn.trailing_data[0] + data
        end = buffered.find(b"\r\n\r\n")
        return (end if end >= 0 else len(buffered)) > MAX_HEADER_BYTES

    def _reject_too_large(self) -> None:
        self._reject(raw_error(431, "Request Header Fields Too Large",
                               f"The request line and headers are larger than {MAX_HEADER_BYTES // 1024} KiB.",
                               "headers_too_large"))

    def on_response_complete(self) -> None:
        self._cancel_timers()  # from here the keep-alive timeout applies
        super().on_response_complete()
        self._update_timers()  # a pipelined request may have started meanwhile

    def send_400_response(self, msg: str) -> None:
        self._cancel_timers()
        if len(self.conn.trailing_data[0]) > MAX_HEADER_BYTES:  # h11's "Receive buffer too long"
            self._reject_too_large()
        else:
            self._reject(raw_error(400, "Bad Request", "The request is not valid HTTP/1.1.", "invalid_http"))

    # -- timers ----------------------------------------------------------------------------------
    def _update_timers(self) -> None:
        if self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is h11.IDLE and self.conn.our_state is h11.IDLE:
            if self._header_timer is None and self.conn.trailing_data[0]:  # a new request has begun
                self._header_timer = self.loop.call_later(self.header_timeout, self._headers_timed_out)
            return
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        if state is h11.SEND_BODY:
            self._body_timer = self.loop.call_later(self.body_timeout, self._body_timed_out)

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE and not self.transport.is_closing():
            self._reject(raw_error(408, "Request Timeout", f"The request headers did not arrive within "
                                   f"{self.header_timeout:g} s.", "request_timeout"))

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.conn.their_state is not h11.SEND_BODY or self.transport.is_closing():
            return
        if self.flow.read_paused:  # the route is not reading: not the client's delay
            self._body_timer = self.loop.call_later(self.body_timeout, self._body_timed_out)
            return
        self.logger.info("closed a connection whose request body stalled for %g s", self.body_timeout)
        self.transport.close()  # the route sees a client disconnect

    def _reject(self, response: bytes) -> None:
        self._cancel_timers()
        self.transport.write(response)
        self.transport.close()
