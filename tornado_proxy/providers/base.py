"""The provider adapter interface: pure translation between OpenAI-shaped requests and a
provider's wire format. Adapters do no I/O; ``upstream.py`` sends what they build."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Mapping
from urllib.parse import quote, unquote

import orjson

from ..config import Secret, public_url
from ..errors import InvalidRequestError, ProxyError, UpstreamError
from ..scrub import Scrubber
from ..sse import SseParser


@dataclass(frozen=True)
class Deployment:
    """One ``model_list`` entry, ready to call."""

    id: str
    model_name: str
    provider: str
    model: str                       # the provider's model id (prefix stripped)
    api_base: str | None = None
    api_key: Secret | None = None
    api_version: str | None = None
    weight: float = 1.0
    rpm: int | None = None
    tpm: int | None = None
    order: int | None = None
    timeout: float | None = None
    stream_timeout: float | None = None
    mock_response: Any = None
    ssl_verify: bool | str | None = None  # litellm_params.ssl_verify: None = the gateway's default
    defaults: Mapping[str, Any] = field(default_factory=dict)      # request params the config sets
    extra_headers: Mapping[str, str] = field(default_factory=dict)
    public_params: Mapping[str, Any] = field(default_factory=dict)  # litellm_params minus secrets
    model_info: Mapping[str, Any] = field(default_factory=dict)
    source: str = "yaml"
    problem: str | None = None       # why it cannot be served (unsupported provider, no api_base)

    @cached_property
    def public_api_base(self) -> str:  # every answer's x-litellm-model-api-base: parsed once
        return public_url(self.api_base)

    @cached_property
    def scrubber(self) -> Scrubber:
        """Takes this deployment's secrets out of its provider's error text (built on first use)."""
        return Scrubber.of(self.api_key.reveal() if self.api_key else None, self.extra_headers)


@dataclass(frozen=True)
class ProviderDefaults:
    api_base: str | None = None
    api_key: str | None = None
    api_version: str | None = None   # Azure's api-version query parameter
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class UpstreamRequest:
    url: str
    method: str
    headers: Mapping[str, str]
    body: bytes | None


@dataclass
class UpstreamReply:
    status: int
    headers: Mapping[str, str]
    body: bytes


@dataclass
class ProviderResponse:
    """A translated, OpenAI-shaped reply: the bytes to send, and the usage they carry."""

    body: bytes
    usage: dict | None = None


@dataclass
class StreamState:
    """What a provider remembers across the events of one stream."""

    usage: dict | None = None
    done: bool = False
    chunks: int = 0
    include_usage: bool = False      # the client asked for stream_options.include_usage
    error: ProxyError | None = None  # the provider reported an error inside the stream
    extra: dict = field(default_factory=dict)


class Provider:
    """Base adapter. Subclasses override the translation steps they need."""

    name = "base"
    local = False  # True: answered in-process, nothing goes upstream
    # Endpoints whose client format is this provider's own wire format (``/v1/messages`` for
    # Anthropic): the body is passed through, not translated from OpenAI's.
    passthrough_endpoints: frozenset[str] = frozenset()
    # What a streamed reply's Content-Type must be (its media type, parameters aside): anything
    # else answering a streamed request (a plain JSON 200) is an upstream error, not a stream.
    stream_media_types: tuple[str, ...] = ("text/event-stream",)
    # The images, audio and moderations endpoints the provider serves (``openai.MEDIA_ENDPOINTS``)
    media_endpoints: frozenset[str] = frozenset()

    def defaults(self, environ: Mapping[str, str]) -> ProviderDefaults:
        """What a deployment of this provider uses when its config gives nothing."""
        return ProviderDefaults()

    def endpoint_for(self, d: Deployment, endpoint: str) -> str:
        """The endpoint a call to ``d`` goes through: ``endpoint`` itself, unless the adapter
        serves it through another of the upstream's APIs (a text completion on a chat-only
        model: ``completions_chat.COMPLETIONS_VIA_CHAT``)."""
        return endpoint

    def build_request(self, d: Deployment, endpoint: str, body: dict, stream: bool) -> UpstreamRequest:
        raise NotImplementedError

    def build_upload_request(self, d: Deployment, endpoint: str, content_type: str) -> UpstreamRequest:
        """The head of a multipart/form-data upload of ``content_type`` (body sent separately)."""
        raise NotImplementedError

    def parse_response(self, endpoint: str, reply: UpstreamReply) -> ProviderResponse:
        raise NotImplementedError

    def stream_parser(self):
        """What splits the upstream body into events (``feed(bytes) -> [event]``, each with ``.data``):
        SSE by default; NDJSON providers return their own."""
        return SseParser()

    def parse_event(self, endpoint: str, data: bytes, state: StreamState) -> list[bytes]:
        """One SSE ``data:`` payload from upstream -> the ``data:`` payloads to send on."""
        raise NotImplementedError

    def parse_error(self, reply: UpstreamReply, d: Deployment) -> ProxyError:
        raise NotImplementedError

    def count_tokens(self, d: Deployment, body: dict) -> int | None:
        """The input tokens of an OpenAI chat request as this provider would bill them, when
        that can be known without calling it; None when it cannot."""
        return None


def reply_object(body: bytes, who: str) -> dict:
    """A provider's JSON reply as an object; anything else is a 502 naming the provider."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise UpstreamError(f"{who} returned a response that is not JSON.", status=502) from None
    if not isinstance(parsed, dict):
        raise UpstreamError(f"{who} returned an unexpected response.", status=502)
    return parsed


