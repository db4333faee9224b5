"""OpenAI and every OpenAI-compatible server (OpenRouter, Azure OpenAI, vLLM, Groq, DeepSeek,
Together, Mistral, ...). The differences between them are data: default base URL, key variable,
path template, auth header, api-version query, extra headers and parameter renames.

A text completion on a chat-only model (``gpt-4o``, ``model_info.mode: chat``) is sent to the
chat endpoint and its answer turned back into a ``text_completion`` (``completions_chat.py``)."""

from __future__ import annotations

import dataclasses
from typing import Mapping
from urllib.parse import quote

import orjson

from ..errors import ProxyError, upstream_error
from ..sse import DONE
from .base import (Deployment, Provider, ProviderDefaults, ProviderResponse, StreamState,
                   UpstreamReply, UpstreamRequest, bad_event, event_object, reply_object, require_field,
                   url_segment)
from .completions_chat import (COMPLETIONS_VIA_CHAT, chat_request, serves_completions_as_chat,
                               text_completion_bytes, text_completion_chunk)
from .responses_format import chat_usage

ENDPOINT_PATHS = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings",
                  COMPLETIONS_VIA_CHAT: "/chat/completions", "moderation": "/moderations",
                  "image_generation": "/images/generations", "audio_speech": "/audio/speech",
                  "audio_transcription": "/audio/transcriptions", "audio_translation": "/audio/translations",
                  "responses": "/responses"}
# The images, audio and moderations endpoints: OpenAI's, Azure's and every compatible server's.
MEDIA_ENDPOINTS = frozenset(("moderation", "image_generation", "audio_speech", "audio_transcription",
                             "audio_translation"))
# What a 2xx JSON reply always has, per endpoint (chat and completions: choices).
REPLY_FIELDS = {"embeddings": ("data", list), "image_generation": ("data", list), "moderation": ("results", list)}
# Fields LiteLLM reads for itself; they are never sent to a provider.
PROXY_ONLY_FIELDS = ("mock_response", "api_key", "api_base", "caching", "fallbacks", "num_retries",
                     "context_window_fallbacks", "litellm_metadata", "guardrails", "tags", "drop_params")
MAX_ERROR_MESSAGE = 2000
USAGE_ENDPOINTS = ("chat", "completions")  # where a stream can carry usage (stream_options.include_usage)


