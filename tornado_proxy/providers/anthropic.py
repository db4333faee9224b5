"""Anthropic (``anthropic/``): OpenAI chat <-> the Anthropic Messages API (``/v1/messages``).

Request: ``system``/``developer`` messages -> ``system`` blocks; consecutive same-role turns are
merged (Anthropic wants alternating turns); ``tool`` messages -> user ``tool_result`` blocks;
assistant ``tool_calls`` -> ``tool_use`` blocks; image parts -> base64 (data URL) or url image
sources, PDF ``file`` parts -> documents; ``stop`` -> ``stop_sequences``; tools, ``tool_choice``
and ``parallel_tool_calls`` -> Anthropic tools and ``tool_choice``; ``user`` ->
``metadata.user_id``; ``response_format`` -> a forced ``json_tool_call`` tool whose input comes
back as the message content (LiteLLM's JSON mode); ``reasoning_effort`` -> ``thinking``.
Anthropic requires ``max_tokens``: when the client gives neither it nor
``max_completion_tokens``, DEFAULT_MAX_TOKENS (4096, LiteLLM's default) is sent, plus the thinking
budget when thinking is on. OpenAI parameters Anthropic cannot honour (``seed``, ``n`` > 1,
penalties, logprobs, ...) are a 400 naming them, as LiteLLM answers, unless the request says
``drop_params: true``; parameters OpenAI does not define (``top_k``, ...) go through untouched.

Replies, stream events and error bodies come back in OpenAI's shapes. ``prompt_tokens`` counts all
input (``input_tokens`` + cache reads + cache writes, as OpenAI's does); the cache counts are
kept (``cache_read_input_tokens``, ``cache_creation_input_tokens``,
``prompt_tokens_details.cached_tokens``).

The ``messages`` and ``count_tokens`` endpoints are Anthropic's own format (``/v1/messages`` on
the gateway): passed through with the model rewritten.
"""

from __future__ import annotations

import base64
import re
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import orjson

from ..errors import InvalidRequestError, ProxyError, upstream_error
from .base import (Deployment, Provider, ProviderDefaults, ProviderResponse, StreamState,
                   UpstreamReply, UpstreamRequest, bad_event, event_object, reply_object, require_field)
from .openai import PROXY_ONLY_FIELDS, error_message

API_VERSION = "2023-06-01"
DEFAULT_BASE = "https://api.anthropic.com"
DEFAULT_MAX_TOKENS = 4096
JSON_TOOL = "json_tool_call"  # LiteLLM's name for the tool that carries response_format
THINKING_BUDGETS = {"minimal": 1024, "low": 1024, "medium": 2048, "high": 4096}
PATHS = {"chat": "/v1/messages", "messages": "/v1/messages", "count_tokens": "/v1/messages/count_tokens"}
PASSTHROUGH_DEFAULTS = ("temperature", "top_p")  # config defaults that mean the same in both formats

STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
                "model_context_window_exceeded": "length", "tool_use": "tool_calls", "refusal": "content_filter"}
# Anthropic error `type` -> the HTTP status Anthropic sends it with (for errors inside a stream).
ERROR_STATUS = {"invalid_request_error": 400, "authentication_error": 401, "billing_error": 402,
                "permission_error": 403, "not_found_error": 404, "request_too_large": 413,
                "rate_limit_error": 429, "api_error": 500, "timeout_error": 504, "overloaded_error": 529}
OVERLOADED = 529  # Anthropic's "overloaded": answered as 503, the status OpenAI clients know

# Request fields translated (or deliberately not sent); everything else unknown passes through.
TRANSLATED = frozenset({"model", "messages", "stream", "stream_options", "stop", "temperature", "top_p",
                        "max_tokens", "max_completion_tokens", "tools", "tool_choice", "parallel_tool_calls",
                        "response_format", "user", "reasoning_effort", "thinking", "metadata", "drop_params"})
# OpenAI parameters with no Anthropic equivalent.
UNSUPPORTED = ("frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "top_logprobs", "seed", "n",
               "modalities", "audio", "prediction", "service_tier", "store", "functions", "function_call",
               "web_search_options", "verbosity")

DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?:;[^,;]*)*;base64,(?P<data>.*)", re.DOTALL)
EMAIL_OR_PHONE = re.compile(r"^[a-zA-Z0-9._%+-]+@[a-zA-Z0-9.-]+\.[a-zA-Z]{2,}$|^\+?[\d\s()-]{7,}$")


def shown(value) -> str:
    """A client-supplied value quoted in an error message, cut short."""
    text = str(value)
    return text if len(text) <= 40 else text[:40] + "..."


# --- OpenAI chat request -> Anthropic request --------------------------------------------------

def to_anthropic_request(body: dict, model: str, stream: bool) -> dict:
    check_supported(body, model)
    system, messages = convert_messages(body["messages"])
    out: dict[str, Any] = {k: v for k, v in body.items() if k not in TRANSLATED and k not in PROXY_ONLY_FIELDS
                           and k not in UNSUPPORTED}
    out["model"] = model
    out["messages"] = messages
    if system:
        out["system"] = system
    thinking = body.get("thinking") or thinking_for(body.get("reasoning_effort"))
    if thinking:
        out["thinking"] = thinking
    max_tokens = next((body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None), None)
    if max_tokens is None:
        budget = thinking.get("budget_tokens", 0) if isinstance(thinking, dict) else 0
        max_tokens = DEFAULT_MAX_TOKENS + (budget if isinstance(budget, int) else 0)
    out["max_tokens"] = max_tokens
    if stream:
        out["stream"] = True
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            out[name] = body[name]
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    tools = [tool_to_anthropic(t, f"tools[{i}]") for i, t in enumerate(body.get("tools") or ())]
    choice = tool_choice_to_anthropic(body.get("tool_choice"), body.get("parallel_tool_calls"))
    json_tool = response_format_tool(body.get("response_format"))
    if json_tool:
        tools.append(json_tool)
        if not thinking:  # Anthropic refuses a forced tool while thinking
            choice = {"type": "tool", "name": JSON_TOOL}
    if tools:
        out["tools"] = tools
    if choice:
        out["tool_choice"] = choice
    user = body.get("user")
    if isinstance(user, str) and user and not EMAIL_OR_PHONE.match(user):  # Anthropic rejects those
        out["metadata"] = {"user_id": user}
    return out


def check_supported(body: dict, model: str) -> None:
    if body.get("drop_params") is True:
        return
    used = [k for k in UNSUPPORTED if body.get(k) not in (None, False) and not (k == "n" and body[k] == 1)]
    if used:
        raise InvalidRequestError(
            f"anthropic does not support parameters: {used}, for model={model}. To drop these, send "
            "`drop_params: true` with the request.", param=used[0])


def thinking_for(effort) -> dict | None:
    if effort is None or effort == "none":
        return None
    if effort not in THINKING_BUDGETS:
        raise InvalidRequestError(f"Unmapped reasoning effort: {effort}", param="reasoning_effort")
    return {"type": "enabled", "budget_tokens": THINKING_BUDGETS[effort]}


def convert_messages(messages: list) -> tuple[list[dict], list[dict]]:
    """OpenAI messages -> (system blocks, alternating Anthropic turns)."""
    system: list[dict] = []
    turns: list[dict] = []
    for i, m in enumerate(messages):
        where, role = f"messages[{i}]", m.get("role")
        if role in ("system", "developer"):
            system += with_cache_control(text_blocks(m.get("content"), where), m)
            continue
        if role == "user":
            blocks = content_blocks(m.get("content"), where)
        elif role == "assistant":
            blocks = assistant_blocks(m, where)
        elif role in ("tool", "function"):
            blocks, role = [tool_result(m, where)], "user"
        else:
            raise InvalidRequestError(f"Unsupported role '{shown(role)}' for an anthropic/ model.",
                                      param=f"{where}.role")
        blocks = with_cache_control(blocks, m)
        if not blocks:
            continue  # Anthropic refuses empty turns
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += blocks
        else:
            turns.append({"role": role, "content": blocks})
    if not turns:
        raise InvalidRequestError("anthropic/ models need at least one user or assistant message with content.",
                                  param="messages")
    for turn in turns:  # tool results must open a user turn
        if turn["role"] == "user":
            turn["content"].sort(key=lambda b: b.get("type") != "tool_result")
    return system, turns


