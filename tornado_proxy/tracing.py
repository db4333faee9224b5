"""OpenTelemetry tracing (optional): one SERVER span per LLM request and a CLIENT span per
upstream attempt, with the GenAI semantic-convention attributes, exported over OTLP/HTTP
(protobuf) by a ``BatchSpanProcessor`` in its own background thread.

Switched on by ``litellm_settings.callbacks`` (or ``success_callback`` / ``failure_callback``)
naming ``"otel"``, as in LiteLLM, or by ``OTEL_EXPORTER_OTLP_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` being set. Off, nothing here is built and the handler
pays one ``None`` check. The OpenTelemetry packages (the ``otel`` extra) are imported only by
``Tracer.start``: importing this module imports none of them.

Prompt and completion text is never recorded unless ``litellm_settings.otel_log_content`` (or
``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``) asks for it, and
``turn_off_message_logging: true`` always wins.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import unquote

import orjson

from .cachekey import StreamAssembler
from .config import CALLBACK_KEYS, ConfigError, public_url
from .errors import ProxyError, UpstreamConnectionError, UpstreamTimeoutError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'tornado-proxy[otel]'"
REQUIRED_MODULES = ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http")
OTEL_CALLBACK = "otel"
TRACES_PATH = "/v1/traces"
DEFAULT_ENDPOINT = "http://localhost:4318" + TRACES_PATH
DEFAULT_SERVICE_NAME = "litellm"  # LiteLLM's default service.name: existing trace queries keep working
DEFAULT_EXPORT_TIMEOUT = 10.0     # seconds, the OTLP exporter's default
MAX_CONTENT_CHARS = 65536         # a recorded prompt or completion is cut at this many characters
TRACER_NAME = "tornado_proxy"
# gen_ai.operation.name per endpoint (GenAI semantic conventions)
OPERATIONS = {"chat": "chat", "messages": "chat", "completions": "text_completion", "embeddings": "embeddings"}
# gen_ai.provider.name: the conventions' well-known values where one exists, else the prefix
PROVIDER_NAMES = {"azure": "azure.ai.openai", "gemini": "gcp.gemini", "vertex_ai": "gcp.vertex_ai",
                  "bedrock": "aws.bedrock", "mistral": "mistral_ai", "xai": "x_ai"}
REQUEST_PARAMS = (("temperature", "gen_ai.request.temperature"), ("max_tokens", "gen_ai.request.max_tokens"),
                  ("max_completion_tokens", "gen_ai.request.max_tokens"), ("top_p", "gen_ai.request.top_p"),
                  ("frequency_penalty", "gen_ai.request.frequency_penalty"),
                  ("presence_penalty", "gen_ai.request.presence_penalty"), ("seed", "gen_ai.request.seed"))
# LiteLLM's OTEL_EXPORTER values that mean OTLP over HTTP (the only exporter here)
HTTP_EXPORTERS = ("otlp_http", "otlp", "http/protobuf", "http/json", "http")


@dataclass(frozen=True)
class TraceSettings:
    """Where and how spans are exported; None from ``parse`` when tracing is off."""

    endpoint: str
    service_name: str = DEFAULT_SERVICE_NAME
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # may hold an API key
    timeout: float = DEFAULT_EXPORT_TIMEOUT
    log_content: bool = False
    schedule_delay_ms: float | None = None  # None: the SDK's default (OTEL_BSP_SCHEDULE_DELAY, 5000)
    max_queue_size: int | None = None
    max_export_batch_size: int | None = None
    enabled_by: str = ""

    @classmethod
    def parse(cls, litellm_settings: Mapping[str, Any], environ: Mapping[str, str]) -> TraceSettings | None:
        """Pure: the settings from ``litellm_settings`` and the environment (ConfigError if bad)."""
        enabled_by = enabling_setting(litellm_settings, environ)
        if enabled_by is None:
            return None
        exporter = (environ.get("OTEL_EXPORTER") or environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                    or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "otlp_http").strip().lower()
        if exporter not in HTTP_EXPORTERS:
            raise ConfigError(f"tracing: exporter {exporter!r} (OTEL_EXPORTER / OTEL_EXPORTER_OTLP_PROTOCOL) is not "
                              "supported: this gateway exports OTLP over HTTP (protobuf); point "
                              "OTEL_EXPORTER_OTLP_ENDPOINT at the collector's HTTP port (4318)")
        return cls(
            endpoint=traces_endpoint(environ), service_name=environ.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE_NAME,
            headers=parse_headers(first_env(environ, "OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS",
                                            "OTEL_HEADERS")),
            timeout=env_number(environ, DEFAULT_EXPORT_TIMEOUT, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
                               "OTEL_EXPORTER_OTLP_TIMEOUT"),
            log_content=content_logging(litellm_settings, environ),
            schedule_delay_ms=env_number(environ, None, "OTEL_BSP_SCHEDULE_DELAY"),
            max_queue_size=env_int(environ, "OTEL_BSP_MAX_QUEUE_SIZE"),
            max_export_batch_size=env_int(environ, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"),
            enabled_by=enabled_by)


def callback_names(litellm_settings: Mapping[str, Any], key: str) -> tuple[str, ...]:
    """The callbacks one of LiteLLM's callback keys names (a list, or one string)."""
    value = litellm_settings.get(key)
    if isinstance(value, str):
        return (value,)
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, (list, tuple)) else ()