class OpenAIProvider(Provider):
    name = "openai"
    default_base: str | None = "https://api.openai.com/v1"
    key_envs: tuple[str, ...] = ("OPENAI_API_KEY",)
    base_envs: tuple[str, ...] = ("OPENAI_API_BASE", "OPENAI_BASE_URL")
    renames: Mapping[str, str] = {}
    stream_usage = True  # asks for stream_options.include_usage on every stream
    media_endpoints = MEDIA_ENDPOINTS
    # OpenAI's own API serves /v1/responses; OpenAI-compatible servers get it translated to chat
    passthrough_endpoints = frozenset({"responses"})

    def defaults(self, environ: Mapping[str, str]) -> ProviderDefaults:
        base = next((environ[e] for e in self.base_envs if environ.get(e)), self.default_base)
        key = next((environ[e] for e in self.key_envs if environ.get(e)), None)
        return ProviderDefaults(api_base=base, api_key=key, headers=self.headers(environ))

    def headers(self, environ: Mapping[str, str]) -> dict[str, str]:
        return {}

    def url(self, d: Deployment, endpoint: str) -> str:
        return (d.api_base or "").rstrip("/") + ENDPOINT_PATHS[endpoint]

    def endpoint_for(self, d: Deployment, endpoint: str) -> str:
        return COMPLETIONS_VIA_CHAT if endpoint == "completions" and serves_completions_as_chat(d) else endpoint

    def build_request(self, d: Deployment, endpoint: str, body: dict, stream: bool) -> UpstreamRequest:
        if endpoint == COMPLETIONS_VIA_CHAT:
            body = chat_request(body)
        out = {**d.defaults, **body} if d.defaults else dict(body)
        for name in PROXY_ONLY_FIELDS:
            out.pop(name, None)
        for old, new in self.renames.items():
            if old in out:
                out[new] = out.pop(old)
        out["model"] = d.model
        if stream and self.stream_usage and endpoint in USAGE_ENDPOINTS:
            # exact spend needs the usage of every stream: asked for always, and the chunk that
            # carries it is kept from a client that did not ask (parse_event)
            options = out.get("stream_options")
            out["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        headers = {"Content-Type": "application/json", **d.extra_headers, **self.auth_headers(d)}
        return UpstreamRequest(self.url(d, endpoint), "POST", headers, orjson.dumps(out))

    def build_upload_request(self, d: Deployment, endpoint: str, content_type: str) -> UpstreamRequest:
        """The head of a multipart upload (transcriptions, translations); the body is the
        gateway's re-emitted form, sent by ``upstream`` from disk."""
        headers = {"Content-Type": content_type, **d.extra_headers, **self.auth_headers(d)}
        return UpstreamRequest(self.url(d, endpoint), "POST", headers, None)

    def auth_headers(self, d: Deployment) -> dict[str, str]:
        return {"Authorization": "Bearer " + d.api_key.reveal()} if d.api_key else {}

    def stored_response_request(self, d: Deployment, method: str, response_id: str, suffix: str = "",
                                params: str = "") -> UpstreamRequest:
        """``GET`` / ``DELETE`` of a response this deployment stored (``/responses/{id}``, or a
        ``suffix`` under it such as ``/input_items``, with the client's query ``params``)."""
        url, _, query = self.url(d, "responses").partition("?")
        query = "&".join(q for q in (query, params) if q)
        url = f"{url}/{url_segment(response_id, 'response_id')}{suffix}" + (f"?{query}" if query else "")
        return UpstreamRequest(url, method, {**d.extra_headers, **self.auth_headers(d)}, None)

    def parse_response(self, endpoint: str, reply: UpstreamReply) -> ProviderResponse:
        parsed = reply_object(reply.body, "The provider")
        if endpoint == "responses":
            require_field(parsed, "The provider", ("output", list))
            return ProviderResponse(reply.body, chat_usage(parsed.get("usage")))
        require_field(parsed, "The provider", REPLY_FIELDS.get(endpoint, ("choices", list)))
        usage = parsed.get("usage")
        body = text_completion_bytes(reply.body) if endpoint == COMPLETIONS_VIA_CHAT else reply.body
        return ProviderResponse(body, usage if isinstance(usage, dict) else None)

    def parse_event(self, endpoint: str, data: bytes, state: StreamState) -> list[bytes]:
        if endpoint == "responses":
            return self.relay_response_event(data, state)
        if data == DONE:
            state.done = True
            return []
        # a cheap look first: a normal chunk is an object with no "error" key in it
        if data[:1] != b"{" or data[-1:] != b"}" or b'"error"' in data:
            error = self.stream_error(data)
            if error is not None:
                state.error = error
                return []
        state.chunks += 1
        if endpoint == COMPLETIONS_VIA_CHAT:
            chunk = event_object(data)
            if chunk is None:
                state.error = bad_event("The provider")
                return []
            usage = chunk.get("usage")
            if isinstance(usage, dict):
                state.usage = usage
                if not state.include_usage and not chunk.get("choices"):
                    return []  # the usage chunk the gateway asked for: the client did not
            if not state.include_usage:
                chunk.pop("usage", None)
            return [orjson.dumps(text_completion_chunk(chunk))]
        if b'"usage"' not in data:
            return [data]
        if b'"usage":null' in data:
            # include_usage puts "usage": null in every chunk: not for a client that did not ask
            return [data if state.include_usage else data.replace(b',"usage":null', b"")]
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            chunk = None
        usage = chunk.get("usage") if isinstance(chunk, dict) else None
        if isinstance(usage, dict):
            state.usage = usage
            if not state.include_usage and not chunk.get("choices"):
                return []  # the usage chunk the gateway asked for: the client did not
        return [data]

    def relay_response_event(self, data: bytes, state: StreamState) -> list[bytes]:
        """``/v1/responses`` pass-through: every typed event goes on as it came, but for an
        ``error`` event (or one that is not a JSON object), which ends the stream as the gateway's
        own error event, so that its text is scrubbed; the final event's usage is noted."""
        if data == DONE:
            state.done = True
            return []
        event = event_object(data) if (b'"error"' in data or b'"usage"' in data or data[:1] != b"{") else {}
        if event is None:
            state.error = bad_event("The provider")
            return []
        kind = event.get("type")
        if kind == "error":
            code = event.get("code")
            status = 429 if code == "rate_limit_exceeded" else 500
            state.error = upstream_error(status, f"{self.name.capitalize()}Exception - {error_message(data)}")
            return []
        response = event.get("response")
        if kind in ("response.completed", "response.incomplete", "response.failed") and isinstance(response, dict):
            state.usage = chat_usage(response.get("usage")) or state.usage
            state.done = True
        state.chunks += 1
        return [data]

    def stream_error(self, data: bytes) -> ProxyError | None:
        """The error an event stands for: an ``{"error": ...}`` object (OpenAI's and OpenRouter's
        in-stream errors), or anything that is not a JSON object; None for a normal chunk."""
        event = event_object(data)
        if event is None:
            return bad_event("The provider")
        err = event.get("error")
        if not err:
            return None
        code = err.get("code") if isinstance(err, dict) else None
        status = code if isinstance(code, int) and 400 <= code < 600 else 500
        return upstream_error(status, f"{self.name.capitalize()}Exception - {error_message(data)}")

    def parse_error(self, reply: UpstreamReply, d: Deployment) -> ProxyError:
        message, param = error_message(reply.body), None
        try:
            parsed = orjson.loads(reply.body)
            err = parsed.get("error") if isinstance(parsed, dict) else None
            if isinstance(err, dict):
                param = err.get("param") if isinstance(err.get("param"), str) else None
        except orjson.JSONDecodeError:
            pass
        headers = {k: v for k, v in reply.headers.items() if k.lower() == "retry-after"}
        return d.scrubber.error(upstream_error(reply.status, f"{self.label(d)}: {message}", param=param,
                                               headers=headers))

    def label(self, d: Deployment) -> str:
        return f"{self.name.capitalize()}Exception - {d.provider}/{d.model}"


def error_message(body: bytes) -> str:
    """The human part of a provider's error body, whatever shape it came in."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace").strip()
        return text[:MAX_ERROR_MESSAGE] or "(empty response body)"
    err = parsed.get("error", parsed) if isinstance(parsed, dict) else parsed
    if isinstance(err, dict):
        err = err.get("message") or err.get("detail") or err
    text = err if isinstance(err, str) else orjson.dumps(err).decode()
    return text[:MAX_ERROR_MESSAGE]


class OpenRouterProvider(OpenAIProvider):
    name = "openrouter"
    passthrough_endpoints = frozenset()
    default_base = "https://openrouter.ai/api/v1"
    key_envs = ("OPENROUTER_API_KEY", "OR_API_KEY")
    base_envs = ("OPENROUTER_API_BASE",)
    media_endpoints = frozenset()  # OpenRouter serves no images, audio or moderations API

    def headers(self, environ: Mapping[str, str]) -> dict[str, str]:
        return {"HTTP-Referer": environ.get("OR_SITE_URL") or "https://litellm.ai",
                "X-Title": environ.get("OR_APP_NAME") or "liteLLM"}


# The newest generally available version of Azure OpenAI's dated data-plane API; preview
# versions (and "v1"/"latest"/"preview", the v1 API) are chosen per deployment or AZURE_API_VERSION.
AZURE_API_VERSION = "2024-10-21"
AZURE_V1_VERSIONS = ("v1", "latest", "preview")
AZURE_FIRST_RESPONSES_VERSION = "2025-03-01-preview"  # the first dated version with /openai/responses


class AzureProvider(OpenAIProvider):
    """``azure/<deployment>``: the deployment is in the path, the key in ``api-key``, the API
    version in the query string; the body is OpenAI's (Azure ignores ``model``)."""

    name = "azure"
    default_base = None
    key_envs = ("AZURE_API_KEY", "AZURE_OPENAI_API_KEY")
    base_envs = ("AZURE_API_BASE", "AZURE_OPENAI_ENDPOINT")

    def defaults(self, environ: Mapping[str, str]) -> ProviderDefaults:
        return dataclasses.replace(super().defaults(environ),
                                   api_version=environ.get("AZURE_API_VERSION") or AZURE_API_VERSION)

    def url(self, d: Deployment, endpoint: str) -> str:
        base = (d.api_base or "").rstrip("/")
        base = base.removesuffix("/openai")  # "https://x.openai.azure.com/openai" works too
        version = d.api_version or AZURE_API_VERSION
        if endpoint == "responses" and version not in AZURE_V1_VERSIONS:
            # no deployment in the path: the body's model names it (as Azure's Responses API wants);
            # versions older than the first with a Responses API use the v1 API
            if version >= AZURE_FIRST_RESPONSES_VERSION:
                return f"{base}/openai/responses?api-version={quote(version, safe='')}"
            version = "v1"
        if version in AZURE_V1_VERSIONS:  # the v1 API: no deployment in the path, model in the body
            url = f"{base}/openai/v1{ENDPOINT_PATHS[endpoint]}"
            return url + "?api-version=preview" if version == "preview" else url
        return (f"{base}/openai/deployments/{url_segment(d.model)}{ENDPOINT_PATHS[endpoint]}"
                f"?api-version={quote(version, safe='')}")

    def auth_headers(self, d: Deployment) -> dict[str, str]:
        return {"api-key": d.api_key.reveal()} if d.api_key else {}

    def parse_event(self, endpoint: str, data: bytes, state: StreamState) -> list[bytes]:
        # Azure opens a stream with a chunk that has no choices, only prompt_filter_results;
        # OpenAI clients that read choices[0] of every chunk break on it, so it is dropped.
        if b'"prompt_filter_results"' in data:
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError:
                chunk = None
            if isinstance(chunk, dict) and not chunk.get("choices") and not chunk.get("usage"):
                return []
        return super().parse_event(endpoint, data, state)


def compatible(name: str, base: str | None, key_envs: tuple[str, ...], base_envs: tuple[str, ...] = (),
               renames: Mapping[str, str] | None = None) -> type[OpenAIProvider]:
    """An OpenAI-compatible provider that differs only in data."""
    return type(f"{name.title().replace('_', '')}Provider", (OpenAIProvider,), {
        "name": name, "default_base": base, "key_envs": key_envs, "base_envs": base_envs,
        "renames": renames or {}, "passthrough_endpoints": frozenset()})


COMPATIBLE = {
    "hosted_vllm": compatible("hosted_vllm", None, ("HOSTED_VLLM_API_KEY",), ("HOSTED_VLLM_API_BASE",)),
    "openai_like": compatible("openai_like", None, ("OPENAI_LIKE_API_KEY",), ("OPENAI_LIKE_API_BASE",)),
    "groq": compatible("groq", "https://api.groq.com/openai/v1", ("GROQ_API_KEY",), ("GROQ_API_BASE",)),
    "deepseek": compatible("deepseek", "https://api.deepseek.com/v1", ("DEEPSEEK_API_KEY",),
                           ("DEEPSEEK_API_BASE",)),
    "together_ai": compatible("together_ai", "https://api.together.xyz/v1",
                              ("TOGETHERAI_API_KEY", "TOGETHER_AI_API_KEY", "TOGETHER_API_KEY"),
                              ("TOGETHERAI_API_BASE",)),
    "mistral": compatible("mistral", "https://api.mistral.ai/v1", ("MISTRAL_API_KEY",), ("MISTRAL_API_BASE",),
                          renames={"seed": "random_seed"}),
    "fireworks_ai": compatible("fireworks_ai", "https://api.fireworks.ai/inference/v1",
                               ("FIREWORKS_AI_API_KEY", "FIREWORKS_API_KEY"), ("FIREWORKS_AI_API_BASE",)),
    "xai": compatible("xai", "https://api.x.ai/v1", ("XAI_API_KEY",), ("XAI_API_BASE",)),
    "perplexity": compatible("perplexity", "https://api.perplexity.ai", ("PERPLEXITYAI_API_KEY",
                                                                           "PERPLEXITY_API_KEY")),
    "deepinfra": compatible("deepinfra", "https://api.deepinfra.com/v1/openai", ("DEEPINFRA_API_KEY",)),
}
