"""The OpenAI format, for adapters that translate to and from another wire format (Gemini,
Ollama): reading OpenAI request pieces (content parts, data URLs, tool-call arguments, stop,
prompts) and writing OpenAI replies (``chat.completion``, ``text_completion``, stream chunks,
usage, embedding lists). Pure functions and values; no I/O."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import orjson

from ..errors import InvalidRequestError


# --- reading requests ---------------------------------------------------------------------------

def text_of(content) -> str:
    """Message content as text: a string, or the text parts of a content list (one per line)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content
                         if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))
    return ""


def first_choice(answer: dict) -> tuple[dict, dict, str | None]:
    """A chat completion's first choice, its message, and the message's text (text parts joined)."""
    choice = (answer.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    text = message.get("content")
    if isinstance(text, list):
        text = "".join(p.get("text", "") for p in text if isinstance(p, dict) and p.get("type") == "text")
    return choice, message, text


def content_parts(content, where: str) -> list[dict]:
    """A message's content as a list of OpenAI parts (a string becomes one text part)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        for i, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise InvalidRequestError("A content part must be an object with a 'type'.",
                                          param=f"{where}.content[{i}]")
        return content
    raise InvalidRequestError("Message content must be a string, a list of parts or null.", param=f"{where}.content")


def image_url_of(part: dict, where: str) -> str:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise InvalidRequestError("An image_url part needs image_url.url.", param=f"{where}.image_url")
    return url


def split_data_url(url: str) -> tuple[str, str] | None:
    """``data:image/png;base64,AAAA`` -> (``image/png``, ``AAAA``); anything else -> None."""
    if not url.startswith("data:"):
        return None
    head, sep, data = url[5:].partition(",")
    if not sep or not head.endswith(";base64"):
        return None
    return head[: -len(";base64")] or "application/octet-stream", data


def tool_arguments(arguments, where: str) -> dict:
    """A tool call's ``arguments`` (a JSON string in OpenAI's format) as an object."""
    if isinstance(arguments, dict):
        return arguments
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return {}
    try:
        parsed = orjson.loads(arguments) if isinstance(arguments, str) else None
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise InvalidRequestError("Tool call arguments must be a JSON object encoded as a string.", param=where)
    return parsed


def tool_calls_of(message: dict, where: str) -> list[tuple[str | None, str, dict]]:
    """An assistant message's tool calls as (id, name, arguments) (legacy ``function_call`` too)."""
    calls = message.get("tool_calls") or []
    out = []
    for i, call in enumerate(calls if isinstance(calls, list) else ()):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidRequestError("A tool call needs function.name.", param=f"{where}.tool_calls[{i}]")
        out.append((call.get("id"), fn["name"],
                    tool_arguments(fn.get("arguments"), f"{where}.tool_calls[{i}].function.arguments")))
    legacy = message.get("function_call")
    if isinstance(legacy, dict) and isinstance(legacy.get("name"), str):
        out.append((None, legacy["name"], tool_arguments(legacy.get("arguments"), f"{where}.function_call")))
    return out


def tool_names_by_id(messages: list) -> dict[str, str]:
    """tool_call_id -> function name, from every assistant message's tool calls."""
    names = {}
    for m in messages:
        if isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("tool_calls"), list):
            for call in m["tool_calls"]:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and isinstance(call.get("id"), str):
                    names[call["id"]] = fn.get("name")
    return names


def stop_list(stop) -> list[str]:
    if isinstance(stop, str):
        return [stop] if stop else []
    return [s for s in stop if isinstance(s, str) and s] if isinstance(stop, list) else []


def max_output_tokens(body: dict) -> int | None:
    value = body.get("max_completion_tokens")
    return value if value is not None else body.get("max_tokens")


