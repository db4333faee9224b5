"""All outbound HTTP: one pycurl-backed ``CurlAsyncHTTPClient`` per worker (keep-alive pool
of ``max_clients`` handles), buffered fetches and real streaming.

Aborting a transfer (the client went away, or no first byte within ``stream_timeout``) uses
the client's own completion path (``_finish``) so the handle goes back to the pool and libcurl
closes the connection at once; ``tests/test_upstream.py`` proves the upstream sees it.
"""

from __future__ import annotations

import functools
import logging
import re
import ssl
import threading
import time
from io import BytesIO
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import pycurl
from tornado import httputil
from tornado.curl_httpclient import CurlAsyncHTTPClient, CurlError
from tornado.httpclient import HTTPClientError, HTTPRequest, HTTPResponse
from tornado.ioloop import IOLoop

from .errors import ProxyError, UpstreamConnectionError, UpstreamError, UpstreamTimeoutError
from .providers.base import UpstreamReply, UpstreamRequest

log = logging.getLogger(__name__)

TIMEOUT_ERRORS = (pycurl.E_OPERATION_TIMEDOUT,)
CONNECT_ERRORS = (pycurl.E_COULDNT_CONNECT, pycurl.E_COULDNT_RESOLVE_HOST, pycurl.E_COULDNT_RESOLVE_PROXY,
                  pycurl.E_SSL_CONNECT_ERROR, pycurl.E_GOT_NOTHING, pycurl.E_SEND_ERROR)
# the provider's certificate is not trusted (or not for this host name), or the CA bundle is unreadable
TLS_ERRORS = (pycurl.E_PEER_FAILED_VERIFICATION, pycurl.E_SSL_CACERT_BADFILE, pycurl.E_SSL_PINNEDPUBKEYNOTMATCH)
ABORTED = pycurl.E_ABORTED_BY_CALLBACK
HTTP_ONLY = pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS
STOCK_USER_AGENT = "Mozilla/5.0 (compatible; pycurl)"  # what Tornado's setup sends by default
# libcurl adds these unless given empty (Expect: 100-continue waits for a reply many servers
# never send), as the stock setup does
SUPPRESSED_HEADERS = (("Expect", b"Expect: "), ("Pragma", b"Pragma: "))
CR_OR_LF = re.compile(rb"\r|\n")
CR_OR_LF_TEXT = re.compile(r"[\r\n]+")


