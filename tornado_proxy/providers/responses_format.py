"""The OpenAI Responses API (``POST /v1/responses``) for models whose provider does not serve it:
a Responses request (with the conversation kept from ``previous_response_id``) -> an OpenAI chat
request, and the chat answer back -> a ``response`` object or the typed Responses event stream.
``openai/`` and ``azure/`` models skip all of this (pass-through). Pure translation; the handler
does the I/O and the storing.

What has no chat equivalent is dropped (``truncation``, ``include``, ``service_tier``,
``top_logprobs``, ``prompt_cache_key``, reasoning summaries); OpenAI's built-in tools
(``web_search``, ``file_search``, ``code_interpreter``, ...) run only on OpenAI: asking another
provider for one is a 400 naming it.
"""

from __future__ import annotations

import copy
import re
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..errors import InvalidRequestError, ProxyError
from ..sse import format_event
from .base import event_object
from .openai_format import first_choice

# Request fields echoed in the response object (OpenAI's defaults when the request has none).
ECHOED = {"instructions": None, "max_output_tokens": None, "max_tool_calls": None, "parallel_tool_calls": True,
          "previous_response_id": None, "temperature": 1.0, "tool_choice": "auto", "tools": [], "top_p": 1.0,
          "truncation": "disabled", "user": None, "metadata": {}, "store": True, "background": False,
          "service_tier": "auto", "top_logprobs": 0}
# finish_reason -> the reason of an ``incomplete`` response
INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}
HEX_TIME = re.compile(r"[0-9a-f]{8}")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def new_response_id(now: float | None = None) -> str:
    """``resp_`` and 48 hex digits, the shape of OpenAI's ids, whose first 8 are the creation
    time (Unix seconds), as OpenAI's are: a store that does not hold an id yet can tell a
    response made a moment ago (its database row may still be on its way) from an unknown one."""
    return f"resp_{int(time.time() if now is None else now) & 0xFFFFFFFF:08x}{secrets.token_hex(20)}"


def response_id_time(response_id: str) -> float | None:
    """The creation time a ``resp_`` id carries (None when it does not look like one)."""
    if not response_id.startswith("resp_") or not HEX_TIME.fullmatch(response_id, 5, 13):
        return None
    return float(int(response_id[5:13], 16))


def shown(value) -> str:
    return str(value)[:100]


# --- Responses request -> OpenAI chat request ----------------------------------------------------

def check_tools(body: dict) -> None:
    """Only function tools can be run by a model behind chat completions: anything else (OpenAI's
    built-in tools: web_search, file_search, computer_use_preview, code_interpreter, mcp, ...) is
    a 400 naming the tool."""
    for i, tool in enumerate(body.get("tools") or ()):
        kind = tool.get("type")
        if kind != "function":
            raise InvalidRequestError(
                f"The tool type '{shown(kind)}' is an OpenAI built-in tool that only OpenAI's own Responses API "
                f"runs; model={body.get('model')} is served through chat completions, where only tools of type "
                "'function' are available.", param=f"tools[{i}].type")
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise InvalidRequestError("A function tool needs a name.", param=f"tools[{i}].name")
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") not in ("function", "allowed_tools"):
        raise InvalidRequestError(f"tool_choice of type '{shown(choice.get('type'))}' names an OpenAI built-in "
                                  "tool, which this model cannot run.", param="tool_choice.type")
    for name, what in (("background", "background responses"), ("prompt", "stored prompt templates"),
                       ("conversation", "conversations")):
        if body.get(name):
            raise InvalidRequestError(f"{what.capitalize()} ({name}) are only available on openai/ and azure/ "
                                      "models.", param=name)


