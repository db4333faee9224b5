"""The HTTP/1.1 server: Tornado's ``HTTPServer`` with framing errors answered in OpenAI's shape.

Tornado answers a request it cannot frame (a malformed request line or header, conflicting or
negative ``Content-Length``, ``Content-Length`` with ``Transfer-Encoding``, a chunked body over
the limit) with an empty ``400 Bad Request``, and logs the parser's message, which can quote a
header value, key and all. A head over its limit gets the connection dropped. Here each gets a
JSON error with the right status (400, 413, 431) and ``Connection: close``; nothing the client
sent is echoed or logged.

It also drains (``GatewayHTTPServer.stop``): on SIGTERM it stops listening without dropping the
connections the kernel had already accepted, closes idle keep-alive connections at once (a new
one gets a moment to send its first request), and closes every other connection after its
response (``Connection: close``).

This leans on ``HTTP1Connection``'s private steps (``_parse_headers``, ``_read_body``,
``_read_chunked_body``, ``_read_message``, ``_can_keep_alive``, ``_disconnect_on_finish``) and
``TCPServer``'s ``_sockets`` / ``_handlers`` / ``_handle_connection``, so setup.py pins Tornado's
minor version and ``tests/test_security_http.py`` / ``tests/test_e2e_drain.py`` fail loudly if
they change.
"""

from __future__ import annotations

import ctypes
import logging
import re
import socket

import orjson
from tornado import httputil
from tornado.http1connection import HTTP1Connection, is_transfer_encoding_chunked
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.iostream import StreamClosedError

from .errors import HeadersTooLargeError, InvalidRequestError, ProxyError, RequestTooLargeError

log = logging.getLogger(__name__)

HEADER_LIMIT = 64 * 1024          # request line + headers; a larger head is a 431
HEADER_READ_CAP = 1024 * 1024     # what Tornado buffers looking for the end of a head
CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")
# A connection accepted while draining (it was waiting in the listen backlog) gets this long to
# send its request head; a client opens a connection to send one at once.
FRESH_HEAD_GRACE = 2.0
SO_ATTACH_FILTER = 26  # Linux, <asm-generic/socket.h>


class GatewayConnection(HTTP1Connection):
    """One request on a connection; framing errors become ``ProxyError``s, answered here."""

    head_sent = False
    head_seen = False  # a whole request head has arrived: the connection is not idle
    draining = False   # the server is shutting down: answer this request, then close
    first = True       # the connection's first request (not a kept-alive connection's next one)
    framing_error: ProxyError | None = None  # what the handler logs when its body read failed

    def drain(self) -> None:
        """Shutdown: a kept-alive connection waiting for its next request head is closed now; a
        busy one after its response; a new one (accepted, its first head not read yet: the
        client is sending it) gets ``FRESH_HEAD_GRACE`` to send it, and one answer."""
        self.draining = True
        if self.head_seen:
            self._disconnect_on_finish = True  # also sends Connection: close, if the head is not out yet
        elif self.first:
            IOLoop.current().call_later(FRESH_HEAD_GRACE, self.close_if_idle)
        else:
            self.stream.close()

    def close_if_idle(self) -> None:
        if not self.head_seen:
            self.stream.close()

    def _can_keep_alive(self, start_line, headers) -> bool:
        return not self.draining and super()._can_keep_alive(start_line, headers)

    def _parse_headers(self, data: bytes) -> tuple[str, httputil.HTTPHeaders]:
        self.head_seen = True
        if len(data) > HEADER_LIMIT:
            raise self.fail(HeadersTooLargeError(
                f"Request header fields are too large: the request line and headers may have at most "
                f"{HEADER_LIMIT // 1024} KB."))
        try:
            start_line, headers = super()._parse_headers(data)
            httputil.parse_request_start_line(start_line)
            check_framing(headers)
        except httputil.HTTPInputError:
            raise self.fail(InvalidRequestError(
                "Malformed HTTP request: the request line, a header or the body framing "
                "(Content-Length / Transfer-Encoding) is invalid.", param="request")) from None
        return start_line, headers

    def _read_body(self, code, headers, delegate):
        try:
            return super()._read_body(code, headers, delegate)
        except httputil.HTTPInputError:  # Content-Length over the route's limit
            raise self.fail(too_large(self._max_body_size)) from None

    async def _read_chunked_body(self, delegate) -> None:
        try:
            await super()._read_chunked_body(delegate)
        except httputil.HTTPInputError as exc:
            if "too large" in str(exc):
                raise self.fail(too_large(self._max_body_size)) from None
            raise self.fail(InvalidRequestError("Malformed chunked request body.", param="request_body")) from None

    def fail(self, error: ProxyError) -> ProxyError:
        self.framing_error = error
        return error

    def write_headers(self, start_line, headers, chunk=None):
        self.head_sent = True
        return super().write_headers(start_line, headers, chunk)

    async def _read_message(self, delegate) -> bool:
        try:
            return await super()._read_message(delegate)
        except ProxyError as error:
            log.info("refused a request from %s: %d %s", getattr(self.context, "remote_ip", "?"),
                     error.status, error.message)
            if self.head_sent:  # the handler answered already; its finish() closes the connection
                return False
            try:
                await self.stream.write(error_response(error))
            except StreamClosedError:
                pass
            self.close()
            return False


