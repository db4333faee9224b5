"""The HTTP/1.1 server: Tornado's ``HTTPServer`` with framing errors answered in OpenAI's shape.

Tornado answers a request it cannot frame (a malformed request line or header, conflicting or
negative ``Content-Length``, ``Content-Length`` with ``Transfer-Encoding``, a chunked body over
the limit) with an empty ``400 Bad Request``, and logs the parser's message, which can quote a
header value, key and all. A head over its limit gets the connection dropped. Here each gets a
JSON error with the right status (400, 413, 431) and ``Connection: close``; nothing the client
sent is echoed or logged.

This leans on ``HTTP1Connection``'s private steps (``_parse_headers``, ``_read_body``,
``_read_chunked_body``, ``_read_message``), so setup.py pins Tornado's minor version and
``tests/test_security_http.py`` fails loudly if they change.
"""

from __future__ import annotations

import logging
import re

import orjson
from tornado import httputil
from tornado.http1connection import HTTP1Connection, is_transfer_encoding_chunked
from tornado.httpserver import HTTPServer
from tornado.iostream import StreamClosedError

from .errors import HeadersTooLargeError, InvalidRequestError, ProxyError, RequestTooLargeError

log = logging.getLogger(__name__)

HEADER_LIMIT = 64 * 1024          # request line + headers; a larger head is a 431
HEADER_READ_CAP = 1024 * 1024     # what Tornado buffers looking for the end of a head
CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")


class GatewayConnection(HTTP1Connection):
    """One request on a connection; framing errors become ``ProxyError``s, answered here."""

    head_sent = False
    framing_error: ProxyError | None = None  # what the handler logs when its body read failed

    def _parse_headers(self, data: bytes) -> tuple[str, httputil.HTTPHeaders]:
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
    """``HTTPServer`` whose request connections are ``GatewayConnection``s."""

    def start_request(self, server_conn, request_conn):
        # HTTP1ServerConnection builds a plain HTTP1Connection per request and offers no hook
        # for the class; the subclass adds no state of its own, so the swap is safe.
        request_conn.__class__ = GatewayConnection
        return super().start_request(server_conn, request_conn)