def input_items(value) -> list[dict]:
    """The request's ``input`` as a list of items (a string is one user message)."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}]
    return [dict(item) for item in value or ()]


def to_chat_request(body: dict, items: list[dict]) -> dict:
    """The chat request for ``body``, whose conversation (earlier turns included) is ``items``."""
    out: dict[str, Any] = {"model": body["model"], "messages": chat_messages(items, body.get("instructions"))}
    if body.get("max_output_tokens") is not None:
        out["max_tokens"] = body["max_output_tokens"]
    for name in ("temperature", "top_p", "user", "mock_response", "drop_params"):
        if body.get(name) is not None:
            out[name] = body[name]
    tools = [chat_tool(t) for t in body.get("tools") or ()]
    if tools:
        out["tools"] = tools
        if body.get("parallel_tool_calls") is not None:
            out["parallel_tool_calls"] = body["parallel_tool_calls"]
    choice = chat_tool_choice(body.get("tool_choice"))
    if choice is not None and tools:
        out["tool_choice"] = choice
    fmt = response_format((body.get("text") or {}).get("format"))
    if fmt is not None:
        out["response_format"] = fmt
    effort = (body.get("reasoning") or {}).get("effort")
    if effort is not None:
        out["reasoning_effort"] = effort
    if body.get("stream"):
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}  # usage is what response.completed reports
    return out


def chat_tool(tool: dict) -> dict:
    fn: dict[str, Any] = {"name": tool.get("name"),
                          "parameters": tool.get("parameters") or {"type": "object", "properties": {}}}
    if tool.get("description"):
        fn["description"] = tool["description"]
    if tool.get("strict") is not None:
        fn["strict"] = tool["strict"]
    return {"type": "function", "function": fn}


def chat_tool_choice(choice):
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice.get("mode") or "auto"  # allowed_tools: its mode (the tools offered are the list)


def response_format(fmt) -> dict | None:
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    if fmt["type"] == "json_schema":
        required_string(fmt, "name", "text.format")
        if not isinstance(fmt.get("schema"), dict):
            raise InvalidRequestError("Missing required parameter: 'text.format.schema' (a JSON schema object).",
                                      param="text.format.schema")
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if fmt.get(k) is not None}
        return {"type": "json_schema", "json_schema": schema}
    raise InvalidRequestError(f"Unsupported text.format type '{shown(fmt['type'])}'.", param="text.format.type")


def required_string(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"Missing required parameter: '{where}.{key}'.", param=f"{where}.{key}")
    return value


def chat_messages(items: list[dict], instructions) -> list[dict]:
    out: list[dict] = [{"role": "system", "content": instructions}] if instructions else []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            out += message(item, where)
        elif kind == "function_call":
            call = {"id": required_string(item, "call_id", where), "type": "function",
                    "function": {"name": required_string(item, "name", where),
                                 "arguments": item.get("arguments") or "{}"}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and ("tool_calls" in last or last.get("_open")):
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if item.get("output") is None:
                raise InvalidRequestError(f"Missing required parameter: '{where}.output'.", param=f"{where}.output")
            out.append({"role": "tool", "tool_call_id": required_string(item, "call_id", where),
                        "content": text_of(item.get("output"), f"{where}.output")})
        elif kind == "reasoning":
            continue  # a reasoning model's own notes: chat takes none back
        else:
            raise InvalidRequestError(f"Input items of type '{shown(kind)}' can only be sent to openai/ and azure/ "
                                      "models.", param=f"{where}.type")
    for m in out:
        if m.pop("_open", None) and m.get("tool_calls") and not m["content"]:
            m["content"] = None
    return out


def message(item: dict, where: str) -> list[dict]:
    role, content = item.get("role"), item.get("content")
    if role not in ("user", "assistant", "system", "developer"):
        raise InvalidRequestError(f"Unsupported role '{shown(role)}'.", param=f"{where}.role")
    if role == "assistant":
        # open: function calls that follow join this message (chat puts them in one)
        return [{"role": "assistant", "content": text_of(content, f"{where}.content"), "_open": True}]
    if role in ("system", "developer"):
        return [{"role": role, "content": text_of(content, f"{where}.content")}]
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    parts = [chat_part(p, f"{where}.content[{j}]") for j, p in enumerate(content or ())]
    if len(parts) == 1 and parts[0]["type"] == "text":
        return [{"role": "user", "content": parts[0]["text"]}]
    return [{"role": "user", "content": parts}]


def chat_part(part: dict, where: str) -> dict:
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        return {"type": "text", "text": part.get("text") or ""}
    if kind == "input_image":
        if not part.get("image_url"):
            raise InvalidRequestError("input_image needs an image_url (file ids are OpenAI's own).",
                                      param=f"{where}.image_url")
        image = {"url": part["image_url"]}
        if part.get("detail"):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file":
        if not part.get("file_data"):
            raise InvalidRequestError("input_file needs file_data (file ids and URLs are OpenAI's own).",
                                      param=f"{where}.file_data")
        return {"type": "file", "file": {"file_data": part["file_data"],
                                         "filename": part.get("filename") or "file"}}
    raise InvalidRequestError(f"Content parts of type '{shown(kind)}' can only be sent to openai/ and azure/ models.",
                              param=f"{where}.type")


def text_of(content, where: str) -> str:
    """Text content (a string, or text parts) as one string."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text", "refusal"):
            raise InvalidRequestError("Only text parts are allowed here.", param=f"{where}[{j}]")
        texts.append(part.get("text") or part.get("refusal") or "")
    return "".join(texts)


