"""``ollama/<model>`` (``/api/generate``, a prompt built from the messages) and
``ollama_chat/<model>`` (``/api/chat``, messages and tools) <-> OpenAI; ``/api/embed`` for both.

OpenAI parameters become Ollama ``options`` (``max_tokens`` -> ``num_predict``, ...), JSON
response formats become ``format``. Ollama streams newline-delimited JSON; each object becomes
an OpenAI chunk, and the final ``done: true`` object carries the finish reason and the counts
(``prompt_eval_count``, ``eval_count``) that become usage."""

from __future__ import annotations

from typing import Mapping

import orjson

from ..errors import InvalidRequestError, ProxyError, upstream_error
from ..sse import MAX_EVENT_BYTES, EventTooLargeError, SseEvent
from .base import (Deployment, Provider, ProviderDefaults, ProviderResponse, StreamState, UpstreamReply,
                   UpstreamRequest, bad_event, event_object, reply_object, require_field)
from .openai import error_message
from .openai_format import (Choice, ChunkWriter, completion_body, content_parts, embedding_list_body,
                            image_url_of, json_schema_of, max_output_tokens, single_prompt, split_data_url,
                            stop_list, tool_call, tool_calls_of, tool_names_by_id,
                            usage_block)

DEFAULT_BASE = "http://localhost:11434"
# OpenAI parameters that are Ollama options of the same name, and Ollama's own options, which a
# client (or litellm_params) may send at the top level as LiteLLM allows.
OPTION_NAMES = ("temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty",
                "num_ctx", "num_predict", "num_keep", "repeat_penalty", "repeat_last_n", "min_p", "typical_p",
                "mirostat", "mirostat_eta", "mirostat_tau", "tfs_z", "num_gpu", "num_thread")
FINISH_REASONS = {"stop": "stop", "length": "length"}  # "load", "unload", new values -> "stop"


class NdjsonParser:
    """Newline-delimited JSON framing: each non-blank line is one event. Incremental as
    ``SseParser``: each byte is searched once, and a line may not grow past ``MAX_EVENT_BYTES``."""

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self._partial = bytearray()

    def feed(self, chunk: bytes) -> list[SseEvent]:
        end = chunk.find(b"\n")
        if end < 0:
            self._partial += chunk
            if len(self._partial) > self.max_event_bytes:
                self._partial.clear()
                raise EventTooLargeError(self.max_event_bytes)
            return []
        last = chunk.rfind(b"\n")
        lines = chunk[:last].split(b"\n")
        if self._partial:
            self._partial += lines[0]
            lines[0] = bytes(self._partial)
            self._partial.clear()
        self._partial += chunk[last + 1:]
        return [SseEvent(line.strip()) for line in lines if line.strip()]

    def close(self) -> list[SseEvent]:
        rest = bytes(self._partial).strip()
        self._partial.clear()
        return [SseEvent(rest)] if rest else []


# --- requests -----------------------------------------------------------------------------------

def text_and_images(content, where: str) -> tuple[str, list[str]]:
    """OpenAI content -> (text, base64 images). Ollama takes images only as base64 data."""
    texts, images = [], []
    for i, part in enumerate(content_parts(content, where)):
        at = f"{where}.content[{i}]"
        if part["type"] == "text":
            if isinstance(part.get("text"), str):
                texts.append(part["text"])
        elif part["type"] == "image_url":
            data = split_data_url(image_url_of(part, at))
            if data is None:
                raise InvalidRequestError("Ollama takes images as base64 data URLs "
                                          "(data:image/png;base64,...), not links.", param=f"{at}.image_url")
            images.append(data[1])
        else:
            raise InvalidRequestError(f"Ollama does not take '{part['type']}' content parts.", param=f"{at}.type")
    return "\n".join(texts), images


def options_of(body: dict) -> dict:
    options = {name: body[name] for name in OPTION_NAMES if body.get(name) is not None}
    if max_output_tokens(body) is not None:
        options["num_predict"] = max_output_tokens(body)
    if stop_list(body.get("stop")):
        options["stop"] = stop_list(body.get("stop"))
    if isinstance(body.get("options"), dict):
        options.update(body["options"])
    return options