def enabling_setting(litellm_settings: Mapping[str, Any], environ: Mapping[str, str]) -> str | None:
    """What switches tracing on (for the start-up line), or None."""
    for key in CALLBACK_KEYS:
        if OTEL_CALLBACK in callback_names(litellm_settings, key):
            return f'litellm_settings.{key}: ["otel"]'
    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        if environ.get(name):
            return name
    return None


def first_env(environ: Mapping[str, str], *names: str) -> str:
    return next((environ[n] for n in names if environ.get(n)), "")


def traces_endpoint(environ: Mapping[str, str]) -> str:
    """The full URL spans are POSTed to. The per-signal variable is used as it is; a base URL
    (``OTEL_EXPORTER_OTLP_ENDPOINT``, LiteLLM's ``OTEL_ENDPOINT``) gets ``/v1/traces``."""
    exact = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if exact:
        return exact
    base = first_env(environ, "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_ENDPOINT")
    if not base:
        return DEFAULT_ENDPOINT
    base = base.rstrip("/")
    return base if base.endswith(TRACES_PATH) else base + TRACES_PATH


def parse_headers(text: str) -> tuple[tuple[str, str], ...]:
    """``key=value,key2=value2`` with URL-encoded values (the OTLP exporter's format)."""
    out = []
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if sep and name.strip():
            out.append((unquote(name.strip()).lower(), unquote(value.strip())))
    return tuple(out)


def env_number(environ: Mapping[str, str], default: float | None, *names: str) -> float | None:
    for name in names:
        text = environ.get(name)
        if text:
            try:
                value = float(text)
            except ValueError:
                raise ConfigError(f"tracing: {name} must be a number, got {text!r}") from None
            if value <= 0:
                raise ConfigError(f"tracing: {name} must be greater than 0, got {text!r}")
            return value
    return default


def env_int(environ: Mapping[str, str], name: str) -> int | None:
    value = env_number(environ, None, name)
    return None if value is None else max(int(value), 1)