class AbortableCurlClient(CurlAsyncHTTPClient):
    """``CurlAsyncHTTPClient`` plus ``abort(request)``, which the stock client lacks, and
    transfers that start within ``start_within`` seconds.

    The stock client starts new transfers from a zero-delay timer, so everything one IOLoop
    iteration submits goes out together when the iteration ends. Under load an iteration is long
    (it handles every request that arrived meanwhile): requests leave as one wave, come back as
    one, and the next wave forms behind it, so a 50 ms upstream at concurrency 64 cost ~100 ms
    per request. Here a request still joins the iteration's batch, but once the oldest waiting
    one has waited ``start_within``, the batch starts at once. Smaller batches spread the waves
    and cost CPU when the worker is saturated; at 0.25 ms, on the 50 ms upstream at c=64, 644
    (stock) -> 1052 req/s, for +3% to +9% CPU per request against 1 ms at saturation (commits).
    """

    def initialize(self, max_clients: int = 10, start_within: float = 0.00025, default_ca: str | None = None,
                   **kwargs) -> None:
        # The stock client makes all max_clients libcurl handles up front (1,000 are ~7 MB in
        # every worker); here they are made as concurrency first needs them, then reused.
        super().initialize(max_clients=0, **kwargs)
        self.max_clients = max_clients
        self.start_within = start_within
        self.default_ca = default_ca  # CA bundle of the requests that verify without one of their own
        self._waiting_since: float | None = None  # when the oldest not-yet-started request came
        self._timeout_at = 0.0  # when the pending libcurl timer (self._timeout) fires

    def _process_queue(self) -> None:
        for _ in range(min(len(self._requests) - len(self._free_list), self.max_clients - len(self._curls))):
            curl = self._curl_create()
            self._curls.append(curl)
            self._free_list.append(curl)
        super()._process_queue()

    def fetch_impl(self, request: HTTPRequest, callback: Callable[[HTTPResponse], None]) -> None:
        now = self.io_loop.time()
        self._requests.append((request, callback, now))
        self._process_queue()
        if self._waiting_since is None:
            self._waiting_since = now
        if now - self._waiting_since < self.start_within:
            self._set_timeout(0)  # as the stock client: start with this iteration's batch
        else:
            if self._timeout is not None:
                self.io_loop.remove_timeout(self._timeout)  # _handle_timeout reschedules
            self._handle_timeout()

    def _handle_timeout(self) -> None:
        self._waiting_since = None
        super()._handle_timeout()

    def _set_timeout(self, msecs: int) -> None:
        # libcurl asks for its timer on nearly every call and the stock client cancels and
        # re-creates it each time. A timer already due no later than asked is kept: firing early
        # is harmless, since _handle_timeout re-reads libcurl's next deadline.
        deadline = self.io_loop.time() + msecs / 1000.0
        if self._timeout is not None:
            if self._timeout_at <= deadline:
                return
            self.io_loop.remove_timeout(self._timeout)
        self._timeout_at = deadline
        self._timeout = self.io_loop.add_timeout(deadline, self._handle_timeout)

    def _curl_setup_request(self, curl, request, buffer, headers) -> None:
        plain = _unwrap(request)
        if plain.streaming_callback is None and plain.method in ("POST", "GET"):
            self._setup_buffered(curl, plain, buffer, headers)
        else:
            super()._curl_setup_request(curl, request, buffer, headers)
        self._setup_tls(curl, plain)
        # Tornado turns on libcurl's VERBOSE trace whenever DEBUG logging is enabled; the trace
        # holds every request header and body, provider keys included. Never log it.
        curl.setopt(pycurl.VERBOSE, 0)
        # libcurl's upload buffer defaults to 64 KB and stays allocated with the handle; request
        # bodies are small, and with hundreds of concurrent streams that was most of a worker's
        # memory. 16 KB is libcurl's minimum.
        curl.setopt(pycurl.UPLOAD_BUFFERSIZE, 16384)

    def _setup_buffered(self, curl: pycurl.Curl, request: HTTPRequest, buffer: BytesIO,
                        headers: httputil.HTTPHeaders) -> None:
        """The stock setup for the one kind of request ``Upstream.fetch`` sends (POST or GET; no
        proxy, credentials, client certificate or redirects; every option given, so no defaults),
        without reading ~40 attributes through ``_RequestProxy``: 37 -> 10 us a request. The body
        goes as POSTFIELDS, so libcurl sends it without calling back into Python."""
        lines = [b"%s: %s" % (name.encode("ascii"), value.encode("latin1")) for name, value in request.headers.get_all()]
        lines += [header for name, header in SUPPRESSED_HEADERS if name not in request.headers]
        if any(CR_OR_LF.search(line) for line in lines):
            raise ValueError("Illegal characters in header (CR or LF)")
        limit = self.max_body_size

        def write(chunk: bytes) -> int:  # as the stock client: refuse a body past max_body_size
            if buffer.tell() + len(chunk) > limit:
                curl.info["body_too_large"] = True
                return 0
            return buffer.write(chunk)

        curl.setopt(pycurl.PROTOCOLS, HTTP_ONLY)
        curl.setopt(pycurl.REDIR_PROTOCOLS, HTTP_ONLY)
        curl.setopt(pycurl.URL, request.url)
        curl.setopt(pycurl.HTTPHEADER, lines)
        curl.setopt(pycurl.HEADERFUNCTION, functools.partial(self._curl_header_callback, headers, None))
        curl.setopt(pycurl.WRITEFUNCTION, write)
        curl.setopt(pycurl.CONNECTTIMEOUT_MS, int(1000 * request.connect_timeout))
        curl.setopt(pycurl.TIMEOUT_MS, int(1000 * request.request_timeout))
        curl.setopt(pycurl.USERAGENT, request.user_agent or STOCK_USER_AGENT)
        if request.decompress_response:
            curl.setopt(pycurl.ENCODING, "gzip,deflate")
        curl.setopt(pycurl.PROXY, "")  # as the stock client: no proxy taken from the environment
        if isinstance(request, UploadRequest):
            upload = request.upload
            upload.seek(0, 0)
            curl.setopt(pycurl.POST, 1)
            curl.setopt(pycurl.READFUNCTION, upload.read)
            curl.setopt(pycurl.SEEKFUNCTION, upload.seek)  # a resend on a stale connection rewinds
            curl.setopt(pycurl.POSTFIELDSIZE_LARGE, upload.size)
        elif request.method == "POST":
            curl.setopt(pycurl.POSTFIELDS, request.body or b"")
        elif request.body is not None:
            raise ValueError("Body must be None for GET request")
        if threading.active_count() > 1:
            curl.setopt(pycurl.NOSIGNAL, 1)  # as the stock client: libcurl's signals are not thread-safe
        if request.prepare_curl_callback is not None:
            request.prepare_curl_callback(curl)

    def _setup_tls(self, curl: pycurl.Curl, request: HTTPRequest) -> None:
        """The request's certificate checks (``validate_cert``, ``ca_certs``: its deployment's
        ``ssl_verify``), set on the handle every time: a pooled handle keeps whatever CA bundle
        its previous request used, and libcurl offers no way back to its built-in default."""
        if not request.validate_cert:
            curl.setopt(pycurl.SSL_VERIFYPEER, 0)
            curl.setopt(pycurl.SSL_VERIFYHOST, 0)
            return
        curl.setopt(pycurl.SSL_VERIFYPEER, 1)
        curl.setopt(pycurl.SSL_VERIFYHOST, 2)
        ca = request.ca_certs or self.default_ca
        if ca:
            curl.setopt(pycurl.CAINFO, ca)

    def abort(self, request: HTTPRequest, message: str) -> bool:
        # fetch() hands the client a _RequestProxy wrapping our request, not the request itself.
        for curl in self._curls:
            info = getattr(curl, "info", None)
            if info is not None and _unwrap(info["request"]) is request:
                self._finish(curl, ABORTED, message)
                self._process_queue()
                return True
        for item in list(self._requests):
            if _unwrap(item[0]) is request:
                self._requests.remove(item)
                item[1](HTTPResponse(request=request, code=599, error=CurlError(ABORTED, message)))
                return True
        return False