def single_prompt(body: dict, provider: str) -> str:
    """A legacy completions ``prompt`` as one string; these providers take one prompt per call."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidRequestError(f"{provider} takes one text prompt per request (not a list of prompts or "
                                  "token ids).", param="prompt")
    return prompt


def prompt_messages(body: dict, provider: str) -> list[dict]:
    return [{"role": "user", "content": single_prompt(body, provider)}]


def json_schema_of(response_format) -> dict | None:
    """The schema of ``response_format: {"type": "json_schema", "json_schema": {"schema": ...}}``."""
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return schema if isinstance(schema, dict) else None
    return None


# --- writing replies ----------------------------------------------------------------------------

def new_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def usage_block(prompt: int, completion: int, total: int | None = None, *, cached: int | None = None,
                reasoning: int | None = None) -> dict:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion,
             "total_tokens": total if total is not None else prompt + completion}
    if cached:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    if reasoning:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return usage


@dataclass
class Choice:
    """One translated answer (a Gemini candidate, an Ollama reply)."""

    index: int = 0
    content: str | None = None
    tool_calls: list[dict] = field(default_factory=list)   # OpenAI shape, arguments as JSON strings
    finish_reason: str | None = "stop"
    reasoning: str | None = None


def tool_call(name: str, arguments, call_id: str | None = None, index: int | None = None) -> dict:
    """An OpenAI tool call; object arguments become the JSON string OpenAI clients expect."""
    args = arguments if isinstance(arguments, str) else orjson.dumps(arguments or {}).decode()
    call = {"id": call_id or new_call_id(), "type": "function", "function": {"name": name, "arguments": args}}
    return {"index": index, **call} if index is not None else call


def completion_body(endpoint: str, model: str, choices: list[Choice], usage: dict | None,
                    reply_id: str | None = None) -> bytes:
    """A ``chat.completion`` (or, for the completions endpoint, a ``text_completion``)."""
    if endpoint == "completions":
        out = [{"text": c.content or "", "index": c.index, "logprobs": None, "finish_reason": c.finish_reason}
               for c in choices]
        obj, prefix = "text_completion", "cmpl"
    else:
        out = []
        for c in choices:
            message = {"role": "assistant", "content": c.content}
            if c.tool_calls:
                message["tool_calls"] = c.tool_calls
            if c.reasoning:
                message["reasoning_content"] = c.reasoning
            out.append({"index": c.index, "message": message, "logprobs": None, "finish_reason": c.finish_reason})
        obj, prefix = "chat.completion", "chatcmpl"
    return orjson.dumps({"id": reply_id or new_id(prefix), "object": obj, "created": int(time.time()),
                         "model": model, "choices": out, "usage": usage, "system_fingerprint": None})


def embedding_list_body(vectors: list[list[float]], model: str, usage: dict) -> bytes:
    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
    return orjson.dumps({"object": "list", "data": data, "model": model, "usage": usage})


@dataclass
class ChunkWriter:
    """Writes the OpenAI stream chunks of one translated stream (one id, one ``created``)."""

    endpoint: str
    model: str
    include_usage: bool = False
    id: str = field(default_factory=new_id)
    created: int = field(default_factory=lambda: int(time.time()))
    started: set = field(default_factory=set)   # choice indexes that got their role already

    def _envelope(self) -> dict:
        obj = "text_completion" if self.endpoint == "completions" else "chat.completion.chunk"
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
               "system_fingerprint": None}
        if self.include_usage:
            out["usage"] = None
        return out

    def delta(self, index: int = 0, *, content: str | None = None, reasoning: str | None = None,
              tool_calls: list[dict] | None = None, finish: str | None = None) -> bytes:
        if self.endpoint == "completions":
            self.started.add(index)
            choice = {"text": content or "", "index": index, "logprobs": None, "finish_reason": finish}
        else:
            delta: dict = {}
            if index not in self.started:
                self.started.add(index)
                delta["role"] = "assistant"
                delta["content"] = content or ""
            elif content:
                delta["content"] = content
            if reasoning:
                delta["reasoning_content"] = reasoning
            if tool_calls:
                delta["tool_calls"] = tool_calls
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return orjson.dumps({**self._envelope(), "choices": [choice]})

    def usage(self, usage: dict) -> bytes:
        return orjson.dumps({**self._envelope(), "choices": [], "usage": usage})