def common_fields(model: str, body: dict, stream: bool) -> dict:
    out: dict = {"model": model, "stream": stream}  # Ollama streams unless told not to
    options = options_of(body)
    if options:
        out["options"] = options
    response_format = body.get("response_format")
    if isinstance(body.get("format"), (str, dict)):
        out["format"] = body["format"]
    elif isinstance(response_format, dict) and response_format.get("type") == "json_object":
        out["format"] = "json"
    elif json_schema_of(response_format):
        out["format"] = json_schema_of(response_format)
    if body.get("keep_alive") is not None:
        out["keep_alive"] = body["keep_alive"]
    if body.get("reasoning_effort") is not None:
        out["think"] = body["reasoning_effort"] not in ("none", "disable")
    return out


def chat_messages(messages: list) -> list[dict]:
    """OpenAI messages -> ``/api/chat`` messages (string content, images, object tool arguments)."""
    names = tool_names_by_id(messages)
    out = []
    for i, m in enumerate(messages):
        where, role = f"messages[{i}]", m.get("role")
        role = {"developer": "system", "function": "tool"}.get(role, role)
        text, images = text_and_images(m.get("content"), where)
        message: dict = {"role": role, "content": text}
        if images:
            message["images"] = images
        if role == "assistant":
            calls = [{"function": {"name": name, "arguments": args}} for _, name, args in tool_calls_of(m, where)]
            if calls:
                message["tool_calls"] = calls
            if isinstance(m.get("reasoning_content"), str):
                message["thinking"] = m["reasoning_content"]
        if role == "tool":
            name = m.get("name") or names.get(m.get("tool_call_id"))
            if isinstance(name, str) and name:
                message["tool_name"] = name
        out.append(message)
    return out


def generate_prompt(messages: list) -> tuple[str, list[str]]:
    """OpenAI messages -> one ``/api/generate`` prompt, in LiteLLM's ``### Role:`` layout:
    consecutive user/tool turns merge, assistant tool calls are written out as JSON."""
    sections, images = [], []
    for i, m in enumerate(messages):
        where, role = f"messages[{i}]", m.get("role")
        text, found = text_and_images(m.get("content"), where)
        images += found
        if role in ("system", "developer"):
            title = "System"
        elif role == "assistant":
            title = "Assistant"
            calls = [{"type": "function", "function": {"name": name, "arguments": args}}
                     for _, name, args in tool_calls_of(m, where)]
            if calls:
                text += "Tool Calls: " + orjson.dumps(calls, option=orjson.OPT_INDENT_2).decode()
        else:
            title = "User"
        if not text:
            continue
        if sections and sections[-1][0] == title:
            sections[-1][1].append(text)
        else:
            sections.append((title, [text]))
    return "".join(f"### {title}:\n" + "\n".join(texts) + "\n\n" for title, texts in sections), images


def embed_request(model: str, body: dict) -> dict:
    inputs = body.get("input")
    if not (isinstance(inputs, str) or (isinstance(inputs, list) and all(isinstance(x, str) for x in inputs))):
        raise InvalidRequestError("Ollama embeddings take text (a string or a list of strings), not token ids.",
                                  param="input")
    out: dict = {"model": model, "input": inputs}
    if body.get("dimensions"):
        out["dimensions"] = body["dimensions"]
    if body.get("keep_alive") is not None:
        out["keep_alive"] = body["keep_alive"]
    return out


# --- replies ------------------------------------------------------------------------------------

def usage_of(reply: dict) -> dict:
    return usage_block(reply.get("prompt_eval_count") or 0, reply.get("eval_count") or 0)


def finish_reason(reason, has_tool_calls: bool) -> str:
    return "tool_calls" if has_tool_calls else FINISH_REASONS.get(reason, "stop")


def read_reply(reply: dict, first_tool_index: int | None = None) -> tuple[str, str | None, list[dict]]:
    """A chat or generate reply object -> (text, thinking, OpenAI tool calls)."""
    message = reply.get("message") if isinstance(reply.get("message"), dict) else None
    text = message.get("content") if message is not None else reply.get("response")
    thinking = (message if message is not None else reply).get("thinking")
    calls = []
    for call in (message or {}).get("tool_calls") or ():
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            index = None if first_tool_index is None else first_tool_index + len(calls)
            calls.append(tool_call(fn.get("name") or "", fn.get("arguments"), call.get("id"), index))
    text = text if isinstance(text, str) else ""
    return text, thinking if isinstance(thinking, str) and thinking else None, calls


def ollama_error(body: dict | None) -> str | None:
    return body.get("error") if isinstance(body, dict) and isinstance(body.get("error"), str) else None