# --- OpenAI chat answer -> Responses response ----------------------------------------------------

@dataclass
class ResponseDraft:
    """What a response object repeats of its request, and its identity."""

    model: str
    echo: dict                       # the request fields a response echoes
    id: str = field(default_factory=new_response_id)
    created_at: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def of(cls, body: dict) -> "ResponseDraft":
        echo = {name: body[name] if body.get(name) is not None else copy.copy(default)
                for name, default in ECHOED.items()}
        reasoning = body.get("reasoning") or {}
        echo["reasoning"] = {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")}
        echo["text"] = {"format": (body.get("text") or {}).get("format") or {"type": "text"}}
        return cls(model=body["model"], echo=echo)

    def response(self, status: str, output: list[dict], usage: dict | None = None, model: str | None = None,
                 incomplete: str | None = None, error: dict | None = None) -> dict:
        return {"id": self.id, "object": "response", "created_at": self.created_at, "status": status,
                "error": error, "incomplete_details": {"reason": incomplete} if incomplete else None,
                "model": model or self.model, "output": output, **self.echo, "usage": usage}


def responses_usage(usage) -> dict | None:
    """Chat usage -> Responses usage."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": usage.get("total_tokens") or prompt + completion}


def chat_usage(usage) -> dict | None:
    """Responses usage (a pass-through answer's) -> the chat usage the spend log counts."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("input_tokens") or 0, usage.get("output_tokens") or 0
    out = {"prompt_tokens": prompt, "completion_tokens": completion,
           "total_tokens": usage.get("total_tokens") or prompt + completion}
    cached = (usage.get("input_tokens_details") or {}).get("cached_tokens")
    if cached:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


def message_item(text: str | None, status: str = "completed", item_id: str | None = None) -> dict:
    """An assistant message item (``text`` None: one still empty, as ``output_item.added`` shows it)."""
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"id": item_id or new_id("msg"), "type": "message", "status": status, "role": "assistant",
            "content": content}


def call_item(call_id: str, name: str, arguments: str, status: str = "completed",
              item_id: str | None = None) -> dict:
    return {"id": item_id or new_id("fc"), "type": "function_call", "status": status, "call_id": call_id,
            "name": name, "arguments": arguments}


def to_response(chat: dict, draft: ResponseDraft) -> dict:
    choice, msg, text = first_choice(chat)
    output: list[dict] = []
    incomplete = INCOMPLETE.get(choice.get("finish_reason"))
    status = "incomplete" if incomplete else "completed"
    if text:
        output.append(message_item(text, status))
    for call in msg.get("tool_calls") or ():
        fn = call.get("function") or {}
        output.append(call_item(call.get("id") or new_id("call"), fn.get("name") or "", fn.get("arguments") or "",
                                status))
    return draft.response("incomplete" if incomplete else "completed", output, responses_usage(chat.get("usage")),
                          model=chat.get("model"), incomplete=incomplete)


# --- OpenAI chat chunks -> Responses events --------------------------------------------------------

class ChunksToEvents:
    """One stream: chat chunks in, the typed Responses events out, numbered from 0:
    ``response.created``, ``response.in_progress``, per message item ``output_item.added``,
    ``content_part.added``, ``output_text.delta``..., ``output_text.done``, ``content_part.done``,
    ``output_item.done``; per function call ``output_item.added``,
    ``function_call_arguments.delta``..., ``function_call_arguments.done``, ``output_item.done``;
    then ``response.completed`` (or ``response.incomplete``) with the whole response."""

    def __init__(self, draft: ResponseDraft):
        self.draft = draft
        self.sequence = 0
        self.started = False
        self.output: list[dict] = []     # the finished items
        self.open: dict | None = None    # the item being streamed
        self.open_key: tuple | None = None
        self.text = ""
        self.model: str | None = None
        self.finish: str | None = None
        self.usage: dict | None = None
        self.final: dict | None = None   # the response, once complete

    def event(self, name: str, data: dict) -> bytes:
        data = {"type": name, **data, "sequence_number": self.sequence}
        self.sequence += 1
        return format_event(orjson.dumps(data), name)

    def feed(self, payload: bytes) -> bytes:
        chunk = event_object(payload)
        if chunk is None:
            return b""
        self.model = self.model or chunk.get("model") or None
        out = self.start()
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) == 0:
                out += self.delta(choice.get("delta") or {})
                self.finish = choice.get("finish_reason") or self.finish
        return b"".join(out)

    def start(self) -> list[bytes]:
        if self.started:
            return []
        self.started = True
        snapshot = self.draft.response("in_progress", [])
        return [self.event("response.created", {"response": snapshot}),
                self.event("response.in_progress", {"response": snapshot})]

    def delta(self, delta: dict) -> list[bytes]:
        out: list[bytes] = []
        if delta.get("content"):
            if self.open_key != ("text",):
                out += self.close()
                out += self.open_message()
            self.text += delta["content"]
            out.append(self.event("response.output_text.delta", {
                "item_id": self.open["id"], "output_index": len(self.output), "content_index": 0,
                "delta": delta["content"], "logprobs": []}))
        for call in delta.get("tool_calls") or ():
            fn = call.get("function") or {}
            key = ("tool", call.get("index", 0))
            if self.open_key != key:
                out += self.close()
                self.open_key, self.text = key, ""
                self.open = call_item(call.get("id") or new_id("call"), fn.get("name") or "", "", "in_progress")
                out.append(self.event("response.output_item.added", {"output_index": len(self.output),
                                                                     "item": self.open}))
            if fn.get("arguments"):
                self.text += fn["arguments"]
                out.append(self.event("response.function_call_arguments.delta", {
                    "item_id": self.open["id"], "output_index": len(self.output), "delta": fn["arguments"]}))
        return out

    def open_message(self) -> list[bytes]:
        self.open_key, self.text = ("text",), ""
        self.open = message_item(None, "in_progress")
        where = {"item_id": self.open["id"], "output_index": len(self.output)}
        return [self.event("response.output_item.added", {"output_index": len(self.output), "item": self.open}),
                self.event("response.content_part.added", {**where, "content_index": 0, "part": {
                    "type": "output_text", "text": "", "annotations": [], "logprobs": []}})]

    def close(self, status: str = "completed") -> list[bytes]:
        if self.open is None:
            return []
        item, index, out = self.open, len(self.output), []
        where = {"item_id": item["id"], "output_index": index}
        if item["type"] == "message":
            done = message_item(self.text, status, item_id=item["id"])
            part = done["content"][0]
            out += [self.event("response.output_text.done", {**where, "content_index": 0, "text": self.text,
                                                             "logprobs": []}),
                    self.event("response.content_part.done", {**where, "content_index": 0, "part": part})]
        else:
            done = call_item(item["call_id"], item["name"], self.text, status, item_id=item["id"])
            out.append(self.event("response.function_call_arguments.done", {**where, "name": item["name"],
                                                                            "arguments": self.text}))
        out.append(self.event("response.output_item.done", {"output_index": index, "item": done}))
        self.output.append(done)
        self.open = self.open_key = None
        return out

    def end(self) -> bytes:
        incomplete = INCOMPLETE.get(self.finish)
        out = self.start() + self.close("incomplete" if incomplete else "completed")
        self.final = self.draft.response("incomplete" if incomplete else "completed", self.output,
                                         responses_usage(self.usage), model=self.model, incomplete=incomplete)
        name = "response.incomplete" if incomplete else "response.completed"
        out.append(self.event(name, {"response": self.final}))
        return b"".join(out)

    def failed(self, exc: ProxyError) -> bytes:
        """The stream broke off: an ``error`` event, then ``response.failed`` with what was done."""
        out = self.start()
        code = error_code(exc)
        out.append(self.event("error", {"code": code, "message": exc.message, "param": exc.param}))
        failed = self.draft.response("failed", self.output, responses_usage(self.usage), model=self.model,
                                     error={"code": code, "message": exc.message})
        out.append(self.event("response.failed", {"response": failed}))
        return b"".join(out)