def require_field(parsed: dict, who: str, *alternatives: tuple[str, type]) -> dict:
    """A reply object that has at least one of the (name, type) fields a real reply always
    has; anything else (``{}``, another API's answer) is a 502, never a success."""
    if not any(isinstance(parsed.get(name), kind) for name, kind in alternatives):
        names = " or ".join(f"'{name}'" for name, _ in alternatives)
        raise UpstreamError(f"{who} returned an unexpected response (no {names} in it).", status=502)
    return parsed


def event_object(data: bytes) -> dict | None:
    """One streamed event as a JSON object; None for anything else (see ``bad_event``)."""
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None


def bad_event(who: str) -> UpstreamError:
    """The error a stream ends with when the provider sends an event that is not a JSON object."""
    return UpstreamError(f"{who} sent a stream event that is not a JSON object; the stream was stopped.",
                         status=502)


# --- request-derived values in upstream URLs ---------------------------------------------------

# C0 controls, DEL, C1 controls (U+0085 among them) and the Unicode line/paragraph separators:
# none belongs in a model name, and each could split a header value or a log line.
CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
MAX_PERCENT_DECODES = 3  # "%25252e" (triple-encoded ".") still decodes; deeper is refused
# What would end a URL's path (query, fragment) or count as a separator to some servers.
PATH_FORBIDDEN = {"?": "'?'", "#": "'#'", "\\": "a backslash"}
SEGMENT_FORBIDDEN = {**PATH_FORBIDDEN, "/": "'/'"}


def percent_decoded(value: str) -> str | None:
    """``value`` with percent-escapes undone until nothing changes, so that ``%2e``, ``%252e``
    and ``.`` look alike; None when it is encoded more deeply than anyone legitimately does."""
    for _ in range(MAX_PERCENT_DECODES + 1):
        decoded = unquote(value)
        if decoded == value:
            return value
        value = decoded
    return None


def path_problem(value: str, segment: bool = False) -> str | None:
    """Why ``value`` could steer a URL it is put into (a ``.``/``..`` segment, a query or
    fragment, a backslash, a control character; with ``segment``, also a slash or nothing at
    all), as it is or once percent-decoded; None if it cannot. Without ``segment``, slashes
    between ordinary segments are allowed (``openrouter/openai/gpt-4o``)."""
    decoded = percent_decoded(value)
    if decoded is None:
        return "it is percent-encoded too many times"
    if CONTROL_CHARS.search(value) or CONTROL_CHARS.search(decoded):
        return "it contains control characters"
    for char, name in (SEGMENT_FORBIDDEN if segment else PATH_FORBIDDEN).items():
        if char in decoded:
            return f"it contains {name}" + (" (percent-encoded)" if char not in value else "")
    if any(part in (".", "..") for part in decoded.split("/")):
        return "it contains a '.' or '..' path segment" + (" (percent-encoded)" if decoded != value else "")
    if segment and not value:
        return "it is empty"
    return None


def url_segment(value: str, param: str = "model") -> str:
    """``value`` (a model or deployment name, or anything else a request decides) as exactly one
    URL path segment, percent-encoded; a 400 naming ``param`` when it could be anything else
    (a slash, a dot segment, a query, a fragment, a control character, encoded or not).

    Every provider that puts a request-derived value in a URL path builds it with this."""
    problem = path_problem(value, segment=True)
    if problem is not None:
        raise InvalidRequestError(f"Invalid {param} name: {problem}; the provider takes it as one URL path "
                                  "segment.", param=param)
    return quote(value, safe="")