def check_framing(headers: httputil.HTTPHeaders) -> None:
    """Refuse, before any handler runs, what ``_read_body`` would refuse later: unequal
    duplicate or non-numeric ``Content-Length``, ``Content-Length`` with ``Transfer-Encoding``,
    a transfer coding other than chunked."""
    values = headers.get_list("Content-Length")
    if values:
        pieces = {p.strip() for v in values for p in v.split(",")}
        if len(pieces) != 1 or not CONTENT_LENGTH.fullmatch(next(iter(pieces))):
            raise httputil.HTTPInputError("bad Content-Length")
    is_transfer_encoding_chunked(headers)


def too_large(limit: int) -> RequestTooLargeError:
    return RequestTooLargeError(f"Request body is too large: this route accepts at most {limit} bytes.",
                                param="request_body")


def error_response(error: ProxyError) -> bytes:
    body = orjson.dumps(error.to_body())
    reason = httputil.responses.get(error.status, "Error")
    head = (f"HTTP/1.1 {error.status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode("latin1") + body


class GatewayHTTPServer(HTTPServer):
    """``HTTPServer`` whose request connections are ``GatewayConnection``s, and which drains."""

    def initialize(self, *args, **kwargs) -> None:
        super().initialize(*args, **kwargs)
        self.draining = False
        self.current: dict[object, GatewayConnection] = {}  # connection -> its request being read/answered

    def start_request(self, server_conn, request_conn):
        # HTTP1ServerConnection builds a plain HTTP1Connection per request and offers no hook
        # for the class; the subclass adds class-level defaults only, so the swap is safe.
        request_conn.__class__ = GatewayConnection
        request_conn.first = server_conn not in self.current
        if self.draining:
            request_conn.draining = True
            if server_conn in self.current:  # the next request on a kept-alive connection: close it
                request_conn.stream.close()
            else:  # a connection taken from the backlog while draining: it gets one request
                IOLoop.current().call_later(FRESH_HEAD_GRACE, request_conn.close_if_idle)
        self.current[server_conn] = request_conn
        return super().start_request(server_conn, request_conn)

    def on_close(self, server_conn) -> None:
        self.current.pop(server_conn, None)
        super().on_close(server_conn)

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def stop(self) -> None:
        """Stop listening and start draining. Connections the kernel accepted but nobody had
        taken yet would be reset when the socket closes, after their clients sent a request:
        new handshakes are stopped first (a filter drops the SYNs, so clients retry and then
        find the port closed, or a new instance on it), the backlog is taken and served, and
        only then is the socket closed."""
        if self._stopped:
            return
        self._stopped = True
        self.draining = True
        for request_conn in list(self.current.values()):
            request_conn.drain()
        for fd, sock in self._sockets.items():
            self._handlers.pop(fd)()  # no more accept callbacks
            refuse_handshakes(sock)
            for connection, address in backlog(sock):
                self._handle_connection(connection, address)
            sock.close()


class SockFilter(ctypes.Structure):  # struct sock_filter, <linux/filter.h>
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):  # struct sock_fprog
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]


def refuse_handshakes(sock: socket.socket) -> None:
    """Attach a classic BPF program that drops every packet to a listening socket, so no new
    connection completes its handshake on it (Linux; elsewhere nothing is done)."""
    program = (SockFilter * 1)(SockFilter(0x06, 0, 0, 0))  # BPF_RET | BPF_K, 0: keep 0 bytes
    fprog = SockFprog(1, program)  # holds a pointer to ``program``, alive until the call returns
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(memoryview(fprog)))
    except OSError as exc:
        log.debug("cannot filter the listening socket (%s); connections arriving as it closes may be reset", exc)


def backlog(sock: socket.socket) -> list[tuple[socket.socket, object]]:
    """The connections waiting in ``sock``'s accept queue."""
    out = []
    while True:
        try:
            connection, address = sock.accept()
        except (InterruptedError, ConnectionAbortedError):
            continue
        except OSError:  # EAGAIN: the queue is empty
            return out
        out.append((connection, address))