def with_cache_control(blocks: list[dict], message: dict) -> list[dict]:
    """LiteLLM's message-level ``cache_control`` marks the message's last block."""
    if blocks and isinstance(message.get("cache_control"), dict):
        blocks[-1] = {**blocks[-1], "cache_control": message["cache_control"]}
    return blocks


def text_blocks(content, where: str) -> list[dict]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    out = []
    for j, part in enumerate(content):
        if part.get("type") != "text":
            raise InvalidRequestError(f"Only text parts are allowed here, got '{shown(part.get('type'))}'.",
                                      param=f"{where}.content[{j}].type")
        out += text_part(part)
    return out


def text_part(part: dict) -> list[dict]:
    text = part.get("text")
    if not isinstance(text, str) or not text:
        return []
    block = {"type": "text", "text": text}
    if "cache_control" in part:
        block["cache_control"] = part["cache_control"]
    return [block]


def content_blocks(content, where: str) -> list[dict]:
    """User (or tool result) content: text, images, PDF files; Anthropic-native blocks pass."""
    if content is None or isinstance(content, str):
        return text_blocks(content, where)
    out: list[dict] = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind == "text":
            out += text_part(part)
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise InvalidRequestError("image_url needs a url.", param=f"{where}.content[{j}].image_url")
            out.append(keep_cache_control({"type": "image", "source": source_of(url, f"{where}.content[{j}]")}, part))
        elif kind == "file":
            out.append(keep_cache_control(document_of(part.get("file") or {}, f"{where}.content[{j}]"), part))
        elif kind in ("input_audio", "audio"):
            raise InvalidRequestError("anthropic/ models do not accept audio input.", param=f"{where}.content[{j}]")
        else:
            out.append(part)  # already an Anthropic block (image, document, search_result, ...)
    return out


def keep_cache_control(block: dict, part: dict) -> dict:
    if "cache_control" in part:
        block["cache_control"] = part["cache_control"]
    return block


def source_of(url: str, where: str) -> dict:
    if url.startswith("data:"):
        match = DATA_URL.fullmatch(url)
        if not match:
            raise InvalidRequestError("Only base64 data URLs are supported.", param=where)
        return {"type": "base64", "media_type": match["type"] or "image/jpeg", "data": match["data"]}
    return {"type": "url", "url": url}


def document_of(file: dict, where: str) -> dict:
    data = file.get("file_data")
    if not isinstance(data, str) or not data.startswith("data:"):
        raise InvalidRequestError("File parts need file_data as a base64 data URL (file ids are OpenAI's own).",
                                  param=where)
    source = source_of(data, where)
    if source["media_type"] == "text/plain":
        return {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                               "data": base64.b64decode(source["data"]).decode("utf-8", "replace")}}
    return {"type": "document", "source": source}


def assistant_blocks(m: dict, where: str) -> list[dict]:
    out = [b for b in m.get("thinking_blocks") or () if isinstance(b, dict)]
    content = m.get("content")
    if isinstance(content, list):
        content = [p for p in content if p.get("type") != "refusal"]
    out += text_blocks(content, where)
    for j, call in enumerate(m.get("tool_calls") or ()):
        fn = call.get("function") or {}
        args = fn.get("arguments") or "{}"
        try:
            parsed = orjson.loads(args) if isinstance(args, str) else args
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise InvalidRequestError("Tool call arguments must be a JSON object.",
                                      param=f"{where}.tool_calls[{j}].function.arguments")
        out.append({"type": "tool_use", "id": call.get("id") or f"toolu_{j}", "name": fn.get("name", ""),
                    "input": parsed})
    return out


def tool_result(m: dict, where: str) -> dict:
    call_id = m.get("tool_call_id") or (m.get("name") if m.get("role") == "function" else None)
    if not call_id:
        raise InvalidRequestError("A tool message needs the tool_call_id it answers.", param=f"{where}.tool_call_id")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id}
    content = m.get("content")
    if isinstance(content, list):
        block["content"] = content_blocks(content, where)
    elif content:
        block["content"] = content
    return block