class UploadRequest(HTTPRequest):
    """A POST whose body libcurl reads through its READFUNCTION from ``upload`` (``read(n)``,
    ``seek(offset, origin)``, ``size``: ``upload.UploadBody``, a file on disk) instead of from
    memory. Tornado's curl client has no ``body_producer`` (its setup never looks at one and
    reads ``request.body`` whole), so the buffered setup feeds the body itself."""

    def __init__(self, url: str, upload, **kwargs):
        super().__init__(url, body=b"", **kwargs)
        self.upload = upload


def _unwrap(request) -> HTTPRequest:
    return getattr(request, "request", request)


class HeaderLines(Mapping[str, str]):
    """A reply's head as libcurl hands it over line by line (``add`` is the HEADERFUNCTION),
    parsed into ``HTTPHeaders`` only when read (the headers of a successful reply seldom are).
    Only the final response's head counts: an interim (1xx) head is dropped when the next
    status line arrives. ``complete`` turns true at the blank line that ends the final head."""

    def __init__(self) -> None:
        self._lines: list[bytes] = []
        self._parsed: httputil.HTTPHeaders | None = None
        self.status: int | None = None
        self.complete = False

    def add(self, line: bytes) -> None:  # must return None: pycurl reads a number as bytes taken
        if line.startswith(b"HTTP/"):
            self._lines.clear()
            self._parsed = None
            self.complete = False
            try:
                self.status = httputil.parse_response_start_line(line.decode("latin1").rstrip("\r\n")).code
            except httputil.HTTPInputError:
                self.status = None
        elif line.strip():
            self._lines.append(line)
        elif self.status is not None and self.status >= 200:
            self.complete = True

    @property
    def parsed(self) -> httputil.HTTPHeaders:
        if self._parsed is None:
            self._parsed = httputil.HTTPHeaders()
            for line in self._lines:
                text = line.decode("latin1").rstrip("\r\n")
                try:
                    if text:
                        self._parsed.parse_line(text)
                except httputil.HTTPInputError:  # obsolete line folding, a line without a colon
                    continue
        return self._parsed

    def __getitem__(self, name: str) -> str:
        return self.parsed[name]

    def first(self, name: str) -> str | None:
        """The first value of header ``name``, read from the raw lines without parsing them all."""
        prefix = name.lower().encode("latin1") + b":"
        for line in self._lines:
            if line[:len(prefix)].lower() == prefix:
                return line[len(prefix):].decode("latin1").strip()
        return None

    def __iter__(self) -> Iterator[str]:
        return iter(self.parsed)

    def __len__(self) -> int:
        return len(self.parsed)