def content_logging(litellm_settings: Mapping[str, Any], environ: Mapping[str, str]) -> bool:
    """Prompts and completions go into spans only when asked for; turn_off_message_logging wins."""
    if litellm_settings.get("turn_off_message_logging") is True:
        return False
    if litellm_settings.get("otel_log_content") is True:
        return True
    return environ.get("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "").strip().lower() == "true"


def check_installed(settings: TraceSettings) -> None:
    """A clear one-line start-up error when tracing is on but the packages are missing."""
    for name in REQUIRED_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise ConfigError(f"tracing is on ({settings.enabled_by}) but the OpenTelemetry packages are not "
                              f"installed (no module {name}): {INSTALL_HINT}")


def provider_name(provider: str) -> str:
    return PROVIDER_NAMES.get(provider, provider)


def error_type(exc: ProxyError) -> str:
    """error.type: low-cardinality, as the conventions ask (never the message)."""
    if isinstance(exc, UpstreamTimeoutError):
        return "timeout"
    if isinstance(exc, UpstreamConnectionError):
        return "connection_error"
    return str(exc.status)


def content_json(value: Any) -> str:
    text = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    return text if len(text) <= MAX_CONTENT_CHARS else text[:MAX_CONTENT_CHARS] + "...(truncated)"


def output_messages(answer: dict) -> list:
    """gen_ai.output.messages of an OpenAI-shaped answer: each choice's message (or text)."""
    out = []
    for choice in answer.get("choices") or ():
        if isinstance(choice, dict):
            message = choice.get("message") if isinstance(choice.get("message"), dict) else {
                "role": "assistant", "content": choice.get("text")}
            out.append({**message, "finish_reason": choice.get("finish_reason")})
    return out


def finish_reasons(answer: dict) -> list[str]:
    return [c["finish_reason"] for c in answer.get("choices") or ()
            if isinstance(c, dict) and isinstance(c.get("finish_reason"), str)]


class Tracer:
    """The gateway's tracer: built by ``start`` (imports OpenTelemetry), flushed by ``stop``."""

    def __init__(self, settings: TraceSettings):
        self.settings = settings
        self.provider = None
        self.otel = None  # the few OpenTelemetry names the spans use, once started

    def start(self) -> None:
        check_installed(self.settings)
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        s = self.settings
        exporter = OTLPSpanExporter(endpoint=s.endpoint, headers=dict(s.headers), timeout=s.timeout)
        options = {"schedule_delay_millis": s.schedule_delay_ms, "max_queue_size": s.max_queue_size,
                   "max_export_batch_size": s.max_export_batch_size}
        processor = BatchSpanProcessor(exporter, **{k: v for k, v in options.items() if v is not None})
        # a provider of our own (no process-global set_tracer_provider): one per Gateway
        self.provider = TracerProvider(resource=Resource.create({"service.name": s.service_name}))
        self.provider.add_span_processor(processor)
        self.otel = OTel(tracer=self.provider.get_tracer(TRACER_NAME), propagator=TraceContextTextMapPropagator(),
                         kind=trace.SpanKind, status=trace.Status, code=trace.StatusCode,
                         in_context=trace.set_span_in_context)
        log.info("tracing on (%s): OTLP/HTTP spans to %s as service %r%s", s.enabled_by, public_url(s.endpoint),
                 s.service_name, ", with prompt and completion text" if s.log_content else "")

    async def stop(self, timeout_s: float) -> None:
        """Flush and shut the exporter down off the event loop; a collector that is down costs
        at most ``timeout_s`` here (the export thread is a daemon, so it never holds the exit)."""
        provider, self.provider = self.provider, None
        if provider is None:
            return
        try:
            await asyncio.wait_for(asyncio.to_thread(provider.shutdown), timeout_s)
        except asyncio.TimeoutError:
            log.warning("tracing: spans not exported within %.0fs of shutdown were dropped", timeout_s)

    def request(self, headers, method: str, route: str, endpoint: str, started_at: float) -> RequestTrace | None:
        return RequestTrace(self, headers, method, route, endpoint, started_at) if self.otel is not None else None


@dataclass(frozen=True)
class OTel:
    tracer: Any
    propagator: Any
    kind: Any
    status: Any
    code: Any
    in_context: Any


class RequestTrace:
    """The spans of one LLM request; the handler calls these few methods and nothing else."""

    def __init__(self, tracer: Tracer, headers, method: str, route: str, endpoint: str, started_at: float):
        otel = self.otel = tracer.otel
        self.log_content = tracer.settings.log_content
        self.operation = OPERATIONS.get(endpoint, endpoint)
        carrier = {name: headers[name] for name in ("traceparent", "tracestate") if name in headers}
        parent = otel.propagator.extract(carrier) if carrier else None  # join the caller's trace
        self.span = otel.tracer.start_span(
            f"{method} {route}", context=parent, kind=otel.kind.SERVER, start_time=int(started_at * 1e9),
            attributes={"http.request.method": method, "http.route": route,
                        "gen_ai.operation.name": self.operation})
        self.attempt_span = None
        self.ended = False  # the request has ended; the span waits for its open attempt span
        self.error: ProxyError | None = None
        self.response_model: str | None = None
        self.assembler = StreamAssembler() if self.log_content else None

    def request_body(self, body: dict) -> None:
        """The request's model and sampling parameters (and, only if asked, its messages)."""
        attrs = {"gen_ai.request.model": body.get("model")}
        for name, attr in REQUEST_PARAMS:
            value = body.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                attrs[attr] = value
        if self.log_content:
            prompt = body.get("messages", body.get("prompt", body.get("input")))
            if prompt is not None:
                attrs["gen_ai.input.messages"] = content_json(prompt)
            if body.get("system") is not None:
                attrs["gen_ai.system_instructions"] = content_json(body["system"])
        self.span.set_attributes({k: v for k, v in attrs.items() if v is not None})

    def start_attempt(self, d, retries: int) -> None:
        """A CLIENT span under the request span for one call to one deployment."""
        otel, provider = self.otel, provider_name(d.provider)
        self.response_model = None
        self.attempt_span = otel.tracer.start_span(
            f"{self.operation} {d.model}", context=otel.in_context(self.span), kind=otel.kind.CLIENT,
            attributes={"gen_ai.operation.name": self.operation, "gen_ai.provider.name": provider,
                        "gen_ai.system": provider, "gen_ai.request.model": d.model,
                        "litellm.model_group": d.model_name, "litellm.model_id": d.id,
                        "litellm.attempt": retries + 1,
                        **({"server.address": d.public_api_base} if d.public_api_base else {})})

    def end_attempt(self, usage: dict | None, error: ProxyError | None) -> None:
        span, self.attempt_span = self.attempt_span, None
        if span is None:
            return
        error = error or self.error  # a stream that ended with an error event
        if error is not None:
            self.mark_failed(span, error, error.status)
        else:
            span.set_attribute("http.response.status_code", 200)
            self.set_usage(span, usage)
        span.end()
        if self.ended:
            self.span.end()

    def stream_payloads(self, payloads: list[bytes]) -> None:
        """Chunks relayed to the client: the first names the answering model; with content
        logging on, all are assembled into the completion text."""
        if self.response_model is None and payloads:
            self.response_model = self.model_of(payloads[0]) or ""
        if self.assembler is not None:
            for p in payloads:
                self.assembler.add(p)

    def response_body(self, data: bytes) -> None:
        """A plain (non-stream) answer: its model, finish reasons (and, if asked, its text)."""
        try:
            answer = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if isinstance(answer, dict):
            self.response_answer(answer)

    def response_answer(self, answer: dict) -> None:
        self.response_model = answer.get("model") if isinstance(answer.get("model"), str) else ""
        reasons = finish_reasons(answer)
        if reasons:
            self.span.set_attribute("gen_ai.response.finish_reasons", reasons)
        if isinstance(answer.get("id"), str):
            self.span.set_attribute("gen_ai.response.id", answer["id"])
        if self.log_content:
            self.span.set_attribute("gen_ai.output.messages", content_json(output_messages(answer)))

    @staticmethod
    def model_of(payload: bytes) -> str | None:
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return None
        if isinstance(chunk, dict):
            model = chunk.get("model") or (chunk.get("message") or {}).get("model")  # Anthropic message_start
            return model if isinstance(model, str) else None
        return None

    def failed(self, error: ProxyError) -> None:
        """The answer is an error (or a stream ended with one)."""
        self.error = error

    def end(self, ctx, status: int) -> None:
        """Once, when the request ends (whatever way): the outcome and the litellm attributes.
        The answer is finished inside its attempt, so an open attempt span ends the request span."""
        span, d = self.span, ctx.deployment
        span.set_attributes({
            "http.response.status_code": status, "litellm.call_id": ctx.call_id,
            "litellm.model_group": ctx.model_group or "", "litellm.retries": ctx.retries,
            "litellm.fallbacks": ctx.fallbacks, "litellm.cache_hit": ctx.cache_hit, "litellm.stream": ctx.stream})
        if d is not None:
            provider = provider_name(d.provider)
            span.set_attributes({"gen_ai.provider.name": provider, "gen_ai.system": provider,
                                 "litellm.model_id": d.id})
        if ctx.stream and ctx.first_token_s:
            span.set_attribute("litellm.time_to_first_token_s", ctx.first_token_s)
        self.set_usage(span, ctx.usage)
        if self.assembler is not None and ctx.stream:
            answer = self.assembler.answer()
            if answer is not None:
                span.set_attribute("gen_ai.output.messages", content_json(output_messages(answer)))
        if self.error is not None:  # the status sent stays (a stream that failed mid-way sent 200)
            self.mark_failed(span, self.error, status)
        elif status >= 400:
            span.set_attribute("error.type", str(status))
            span.set_status(self.otel.status(self.otel.code.ERROR, str(status)))
        self.ended = True
        if self.attempt_span is None:
            span.end()

    def set_usage(self, span, usage: dict | None) -> None:
        if self.response_model:
            span.set_attribute("gen_ai.response.model", self.response_model)
        if not usage:
            return
        for key, attr in (("prompt_tokens", "gen_ai.usage.input_tokens"),
                          ("completion_tokens", "gen_ai.usage.output_tokens")):
            value = usage.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                span.set_attribute(attr, value)

    def mark_failed(self, span, error: ProxyError, status: int) -> None:
        span.set_attributes({"error.type": error_type(error), "http.response.status_code": status})
        span.set_status(self.otel.status(self.otel.code.ERROR, f"{error.status} {error.type}"))