def error_code(exc: ProxyError) -> str:
    if exc.status == 429:
        return "rate_limit_exceeded"
    return "server_error" if exc.status >= 500 else (exc.type or "invalid_request_error")


# --- what the /v1/responses handler writes -----------------------------------------------------------

class TranslatedOutput:
    """A model served through chat: its answer rewritten as a response (``final`` keeps it)."""

    def __init__(self, draft: ResponseDraft):
        self.draft = draft
        self.stream = ChunksToEvents(draft)
        self.final: dict | None = None

    def body(self, data: bytes) -> bytes:
        self.final = to_response(orjson.loads(data), self.draft)
        return orjson.dumps(self.final)

    def event(self, payload: bytes) -> bytes:
        return self.stream.feed(payload)

    def end(self) -> bytes:
        out = self.stream.end()
        self.final = self.stream.final
        return out

    def error_event(self, exc: ProxyError) -> bytes:
        return self.stream.failed(exc)


class PassThroughOutput:
    """An openai/ or azure/ model: its body and events go out as they came, each event under its
    ``type``; the response object (or the final event's) is kept in ``final``."""

    def __init__(self):
        self.final: dict | None = None
        self.sequence = -1

    def body(self, data: bytes) -> bytes:
        parsed = orjson.loads(data)
        self.final = parsed if isinstance(parsed, dict) else None
        return data

    def event(self, payload: bytes) -> bytes:
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            event = None
        name = event.get("type") if isinstance(event, dict) else None
        if isinstance(event, dict):
            if isinstance(event.get("sequence_number"), int):
                self.sequence = event["sequence_number"]
            if name in ("response.created", "response.completed", "response.incomplete", "response.failed") \
                    and isinstance(event.get("response"), dict):
                self.final = event["response"]
        return format_event(payload, name if isinstance(name, str) else None)

    @staticmethod
    def end() -> bytes:
        return b""

    def error_event(self, exc: ProxyError) -> bytes:
        self.sequence += 1
        return format_event(orjson.dumps({"type": "error", "code": error_code(exc), "message": exc.message,
                                          "param": exc.param, "sequence_number": self.sequence}), "error")