@dataclass
class Transfer:
    """One streamed upstream call. ``status``/``headers`` are set when the head arrives."""

    request: HTTPRequest | None = None
    status: int | None = None
    headers: Mapping[str, str] = field(default_factory=HeaderLines)
    error_body: bytearray = field(default_factory=bytearray)
    started: float = field(default_factory=time.monotonic)
    first_byte_at: float | None = None
    abort_reason: str | None = None  # "client" | "timeout" | "invalid" (the gateway refused the reply)

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def default_ca_bundle(ssl_cert_file: str | None) -> str | None:
    """The CA bundle that verifies providers by default: ``SSL_CERT_FILE``, else the system's
    (Python's OpenSSL knows where it is; the libcurl bundled with pycurl may look elsewhere)."""
    return ssl_cert_file or ssl.get_default_verify_paths().cafile


class Upstream:
    def __init__(self, max_clients: int = 1000, connect_timeout: float = 10.0, start_within: float = 0.00025,
                 ssl_verify: bool | str = True, ssl_cert_file: str | None = None):
        """``ssl_verify``: the default certificate check (litellm_settings.ssl_verify / SSL_VERIFY):
        true, false, or a CA bundle path; ``ssl_cert_file``: the default CA bundle (SSL_CERT_FILE)."""
        self.connect_timeout = connect_timeout
        self.default_verify = ssl_verify
        self._client = AbortableCurlClient(force_instance=True, max_clients=max_clients, start_within=start_within,
                                           default_ca=default_ca_bundle(ssl_cert_file))

    def close(self) -> None:
        self._client.close()

    def _request(self, req: UpstreamRequest, timeout: float, ssl_verify: bool | str | None, upload=None,
                 **kwargs) -> HTTPRequest:
        verify = self.default_verify if ssl_verify is None else ssl_verify
        common = dict(method=req.method, headers=dict(req.headers), connect_timeout=min(self.connect_timeout, timeout),
                      request_timeout=timeout, decompress_response=True, follow_redirects=False,
                      validate_cert=verify is not False, ca_certs=verify if isinstance(verify, str) else None, **kwargs)
        if upload is not None:
            return UploadRequest(req.url, upload, **common)
        return HTTPRequest(req.url, body=req.body, **common)

    async def fetch(self, req: UpstreamRequest, timeout: float, transfer: Transfer | None = None,
                    ssl_verify: bool | str | None = None, upload=None) -> UpstreamReply:
        """A buffered call. Non-2xx replies are returned; transport failures raise ProxyErrors.
        With a ``transfer``, ``abort(transfer, reason)`` stops the call (an UpstreamError 499).
        ``ssl_verify``: the deployment's certificate check (None: the default). With an
        ``upload`` (``upload.UploadBody``), libcurl reads the request body from it."""
        head = HeaderLines()
        # The stock header callback parses every line into HTTPHeaders as it arrives (~6% of a
        # worker's CPU); the lines are kept as they are instead, and parsed if something reads them.
        request = self._request(req, timeout, ssl_verify, upload,
                                prepare_curl_callback=lambda curl: curl.setopt(pycurl.HEADERFUNCTION, head.add))
        if transfer is not None:
            transfer.request = request
        try:
            response = await self._client.fetch(request, raise_error=False)
        except CurlError as exc:
            if transfer is not None and transfer.abort_reason is not None:
                raise aborted(transfer) from None
            raise transport_error(exc.errno, timeout, exc.message) from None
        except ValueError:
            raise unsendable() from None
        except HTTPClientError as exc:  # defensive: raise_error=False returns these as responses
            response = exc.response
        if transfer is not None and transfer.abort_reason is not None:
            raise aborted(transfer)  # aborted while still queued
        return UpstreamReply(response.code, head, response.body or b"")

    async def stream(self, req: UpstreamRequest, timeout: float, first_byte_timeout: float | None,
                     on_head: Callable[[Transfer], None], on_chunk: Callable[[bytes], None],
                     transfer: Transfer, ssl_verify: bool | str | None = None) -> Transfer:
        """Stream a call: ``on_head`` once the head is in, ``on_chunk`` for each 2xx body chunk.

        A non-2xx body is collected in ``transfer.error_body``. Raises a ProxyError on transport
        failure (also after bytes have flowed; the caller decides how to report that).
        """

        def header_line(line: bytes) -> None:
            # libcurl's HEADERFUNCTION (inside socket_action, where curl must not be re-entered):
            # the complete head goes to the caller in one IOLoop callback (Tornado's own header
            # callback would parse every line and queue a callback per line). Once only: libcurl
            # also hands trailer lines of a chunked body to this function.
            nonlocal head_queued
            head.add(line)
            if head.complete and not head_queued:
                head_queued = True
                loop.add_callback(head_done)

        def head_done() -> None:
            if transfer.abort_reason:
                return  # queued before an abort: the caller must not see a head now
            transfer.status, transfer.headers = head.status, head
            transfer.first_byte_at = time.monotonic()
            if deadline is not None:
                loop.remove_timeout(deadline)
            on_head(transfer)
            while early and not transfer.abort_reason:
                body_chunk(early.pop(0))

        def body_chunk(chunk: bytes) -> None:
            if transfer.abort_reason:
                return
            if transfer.first_byte_at is None:
                # a body that arrives with the head may be handed over before head_done runs
                early.append(chunk)
            elif transfer.ok:
                on_chunk(chunk)
            else:
                transfer.error_body += chunk[: 65536 - len(transfer.error_body)]

        loop = IOLoop.current()
        early: list[bytes] = []
        head, head_queued = HeaderLines(), False
        transfer.request = self._request(req, timeout, ssl_verify, streaming_callback=body_chunk,
                                         prepare_curl_callback=lambda curl: curl.setopt(pycurl.HEADERFUNCTION, header_line))
        deadline = None
        if first_byte_timeout:
            deadline = loop.call_later(first_byte_timeout, self.abort, transfer, "timeout")
        try:
            await self._client.fetch(transfer.request, raise_error=False)
        except ValueError:
            raise unsendable() from None
        except CurlError as exc:
            if transfer.abort_reason == "timeout":
                raise UpstreamTimeoutError(
                    f"Timeout: no response from the provider within {first_byte_timeout}s", retryable=True) from None
            if transfer.abort_reason is not None:  # the caller aborted it, and knows why
                return transfer
            raise transport_error(exc.errno, timeout, exc.message) from None
        finally:
            if deadline is not None:
                loop.remove_timeout(deadline)
        return transfer

    def abort(self, transfer: Transfer, reason: str) -> None:
        if transfer.abort_reason is None and transfer.request is not None:
            transfer.abort_reason = reason
            self._client.abort(transfer.request, f"aborted: {reason}")


