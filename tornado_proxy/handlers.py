"""``BaseHandler``: what every route shares (call id, auth from the request head, body limits,
JSON + schema, OpenAI-shaped errors, the scrubbed access log), and the 404 handler. The LLM
endpoints are in ``llm.py``."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import time
import uuid
from dataclasses import dataclass

import orjson
import tornado.web

from .auth import authenticate_request, authorize
from .errors import InvalidRequestError, MethodNotAllowedError, NotFoundError, ProxyError, RequestTooLargeError
from .providers.base import Deployment

log = logging.getLogger(__name__)
access_log = logging.getLogger("tornado_proxy.access")

ALL_METHODS = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT", "OPTIONS")
MAX_JSON_DEPTH = 254  # orjson encodes no deeper, so a deeper body could never be forwarded
SMALL_BODY_LIMIT = 64 * 1024  # routes that read no body, or a small one (GET, health, metrics)
DRAIN_LIMIT = 64 * 1024  # a refused request's body up to this is read and dropped (keep-alive)


@dataclass
class CallContext:
    """What one request learned, for headers, the access log and metrics."""

    call_id: str
    started: float
    started_at: float = dataclasses.field(default_factory=time.time)  # wall clock, for the spend log
    model_group: str = ""      # a resolved group only: it is a metrics label
    requested_model: str = ""  # what the client asked for, for the log line
    deployment: Deployment | None = None
    upstream_s: float = 0.0
    usage: dict | None = None
    stream: bool = False
    first_token_s: float = 0.0  # a stream's time to its first event
    retries: int = 0            # attempts after the first, within a model group
    fallbacks: int = 0          # fallback groups tried
    cache_hit: bool = False     # answered from the response cache


@tornado.web.stream_request_body
class BaseHandler(tornado.web.RequestHandler):
    """Every route streams its body: ``prepare`` (auth, the route's body limit) runs on the
    head alone, so nothing is read for a caller who is refused, and no route buffers more than
    its limit (Tornado enforces it per request through ``set_max_body_size``)."""

    SUPPORTED_METHODS = ALL_METHODS
    body_limit: int | None = SMALL_BODY_LIMIT  # bytes; None: general_settings.max_request_size_mb
    trace = None  # a tracing.RequestTrace while tracing is on and the route is traced (LLM calls)

    def initialize(self, gw, route=None) -> None:
        self.gw = gw
        self.route = route
        self.ctx = CallContext(call_id=str(uuid.uuid4()), started=time.perf_counter())
        self.principal = None
        self._body_parts: list[bytes] = []
        self.refused: ProxyError | None = None
        self.admission = None  # a ratelimit.Admission while the request holds one  # an error answered once the body has been dropped
        self._in_flight = False
        self._ended = False
        self.set_default_headers()

    def set_default_headers(self) -> None:
        ctx = getattr(self, "ctx", None)  # Tornado calls this before initialize() too
        if ctx is not None:
            self.set_header("x-litellm-call-id", ctx.call_id)
            if ctx.deployment is not None:  # send_error's clear() comes here too: errors keep them
                self.set_model_headers(ctx.deployment)

    def set_model_headers(self, d: Deployment) -> None:
        self.set_header("x-litellm-attempted-retries", str(self.ctx.retries))
        self.set_header("x-litellm-attempted-fallbacks", str(self.ctx.fallbacks))
        self.set_header("x-litellm-model-id", d.id)
        self.set_header("x-litellm-model-group", self.ctx.requested_model or self.ctx.model_group)
        self.set_header("x-litellm-model-api-base", d.public_api_base)

    @property
    def auth_level(self) -> str:
        return self.route.auth

    async def prepare(self) -> None:
        self.gw.begin()
        self._in_flight = True
        try:
            await self.admit()
        except ProxyError as error:
            if not self.drainable():
                raise  # answered now, unread; write_error announces Connection: close
            # A small body is read and dropped first, then the error answered: the client can
            # reuse the connection (Tornado closes one answered before its body was read).
            self.refused = error
            self.request.connection.set_max_body_size(DRAIN_LIMIT)
            setattr(self, self.request.method.lower(), self.refuse)  # what Tornado calls once the body is in

    async def admit(self) -> None:
        """Route, method, key and body limit, from the head alone."""
        if self.route is None:
            raise NotFoundError(f"Route not found: {self.request.method} {self.request.path}")
        if self.request.method not in self.route.methods:
            raise MethodNotAllowedError(f"Method {self.request.method} is not allowed on {self.request.path}.",
                                        headers={"Allow": ", ".join(sorted(self.route.methods))})
        self.principal = await authenticate_request(self.request.headers, self.auth_level,
                                                    self.gw.settings.master_key, self.gw.tenants)
        authorize(self.principal, self.auth_level)
        limit = self.max_body_bytes
        self.request.connection.set_max_body_size(limit)  # a longer chunked body: 413, unread
        length = self.request.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise self.too_large()

    def drainable(self) -> bool:
        """No body, or a declared one small enough to read and drop before answering an error."""
        headers = self.request.headers
        if "Transfer-Encoding" in headers:
            return False
        length = headers.get("Content-Length")
        return length is None or (length.isdigit() and int(length) <= DRAIN_LIMIT)

    def refuse(self, *_args, **_kwargs) -> None:
        raise self.refused

    @property
    def max_body_bytes(self) -> int:
        configured = int(self.gw.settings.max_request_size_mb * 1024 * 1024)
        return configured if self.body_limit is None else min(self.body_limit, configured)

    def too_large(self) -> RequestTooLargeError:
        if self.body_limit is not None and self.body_limit < self.gw.settings.max_request_size_mb * 1024 * 1024:
            return RequestTooLargeError(f"Request body is too large: {self.request.path} accepts at most "
                                        f"{self.body_limit // 1024} KB.", param="request_body")
        return RequestTooLargeError(
            f"Request body is too large: the limit is {self.gw.settings.max_request_size_mb:g} MB "
            "(general_settings.max_request_size_mb).", param="request_body")

    def data_received(self, chunk: bytes) -> None:
        if self.refused is None:
            self._body_parts.append(chunk)  # at most the route's limit: Tornado stops the read past it

    def json_body(self) -> dict:
        """The request body: size-checked, decoded and validated against the route's schema."""
        raw = b"".join(self._body_parts)
        if not raw or not raw.strip():
            raise InvalidRequestError("Request body is empty; send a JSON object.", param="request_body")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequestError("Request body is not valid UTF-8.", param="request_body") from None
            raise InvalidRequestError(f"Request body is not valid JSON: {exc}", param="request_body") from None
        if not isinstance(body, dict):
            kind = "an array" if isinstance(body, list) else "a scalar"
            raise InvalidRequestError(f"Request body must be a JSON object, got {kind}.", param="request_body")
        if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH:  # cheap bound first: rarely re-encode
            try:
                orjson.dumps(body)
            except TypeError:
                raise InvalidRequestError(f"Request body is nested too deeply (more than {MAX_JSON_DEPTH} "
                                          "levels of arrays/objects).", param="request_body") from None
        model_in_path = self.path_kwargs.get("model")
        if model_in_path:
            body["model"] = model_in_path
        if self.route.schema:
            self.gw.schemas.validate(self.route.schema, body)
        return body

    def write_json(self, obj, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(orjson.dumps(obj))

    def write_error(self, status_code: int, **kwargs) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ProxyError):
            error = exc
        elif status_code == 405:
            error = MethodNotAllowedError(f"Method {self.request.method} is not allowed on {self.request.path}.")
            self.set_header("Allow", ", ".join(sorted(self.route.methods if self.route else ALL_METHODS)))
        elif status_code == 404:
            error = NotFoundError(f"Route not found: {self.request.method} {self.request.path}")
        elif status_code < 500:
            error = ProxyError(self._reason, status=status_code, type="invalid_request_error")
        else:
            error = ProxyError("Internal server error; the gateway logged the details.", status=status_code)
        if self.trace is not None:
            self.trace.failed(error)
        self.set_status(error.status)
        for name, value in error.headers.items():
            self.set_header(name, value)
        if not self.body_complete:
            # answered before the body was read: Tornado closes the connection after this
            # response, so say so (a client reusing it would meet a reset)
            self.set_header("Connection", "close")
        self.set_header("Content-Type", "application/json")
        self.finish(self.error_body(error))

    @property
    def body_complete(self) -> bool:
        """The whole request body has arrived (Tornado resolves this future at its end)."""
        return self.request._body_future.done()

    def error_body(self, error: ProxyError) -> bytes:
        """An error as this endpoint's clients read it (OpenAI's shape unless overridden)."""
        return orjson.dumps(error.to_body())

    def log_exception(self, typ, value, tb) -> None:
        # Tornado's default logs repr(self.request), headers and all: that would leak keys.
        if isinstance(value, (ProxyError, tornado.web.HTTPError)):
            return
        log.error("call %s: unhandled %s on %s %s", self.ctx.call_id, typ.__name__, self.request.method,
                  self.request.path, exc_info=(typ, value, tb))

    def on_finish(self) -> None:
        status = self.get_status()
        transfer = getattr(self, "transfer", None)
        if transfer is not None and transfer.abort_reason == "client":
            status = 499  # the client went away first (nginx's code for it)
        self.end_request(status)

    def on_connection_close(self) -> None:
        upload_cut = not self._finished and not self.body_complete
        super().on_connection_close()  # fails the body future: Tornado then never runs the method
        if upload_cut:
            # nothing else will end this request: no handler method, no finish(), no on_finish()
            error = getattr(self.request.connection, "framing_error", None)
            self.end_request(error.status if error is not None else 499)

    def end_request(self, status: int) -> None:
        """Once per request, whichever way it ended: in-flight count, metrics, access log."""
        if self._ended:
            return
        self._ended = True
        if self.admission is not None:
            self.gw.limiter.finish(self.admission, int((self.ctx.usage or {}).get("total_tokens") or 0))
        self.record_spend(status)
        elapsed = time.perf_counter() - self.ctx.started
        route = self.route.path if self.route else "(unmatched)"
        self.gw.record(route, self.ctx, status, elapsed, began=self._in_flight)
        if self.trace is not None:
            self.trace.end(self.ctx, status)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(self.log_line(route, status, elapsed))

    def record_spend(self, status: int) -> None:
        """The spend log entry of an LLM call (``LLMHandler``); other routes leave none."""

    def log_line(self, route: str, status: int, elapsed: float) -> str:
        """One JSON line per request: no query string, no headers, no bodies."""
        d, usage = self.ctx.deployment, self.ctx.usage or {}
        return orjson.dumps({
            "call_id": self.ctx.call_id, "method": self.request.method, "route": route,
            "path": self.request.path, "status": status,
            "model_group": self.ctx.model_group or self.ctx.requested_model or None,
            "deployment_id": d.id if d else None, "provider": d.provider if d else None,
            "total_ms": round(elapsed * 1000, 3), "upstream_ms": round(self.ctx.upstream_s * 1000, 3),
            "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
            "stream": self.ctx.stream, "remote_ip": self.client_ip}).decode()

    @property
    def client_ip(self) -> str:
        """The caller's address. X-Forwarded-For / X-Real-Ip are believed only when the peer is
        one of ``general_settings.trusted_proxies``; then the nearest untrusted hop counts."""
        peer = self.request.remote_ip
        trusted = self.gw.settings.trusted_proxies
        if not trusted or not in_networks(peer, trusted):
            return peer
        hops = [h.strip() for h in self.request.headers.get("X-Forwarded-For", "").split(",") if h.strip()]
        real = self.request.headers.get("X-Real-Ip", "").strip()
        for hop in reversed(hops or [real]):
            if not is_ip(hop):
                break  # garbage in the chain: trust nothing left of it
            if not in_networks(hop, trusted):
                return hop
            peer = hop
        return peer


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def in_networks(address: str, networks) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)



class NotFoundHandler(BaseHandler):
    """Every path no route matches: an OpenAI-style 404."""