def tool_to_anthropic(tool: dict, where: str) -> dict:
    if "input_schema" in tool or tool.get("type") not in ("function", None):
        return tool  # already Anthropic's (a custom tool, or a server tool such as web_search)
    fn = tool.get("function") or {}
    if not fn.get("name"):
        raise InvalidRequestError("A function tool needs a name.", param=f"{where}.function.name")
    schema = fn.get("parameters") or {"type": "object", "properties": {}}
    out = {"name": fn["name"], "input_schema": {"type": "object", **schema}}
    if fn.get("description"):
        out["description"] = fn["description"]
    cache = tool.get("cache_control") or fn.get("cache_control")
    if cache:
        out["cache_control"] = cache
    return out


def tool_choice_to_anthropic(choice, parallel) -> dict | None:
    out: dict | None = None
    if choice == "auto":
        out = {"type": "auto"}
    elif choice == "required":
        out = {"type": "any"}
    elif choice == "none":
        out = {"type": "none"}
    elif isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") or choice.get("name")
        out = {"type": "tool", "name": name} if choice.get("type") in ("function", "tool") else dict(choice)
    if parallel is not None and choice != "none":
        out = {**(out or {"type": "auto"}), "disable_parallel_tool_use": not parallel}
    return out


def response_format_tool(fmt) -> dict | None:
    if not isinstance(fmt, dict) or fmt.get("type") not in ("json_object", "json_schema"):
        return None
    schema = (fmt.get("json_schema") or {}).get("schema") if fmt["type"] == "json_schema" else None
    if not schema:
        schema = {"type": "object", "additionalProperties": True, "properties": {}}
    return {"name": JSON_TOOL, "input_schema": {"type": "object", **schema}}


# --- Anthropic reply -> OpenAI chat.completion -------------------------------------------------

def finish_reason(stop_reason):
    """Known stop reasons mapped; an unknown one is passed on as LiteLLM does."""
    return STOP_REASONS.get(stop_reason, stop_reason)


def openai_usage(usage) -> dict | None:
    if not isinstance(usage, dict):
        return None
    read = usage.get("cache_read_input_tokens") or 0
    written = usage.get("cache_creation_input_tokens") or 0
    prompt = (usage.get("input_tokens") or 0) + read + written
    completion = usage.get("output_tokens") or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": read},
            "cache_creation_input_tokens": written, "cache_read_input_tokens": read}