class OllamaProvider(Provider):
    name = "ollama"
    chat_api = False  # /api/generate; OllamaChatProvider uses /api/chat

    def defaults(self, environ: Mapping[str, str]) -> ProviderDefaults:
        return ProviderDefaults(api_base=environ.get("OLLAMA_API_BASE") or DEFAULT_BASE,
                                api_key=environ.get("OLLAMA_API_KEY") or None)

    def build_request(self, d: Deployment, endpoint: str, body: dict, stream: bool) -> UpstreamRequest:
        body = {**d.defaults, **body} if d.defaults else body
        if endpoint == "embeddings":
            path, payload = "/api/embed", embed_request(d.model, body)
        elif endpoint == "chat" and self.chat_api:
            path, payload = "/api/chat", {**common_fields(d.model, body, stream),
                                          "messages": chat_messages(body["messages"])}
            if body.get("tools"):
                payload["tools"] = body["tools"]  # Ollama takes OpenAI's tool format; tool_choice it has not
        elif endpoint == "chat":
            if body.get("tools"):
                raise InvalidRequestError("ollama/ models are called through /api/generate, which has no tool "
                                          "calling; use the ollama_chat/ prefix for tools.", param="tools")
            prompt, images = generate_prompt(body["messages"])
            path, payload = "/api/generate", {**common_fields(d.model, body, stream), "prompt": prompt}
            if images:
                payload["images"] = images
        else:
            path = "/api/generate"
            payload = {**common_fields(d.model, body, stream), "prompt": single_prompt(body, "Ollama")}
        headers = {"Content-Type": "application/json", **d.extra_headers}
        if d.api_key:
            headers["Authorization"] = "Bearer " + d.api_key.reveal()
        return UpstreamRequest((d.api_base or DEFAULT_BASE).rstrip("/") + path, "POST", headers,
                               orjson.dumps(payload))

    stream_media_types = ("application/x-ndjson",)

    def stream_parser(self) -> NdjsonParser:
        return NdjsonParser()

    def parse_response(self, endpoint: str, reply: UpstreamReply) -> ProviderResponse:
        parsed = reply_object(reply.body, "Ollama")
        model = parsed.get("model") if isinstance(parsed.get("model"), str) else ""
        if endpoint == "embeddings":
            require_field(parsed, "Ollama", ("embeddings", list))
            tokens = parsed.get("prompt_eval_count") or 0
            usage = {"prompt_tokens": tokens, "total_tokens": tokens}
            return ProviderResponse(embedding_list_body(parsed.get("embeddings") or [], model, usage), usage)
        require_field(parsed, "Ollama", ("message", dict), ("response", str))
        text, thinking, calls = read_reply(parsed)
        usage = usage_of(parsed)
        choice = Choice(0, text, calls, finish_reason(parsed.get("done_reason"), bool(calls)), thinking)
        if calls and not text:
            choice.content = None
        return ProviderResponse(completion_body(endpoint, model, [choice], usage), usage)

    def parse_event(self, endpoint: str, data: bytes, state: StreamState) -> list[bytes]:
        event = event_object(data)
        if event is None:
            state.error = bad_event("Ollama")
            return []
        if ollama_error(event):
            state.error = upstream_error(500, f"OllamaException: {ollama_error(event)}")
            return []
        writer = state.extra.get("writer")
        if writer is None:
            model = event.get("model") if isinstance(event.get("model"), str) else ""
            writer = state.extra["writer"] = ChunkWriter(endpoint, model, state.include_usage)
        state.chunks += 1
        tools_before = state.extra.get("tool_count", 0)
        text, thinking, calls = read_reply(event, tools_before)
        state.extra["tool_count"] = tools_before + len(calls)
        out = []
        if text or thinking or calls or 0 not in writer.started:
            out.append(writer.delta(0, content=text, reasoning=thinking, tool_calls=calls or None))
        if event.get("done"):
            state.done = True
            state.usage = usage_of(event)
            out.append(writer.delta(0, finish=finish_reason(event.get("done_reason"),
                                                            state.extra["tool_count"] > 0)))
            if state.include_usage:
                out.append(writer.usage(state.usage))
        return out

    def parse_error(self, reply: UpstreamReply, d: Deployment) -> ProxyError:
        message = error_message(reply.body)
        headers = {k: v for k, v in reply.headers.items() if k.lower() == "retry-after"}
        return d.scrubber.error(upstream_error(reply.status, f"OllamaException - {d.provider}/{d.model}: {message}",
                                               headers=headers))


class OllamaChatProvider(OllamaProvider):
    name = "ollama_chat"
    chat_api = True