def aborted(transfer: Transfer) -> UpstreamError:
    return UpstreamError(f"The call was aborted ({transfer.abort_reason}).", status=499)


def unsendable() -> ProxyError:
    """libcurl was refused the request (a header value with a line break, in practice). The
    reason is not echoed: Tornado's words for it quote the header line, key and all."""
    return ProxyError("The request to the provider could not be built: a header value is invalid (a line "
                      "break in the deployment's api_key or extra_headers?).")


def transport_error(errno: int, timeout: float, detail: str = "") -> UpstreamError:
    """A curl failure as the error LiteLLM answers with: 408 for timeouts, 503 otherwise; a
    certificate the gateway does not trust is a 502 with libcurl's reason (it names the
    certificate problem and at most the host name, never the URL or a header)."""
    if errno in TLS_ERRORS:
        reason = CR_OR_LF_TEXT.sub(" ", detail or "")[:300] or f"curl error {errno}"
        return UpstreamError(f"APIConnectionError: the provider's TLS certificate could not be verified: {reason}. "
                             "Set the deployment's ssl_verify (litellm_params) or litellm_settings.ssl_verify to "
                             "the CA bundle that signed it.", type="api_connection_error", retryable=True)
    if errno in TIMEOUT_ERRORS:
        return UpstreamTimeoutError(f"Timeout: the provider did not answer within {timeout}s", retryable=True)
    if errno in CONNECT_ERRORS:
        return UpstreamConnectionError(f"APIConnectionError: cannot connect to the provider (curl error {errno})",
                                       retryable=True)
    return UpstreamConnectionError(f"APIConnectionError: the provider connection failed (curl error {errno})",
                                   retryable=True)