def to_openai_response(msg: dict) -> dict:
    text, reasoning, thinking, calls = "", "", [], []
    for block in msg.get("content") or ():
        kind = block.get("type")
        if kind == "text":
            text += block.get("text") or ""
        elif kind == "tool_use":
            calls.append({"id": block.get("id"), "type": "function", "function": {
                "name": block.get("name"), "arguments": orjson.dumps(block.get("input") or {}).decode()}})
        elif kind in ("thinking", "redacted_thinking"):
            thinking.append(block)
            reasoning += block.get("thinking") or ""
    finish = finish_reason(msg.get("stop_reason"))
    if len(calls) == 1 and calls[0]["function"]["name"] == JSON_TOOL:  # JSON mode: the input is the answer
        text, calls, finish = text + calls[0]["function"]["arguments"], [], "stop"
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    if thinking:
        message["reasoning_content"] = reasoning
        message["thinking_blocks"] = thinking
    return {"id": msg.get("id"), "object": "chat.completion", "created": int(time.time()), "model": msg.get("model"),
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": openai_usage(msg.get("usage")), "system_fingerprint": None}


# --- Anthropic event stream -> OpenAI chunks ---------------------------------------------------

@dataclass
class EventsToChunks:
    """One stream's translation state: content block index -> what the block became."""

    include_usage: bool
    id: str = ""
    model: str = ""
    created: int = 0
    blocks: dict[int, tuple[str, int]] = field(default_factory=dict)  # index -> (kind, tool index)
    tools: int = 0
    json_mode: bool = False
    usage: dict = field(default_factory=dict)  # Anthropic's, cumulative

    def chunk(self, delta: dict, finish=None) -> bytes:
        out = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
               "system_fingerprint": None,
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if self.include_usage:
            out["usage"] = None
        return orjson.dumps(out)

    def feed(self, event: dict, state: StreamState) -> list[bytes]:
        kind = event.get("type")
        if kind == "message_start":
            msg = event.get("message") or {}
            self.id, self.model, self.created = msg.get("id") or "", msg.get("model") or "", int(time.time())
            self.usage.update(msg.get("usage") or {})
            state.usage = openai_usage(self.usage)
            return [self.chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            return self.block_start(event.get("index", 0), event.get("content_block") or {})
        if kind == "content_block_delta":
            return self.block_delta(self.blocks.get(event.get("index", 0), ("other", 0)), event.get("delta") or {})
        if kind == "message_delta":
            self.usage.update({k: v for k, v in (event.get("usage") or {}).items() if v is not None})
            state.usage = openai_usage(self.usage)
            reason = finish_reason((event.get("delta") or {}).get("stop_reason"))
            if self.json_mode and reason == "tool_calls":
                reason = "stop"
            return [self.chunk({}, reason)]
        if kind == "message_stop":
            state.done = True
            if not self.include_usage:
                return []
            return [orjson.dumps({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                  "model": self.model, "system_fingerprint": None, "choices": [],
                                  "usage": state.usage})]
        if kind == "error":
            state.error = stream_error(event.get("error") or {})
        return []  # ping, content_block_stop, and event types added after this was written

    def block_start(self, index: int, block: dict) -> list[bytes]:
        kind = block.get("type")
        if kind == "tool_use" and block.get("name") == JSON_TOOL:
            self.blocks[index] = ("json", 0)
            self.json_mode = True
            return []
        if kind == "tool_use":
            self.blocks[index] = ("tool", self.tools)
            self.tools += 1
            call = {"index": self.tools - 1, "id": block.get("id"), "type": "function",
                    "function": {"name": block.get("name"), "arguments": ""}}
            return [self.chunk({"tool_calls": [call]})]
        if kind == "text":
            self.blocks[index] = ("text", 0)
            return [self.chunk({"content": block["text"]})] if block.get("text") else []
        if kind == "thinking":
            self.blocks[index] = ("thinking", 0)
            return [self.chunk({"reasoning_content": block["thinking"]})] if block.get("thinking") else []
        self.blocks[index] = ("other", 0)
        return []

    def block_delta(self, block: tuple[str, int], delta: dict) -> list[bytes]:
        kind, tool = block
        dtype = delta.get("type")
        if dtype == "text_delta" and delta.get("text"):
            return [self.chunk({"content": delta["text"]})]
        if dtype == "thinking_delta" and delta.get("thinking"):
            return [self.chunk({"reasoning_content": delta["thinking"]})]
        if dtype == "input_json_delta" and delta.get("partial_json"):
            if kind == "json":
                return [self.chunk({"content": delta["partial_json"]})]
            if kind == "tool":
                return [self.chunk({"tool_calls": [{"index": tool, "function": {"arguments": delta["partial_json"]}}]})]
        return []


def stream_error(error: dict) -> ProxyError:
    status = ERROR_STATUS.get(error.get("type"), 500)
    err = upstream_error(503 if status == OVERLOADED else status,
                         f"AnthropicException - {error.get('message') or error.get('type') or 'stream error'}")
    if status == OVERLOADED:
        err.type = "overloaded_error"
    return err


# --- the adapter -------------------------------------------------------------------------------

class AnthropicProvider(Provider):
    name = "anthropic"
    passthrough_endpoints = frozenset({"messages", "count_tokens"})

    def defaults(self, environ: Mapping[str, str]) -> ProviderDefaults:
        base = environ.get("ANTHROPIC_API_BASE") or environ.get("ANTHROPIC_BASE_URL") or DEFAULT_BASE
        return ProviderDefaults(api_base=base, api_key=environ.get("ANTHROPIC_API_KEY") or None)

    def url(self, d: Deployment, endpoint: str) -> str:
        base = (d.api_base or DEFAULT_BASE).rstrip("/")
        for suffix in ("/v1/messages", "/v1"):  # LiteLLM accepts the base with either
            if base.endswith(suffix):
                base = base[: -len(suffix)]
                break
        return base + PATHS[endpoint]

    def build_request(self, d: Deployment, endpoint: str, body: dict, stream: bool) -> UpstreamRequest:
        if endpoint == "chat":
            out = to_anthropic_request({**d.defaults, **body} if d.defaults else body, d.model, stream)
        elif endpoint in PATHS:
            out = {k: v for k, v in body.items() if k not in PROXY_ONLY_FIELDS}
            if endpoint == "messages":
                out = {**{k: d.defaults[k] for k in PASSTHROUGH_DEFAULTS if k in d.defaults}, **out}
            out["model"] = d.model
        else:
            raise InvalidRequestError(f"anthropic/ models serve chat and /v1/messages, not {endpoint}.",
                                      param="model")
        headers = {"Content-Type": "application/json", "anthropic-version": API_VERSION, **d.extra_headers}
        if d.api_key:
            headers["x-api-key"] = d.api_key.reveal()
        return UpstreamRequest(self.url(d, endpoint), "POST", headers, orjson.dumps(out))

    def parse_response(self, endpoint: str, reply: UpstreamReply) -> ProviderResponse:
        parsed = reply_object(reply.body, "Anthropic")
        require_field(parsed, "Anthropic", ("input_tokens", int) if endpoint == "count_tokens" else ("content", list))
        if endpoint == "chat":
            out = to_openai_response(parsed)
            return ProviderResponse(orjson.dumps(out), out["usage"])
        return ProviderResponse(reply.body, openai_usage(parsed.get("usage")))

    def parse_event(self, endpoint: str, data: bytes, state: StreamState) -> list[bytes]:
        if state.error is not None:
            return []  # Anthropic ends the stream after an error; nothing after it counts
        if endpoint != "chat":
            return self.relay_event(data, state)
        event = event_object(data)
        if event is None:
            state.error = bad_event("Anthropic")
            return []
        translator = state.extra.get("anthropic")
        if translator is None:
            translator = state.extra["anthropic"] = EventsToChunks(include_usage=state.include_usage)
        out = translator.feed(event, state)
        state.chunks += len(out)
        return out

    def relay_event(self, data: bytes, state: StreamState) -> list[bytes]:
        """``/v1/messages`` pass-through: every event goes on as it came, but for errors (an
        ``error`` event or one that is not a JSON object), which end the stream as the
        gateway's own error event, so that their text is scrubbed; usage is noted."""
        if data[:1] != b"{" or data[-1:] != b"}" or b'"error"' in data:
            event = event_object(data)
            if event is None or event.get("type") == "error":
                state.error = bad_event("Anthropic") if event is None else stream_error(event.get("error") or {})
                return []
        state.chunks += 1
        if b'"usage"' in data or b'"message_stop"' in data:
            try:
                event = orjson.loads(data)
            except orjson.JSONDecodeError:
                return [data]
            kind = event.get("type") if isinstance(event, dict) else None
            usage = (event.get("message") or {}).get("usage") if kind == "message_start" else event.get("usage")
            if isinstance(usage, dict):
                raw = state.extra.setdefault("anthropic_usage", {})
                raw.update({k: v for k, v in usage.items() if v is not None})
                state.usage = openai_usage(raw)
            state.done = state.done or kind == "message_stop"
        return [data]

    def parse_error(self, reply: UpstreamReply, d: Deployment) -> ProxyError:
        message = error_message(reply.body)
        headers = {k: v for k, v in reply.headers.items() if k.lower() == "retry-after"}
        status = 503 if reply.status == OVERLOADED else reply.status
        err = upstream_error(status, f"AnthropicException - {d.provider}/{d.model}: {message}", headers=headers)
        if reply.status == OVERLOADED:
            err.type = "overloaded_error"
        return d.scrubber.error(err)
