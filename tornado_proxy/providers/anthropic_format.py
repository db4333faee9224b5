"""The Anthropic Messages format as the gateway's client-facing API (``POST /v1/messages``) for
models that do not speak it: an Anthropic request -> an OpenAI chat request, and the OpenAI-shaped
answer back -> an Anthropic ``message`` or event stream. ``anthropic/`` models skip all of this
(pass-through). Pure translation; the handler does the I/O.

What has no OpenAI equivalent is dropped: ``top_k``, ``thinking`` (and thinking blocks in earlier
turns), ``service_tier``, ``container``. Anthropic server tools (``web_search_...``, ``bash_...``)
exist only on Anthropic: asking another provider for one is a 400.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from ..errors import InvalidRequestError, ProxyError
from ..sse import format_event
from .base import event_object
from .openai_format import first_choice
from .anthropic import shown

# OpenAI finish_reason -> Anthropic stop_reason (anything else ends the turn).
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                "content_filter": "refusal"}


# --- Anthropic request -> OpenAI chat request --------------------------------------------------

def to_openai_request(body: dict) -> dict:
    out: dict[str, Any] = {"model": body["model"], "messages": openai_messages(body)}
    if body.get("max_tokens") is not None:
        out["max_tokens"] = body["max_tokens"]
    for name in ("temperature", "top_p", "mock_response"):
        if body.get(name) is not None:
            out[name] = body[name]
    if body.get("stop_sequences"):
        out["stop"] = list(body["stop_sequences"])
    if body.get("stream"):
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}  # usage is what message_delta reports
    user = (body.get("metadata") or {}).get("user_id")
    if isinstance(user, str) and user:
        out["user"] = user
    tools = [openai_tool(t, f"tools[{i}]") for i, t in enumerate(body.get("tools") or ())]
    if tools:
        out["tools"] = tools
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "tool":
            out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
        elif kind in ("auto", "any", "none"):
            out["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
        if choice.get("disable_parallel_tool_use") is True and tools:
            out["parallel_tool_calls"] = False
    return out


def openai_messages(body: dict) -> list[dict]:
    out: list[dict] = []
    system = body.get("system")
    if isinstance(system, list):
        system = "\n\n".join(b.get("text", "") for b in system if isinstance(b, dict) and b.get("type") == "text")
    if system:
        out.append({"role": "system", "content": system})
    for i, m in enumerate(body["messages"]):
        where, content = f"messages[{i}]", m.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        if m.get("role") == "assistant":
            out += assistant_message(blocks, where)
        elif m.get("role") == "user":
            out += user_messages(blocks, where)
        else:
            raise InvalidRequestError(f"Unsupported role '{shown(m.get('role'))}': messages are user or assistant "
                                      "turns (the system prompt is the top-level `system`).", param=f"{where}.role")
    return out


def user_messages(blocks: list, where: str) -> list[dict]:
    """One user turn -> its tool results as ``tool`` messages, then the rest as a user message."""
    tools: list[dict] = []
    parts: list[dict] = []
    for j, block in enumerate(blocks):
        at, kind = f"{where}.content[{j}]", block.get("type")
        if kind == "tool_result":
            text, images = result_content(block.get("content"), at)
            if block.get("is_error") and not text.startswith("Error"):
                text = "Error: " + text
            tools.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text})
            parts += images  # OpenAI tool messages hold text only: images follow as user content
        else:
            parts += openai_part(block, at)
    if parts:
        only_text = len(parts) == 1 and parts[0]["type"] == "text"
        tools.append({"role": "user", "content": parts[0]["text"] if only_text else parts})
    return tools


def result_content(content, where: str) -> tuple[str, list[dict]]:
    if content is None or isinstance(content, str):
        return content or "", []
    texts, images = [], []
    for j, block in enumerate(content):
        part = openai_part(block, f"{where}.content[{j}]")
        texts += [p["text"] for p in part if p["type"] == "text"]
        images += [p for p in part if p["type"] != "text"]
    return "\n".join(texts), images


def openai_part(block: dict, where: str) -> list[dict]:
    kind = block.get("type")
    if kind == "text":
        return [{"type": "text", "text": block.get("text", "")}]
    if kind in ("image", "document"):
        source = block.get("source") or {}
        if source.get("type") == "base64":
            url = f"data:{source.get('media_type')};base64,{source.get('data')}"
            if kind == "image":
                return [{"type": "image_url", "image_url": {"url": url}}]
            return [{"type": "file", "file": {"file_data": url, "filename": block.get("title") or "document.pdf"}}]
        if source.get("type") == "url" and kind == "image":
            return [{"type": "image_url", "image_url": {"url": source.get("url")}}]
        if source.get("type") == "text":
            return [{"type": "text", "text": source.get("data", "")}]
        raise InvalidRequestError(f"A {kind} with a '{shown(source.get('type'))}' source can only be sent to "
                                  "anthropic/ models.", param=f"{where}.source")
    if kind in ("thinking", "redacted_thinking"):
        return []
    raise InvalidRequestError(f"Content blocks of type '{shown(kind)}' can only be sent to anthropic/ models.",
                              param=f"{where}.type")


def assistant_message(blocks: list, where: str) -> list[dict]:
    texts, calls = [], []
    for j, block in enumerate(blocks):
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "tool_use":
            calls.append({"id": block.get("id"), "type": "function", "function": {
                "name": block.get("name"), "arguments": orjson.dumps(block.get("input") or {}).decode()}})
        elif kind not in ("thinking", "redacted_thinking"):
            raise InvalidRequestError(f"Content blocks of type '{shown(kind)}' can only be sent to anthropic/ models.",
                                      param=f"{where}.content[{j}].type")
    text = "".join(texts)
    if not text and not calls:
        return []
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    return [message]


def openai_tool(tool: dict, where: str) -> dict:
    if tool.get("type") not in (None, "custom"):
        raise InvalidRequestError(f"The Anthropic server tool '{shown(tool.get('type'))}' is only available on "
                                  "anthropic/ models.", param=f"{where}.type")
    fn: dict[str, Any] = {"name": tool.get("name"),
                          "parameters": tool.get("input_schema") or {"type": "object", "properties": {}}}
    if tool.get("description"):
        fn["description"] = tool["description"]
    return {"type": "function", "function": fn}


# --- OpenAI answer -> Anthropic message ----------------------------------------------------------

def tool_input(arguments) -> dict:
    """Tool-call arguments as the ``input`` object; text that is not a JSON object is kept whole."""
    if not arguments:
        return {}
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        parsed = None
    return parsed if isinstance(parsed, dict) else {"arguments": arguments}


def anthropic_usage(usage) -> dict:
    """OpenAI usage -> Anthropic's, where ``input_tokens`` excludes cache reads and writes."""
    if not isinstance(usage, dict):
        return {"input_tokens": 0, "output_tokens": 0}
    read = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    written = usage.get("cache_creation_input_tokens") or 0
    out = {"input_tokens": max((usage.get("prompt_tokens") or 0) - read - written, 0),
           "output_tokens": usage.get("completion_tokens") or 0}
    if read:
        out["cache_read_input_tokens"] = read
    if written:
        out["cache_creation_input_tokens"] = written
    return out


def to_anthropic_message(response: dict, model: str) -> dict:
    choice, message, text = first_choice(response)
    content: list[dict] = []
    if text:
        content.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or ():
        fn = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id") or "toolu_" + uuid.uuid4().hex[:24],
                        "name": fn.get("name"), "input": tool_input(fn.get("arguments"))})
    return {"id": response.get("id") or "msg_" + uuid.uuid4().hex[:24], "type": "message", "role": "assistant",
            "model": response.get("model") or model, "content": content,
            "stop_reason": STOP_REASONS.get(choice.get("finish_reason"), "end_turn"), "stop_sequence": None,
            "usage": anthropic_usage(response.get("usage"))}


# --- OpenAI chunks -> Anthropic events -----------------------------------------------------------

class ChunksToEvents:
    """One stream: OpenAI chat chunks in, Anthropic SSE events out (``message_start``, a
    ``content_block_start/delta/stop`` run per text or tool_use block, ``message_delta`` with
    the stop reason and usage, ``message_stop``)."""

    def __init__(self, model: str):
        self.model = model
        self.started = False
        self.index = -1            # the current content block
        self.open: tuple | None = None  # ("text",) or ("tool", OpenAI tool-call index)
        self.finish: str | None = None
        self.usage: dict | None = None

    def feed(self, payload: bytes) -> bytes:
        chunk = event_object(payload)
        if chunk is None:
            return b""
        events = self.start(chunk)
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) == 0:
                events += self.delta(choice.get("delta") or {})
                self.finish = choice.get("finish_reason") or self.finish
        return b"".join(events)

    def start(self, chunk: dict) -> list[bytes]:
        if self.started:
            return []
        self.started = True
        message = {"id": chunk.get("id") or "msg_" + uuid.uuid4().hex[:24], "type": "message",
                   "role": "assistant", "model": chunk.get("model") or self.model, "content": [],
                   "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}
        return [event("message_start", {"type": "message_start", "message": message})]

    def delta(self, delta: dict) -> list[bytes]:
        out: list[bytes] = []
        if delta.get("content"):
            if self.open != ("text",):
                out += self.open_block(("text",), {"type": "text", "text": ""})
            out.append(event("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                                     "delta": {"type": "text_delta", "text": delta["content"]}}))
        for call in delta.get("tool_calls") or ():
            fn = call.get("function") or {}
            key = ("tool", call.get("index", 0))
            if self.open != key:
                call_id = call.get("id") or "toolu_" + uuid.uuid4().hex[:24]
                out += self.open_block(key, {"type": "tool_use", "id": call_id, "name": fn.get("name") or "",
                                             "input": {}})
            if fn.get("arguments"):
                out.append(event("content_block_delta", {
                    "type": "content_block_delta", "index": self.index,
                    "delta": {"type": "input_json_delta", "partial_json": fn["arguments"]}}))
        return out

    def open_block(self, key: tuple, block: dict) -> list[bytes]:
        out = self.close_block()
        self.index += 1
        self.open = key
        return out + [event("content_block_start", {"type": "content_block_start", "index": self.index,
                                                     "content_block": block})]

    def close_block(self) -> list[bytes]:
        if self.open is None:
            return []
        self.open = None
        return [event("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def end(self) -> bytes:
        events = self.start({}) + self.close_block()
        usage = anthropic_usage(self.usage)
        events.append(event("message_delta", {
            "type": "message_delta", "delta": {"stop_reason": STOP_REASONS.get(self.finish, "end_turn"),
                                               "stop_sequence": None}, "usage": usage}))
        events.append(event("message_stop", {"type": "message_stop"}))
        return b"".join(events)


def event(name: str, data: dict) -> bytes:
    return format_event(orjson.dumps(data), name)


def error_event(exc: ProxyError) -> bytes:
    return format_event(orjson.dumps(exc.to_anthropic_body()), "error")


# --- what the /v1/messages handler writes ----------------------------------------------------------

class TranslatedOutput:
    """A model that is not Anthropic's: its OpenAI-shaped answer, rewritten as Anthropic's."""

    def __init__(self, model: str):
        self.model = model
        self.stream = ChunksToEvents(model)

    def body(self, data: bytes) -> bytes:
        return orjson.dumps(to_anthropic_message(orjson.loads(data), self.model))

    def event(self, payload: bytes) -> bytes:
        return self.stream.feed(payload)

    def end(self) -> bytes:
        return self.stream.end()

    error_event = staticmethod(error_event)


class PassThroughOutput:
    """An Anthropic model: its body and events go out as they came, each event under its name."""

    @staticmethod
    def body(data: bytes) -> bytes:
        return data

    @staticmethod
    def event(payload: bytes) -> bytes:
        try:
            name = orjson.loads(payload).get("type")
        except (orjson.JSONDecodeError, AttributeError):
            name = None
        return format_event(payload, name if isinstance(name, str) else None)

    @staticmethod
    def end() -> bytes:
        return b""

    error_event = staticmethod(error_event)
