"""``gemini/<model>``: Google AI Studio's Gemini API (``generateContent``,
``streamGenerateContent?alt=sse``, ``embedContent``, ``batchEmbedContents``) <-> OpenAI.

Requests: system messages -> ``systemInstruction``; assistant -> role ``model``; tool calls ->
``functionCall`` parts, tool results -> ``functionResponse`` parts; images -> ``inlineData`` /
``fileData``; generation parameters -> ``generationConfig``; tools -> ``functionDeclarations``;
``tool_choice`` -> ``toolConfig``. Replies: candidates -> choices, ``usageMetadata`` -> usage.
The key goes in the ``x-goog-api-key`` header, never in a URL."""

from __future__ import annotations

import math
import mimetypes
import re
from typing import Mapping

import orjson

from ..errors import InvalidRequestError, ProxyError, upstream_error
from .base import (Deployment, Provider, ProviderDefaults, ProviderResponse, StreamState, UpstreamReply,
                   UpstreamRequest, bad_event, event_object, reply_object, require_field, url_segment)
from .openai import error_message
from .openai_format import (Choice, ChunkWriter, completion_body, content_parts, embedding_list_body,
                            image_url_of, json_schema_of, max_output_tokens, new_call_id, prompt_messages,
                            split_data_url, stop_list, text_of, tool_call, tool_calls_of,
                            tool_names_by_id, usage_block)

DEFAULT_BASE = "https://generativelanguage.googleapis.com/v1beta"
# Gemini's tool call ids carry the thought signature Gemini 3 needs back (LiteLLM's convention).
THOUGHT_SEPARATOR = "__thought__"
FINISH_REASONS = {
    "STOP": "stop", "MAX_TOKENS": "length",
    **dict.fromkeys(("SAFETY", "RECITATION", "LANGUAGE", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII",
                     "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION"), "content_filter"),
}  # anything else (OTHER, MALFORMED_FUNCTION_CALL, FINISH_REASON_UNSPECIFIED, new values) -> "stop"
GENERATION_PARAMS = {"temperature": "temperature", "top_p": "topP", "top_k": "topK", "n": "candidateCount",
                     "seed": "seed", "presence_penalty": "presencePenalty",
                     "frequency_penalty": "frequencyPenalty"}
TOOL_MODES = {"auto": "AUTO", "none": "NONE", "required": "ANY"}
THINKING_BUDGETS = {"minimal": 128, "low": 1024, "medium": 2048, "high": 4096}
# The subset of JSON Schema (OpenAPI 3.0 style) that Gemini's Schema object accepts.
SCHEMA_KEYS = frozenset(("type", "format", "title", "description", "nullable", "enum", "maxItems", "minItems",
                         "properties", "required", "minProperties", "maxProperties", "minLength", "maxLength",
                         "pattern", "example", "anyOf", "propertyOrdering", "default", "items", "minimum",
                         "maximum"))
MAX_SCHEMA_DEPTH = 32
RETRY_DELAY = re.compile(r"^(\d+(?:\.\d+)?)s$")
MODEL_COLLECTIONS = ("models", "tunedModels")


# --- requests -----------------------------------------------------------------------------------

def model_path(model: str) -> str:
    """``gemini-2.0-flash`` -> ``models/gemini-2.0-flash``; ``models/x`` and ``tunedModels/x``
    stay as they are. The name is one URL path segment (``url_segment``), so no model name
    reaches another path or query on Google's host with the key."""
    collection, sep, name = model.rpartition("/")
    if not sep:
        collection = "models"
    if collection not in MODEL_COLLECTIONS:
        raise InvalidRequestError("Invalid model name: a Gemini model is <name>, models/<name> or "
                                  "tunedModels/<name>.", param="model")
    return f"{collection}/{url_segment(name)}"


def gemini_parts(content, where: str) -> list[dict]:
    """OpenAI content (string or parts) -> Gemini parts; empty text is left out (Gemini refuses it)."""
    parts = []
    for i, part in enumerate(content_parts(content, where)):
        kind, at = part["type"], f"{where}.content[{i}]"
        if kind == "text":
            if isinstance(part.get("text"), str) and part["text"]:
                parts.append({"text": part["text"]})
        elif kind == "image_url":
            parts.append(media_part(image_url_of(part, at), "image/jpeg"))
        elif kind == "input_audio":
            audio = part.get("input_audio") if isinstance(part.get("input_audio"), dict) else {}
            if not isinstance(audio.get("data"), str):
                raise InvalidRequestError("An input_audio part needs input_audio.data.", param=at)
            parts.append({"inlineData": {"mimeType": f"audio/{audio.get('format') or 'wav'}", "data": audio["data"]}})
        elif kind == "file":
            file = part.get("file") if isinstance(part.get("file"), dict) else {}
            url = file.get("file_data") or file.get("file_id")
            if not isinstance(url, str):
                raise InvalidRequestError("A file part needs file.file_data or file.file_id.", param=at)
            parts.append(media_part(url, file.get("format") or "application/pdf"))
        else:
            raise InvalidRequestError(f"Gemini does not take '{kind}' content parts.", param=f"{at}.type")
    return parts


def media_part(url: str, fallback_mime: str) -> dict:
    """A data URL -> ``inlineData``; any other URL (https, gs://, Files API) -> ``fileData``."""
    data = split_data_url(url)
    if data:
        return {"inlineData": {"mimeType": data[0], "data": data[1]}}
    mime = mimetypes.guess_type(url.split("?", 1)[0])[0] or fallback_mime
    return {"fileData": {"mimeType": mime, "fileUri": url}}


def convert_messages(messages: list) -> tuple[list[dict], list[dict]]:
    """OpenAI messages -> (systemInstruction parts, contents). Consecutive turns of one role merge."""
    system: list[dict] = []
    contents: list[dict] = []
    names = tool_names_by_id(messages)
    for i, m in enumerate(messages):
        where, role = f"messages[{i}]", m.get("role")
        if role in ("system", "developer"):
            system += [p for p in gemini_parts(m.get("content"), where) if "text" in p]
            continue
        if role == "assistant":
            author, parts = "model", gemini_parts(m.get("content"), where)
            for call_id, name, args in tool_calls_of(m, where):
                part = {"functionCall": {"name": name, "args": args}}
                _, _, signature = (call_id or "").partition(THOUGHT_SEPARATOR)
                if signature:
                    part["thoughtSignature"] = signature
                parts.append(part)
        elif role in ("tool", "function"):
            name = m.get("name") or names.get(m.get("tool_call_id"))
            if not isinstance(name, str) or not name:
                raise InvalidRequestError("A tool message's tool_call_id must match a tool call of an earlier "
                                          "assistant message.", param=f"{where}.tool_call_id")
            author = "user"
            parts = [{"functionResponse": {"name": name, "response": {"content": text_of(m.get("content"))}}}]
        else:
            author, parts = "user", gemini_parts(m.get("content"), where)
        if not parts:
            continue
        if contents and contents[-1]["role"] == author:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": author, "parts": parts})
    if not contents:
        raise InvalidRequestError("Gemini needs at least one user or assistant message with content.",
                                  param="messages")
    return system, contents


def gemini_schema(schema, defs: Mapping | None = None, depth: int = 0):
    """A JSON Schema -> Gemini's Schema: ``$ref``s inlined, ``["x", "null"]`` and ``anyOf`` null
    -> ``nullable``, ``const`` -> ``enum``, keys Gemini rejects (``additionalProperties``,
    ``$schema``, ``strict``, ...) dropped."""
    if not isinstance(schema, dict):
        return schema
    if depth > MAX_SCHEMA_DEPTH:
        raise InvalidRequestError("The JSON schema is nested too deeply (or refers to itself) for Gemini.",
                                  param="tools")
    defs = {**(defs or {}), **(schema.get("$defs") or {}), **(schema.get("definitions") or {})}
    if isinstance(schema.get("$ref"), str):
        target = defs.get(schema["$ref"].rsplit("/", 1)[-1])
        rest = {k: v for k, v in schema.items() if k != "$ref"}
        return gemini_schema({**target, **rest} if isinstance(target, dict) else rest, defs, depth + 1)
    out: dict = {}
    for key, value in schema.items():
        if key == "const":
            out["enum"] = [value]
        elif key not in SCHEMA_KEYS:
            continue
        elif key == "properties" and isinstance(value, dict):
            out[key] = {name: gemini_schema(s, defs, depth + 1) for name, s in value.items()}
        elif key == "items":
            out[key] = gemini_schema(value, defs, depth + 1)
        elif key == "type" and isinstance(value, list):
            kinds = [t for t in value if t != "null"]
            if len(kinds) < len(value):
                out["nullable"] = True
            if len(kinds) == 1:
                out["type"] = kinds[0]
            elif kinds:
                out["anyOf"] = [{"type": t} for t in kinds]
        elif key == "anyOf" and isinstance(value, list):
            variants = [gemini_schema(v, defs, depth + 1) for v in value if v != {"type": "null"}]
            if len(variants) < len(value):
                out["nullable"] = True
            if len(variants) == 1 and isinstance(variants[0], dict):
                out.update(variants[0])
            else:
                out["anyOf"] = variants
        else:
            out[key] = value
    return out


def function_declarations(tools) -> list[dict]:
    """OpenAI tools -> one Gemini tool of ``functionDeclarations``, plus Gemini-native tools
    (``googleSearch``, ``codeExecution``, ...) passed through as given."""
    declarations, native = [], []
    for i, tool in enumerate(tools or ()):
        if tool.get("type", "function" if "function" in tool else None) != "function":
            native.append({k: v for k, v in tool.items() if k != "type"})
            continue
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidRequestError("A function tool needs function.name.", param=f"tools[{i}].function")
        declaration = {"name": fn["name"]}
        if fn.get("description"):
            declaration["description"] = fn["description"]
        params = fn.get("parameters")
        if isinstance(params, dict) and params.get("properties"):  # Gemini refuses an empty object
            declaration["parameters"] = gemini_schema(params)
        declarations.append(declaration)
    return ([{"functionDeclarations": declarations}] if declarations else []) + native


def tool_config(choice) -> dict | None:
    if isinstance(choice, str) and choice in TOOL_MODES:
        return {"functionCallingConfig": {"mode": TOOL_MODES[choice]}}
    if isinstance(choice, dict):
        fn = choice.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [fn["name"]]}}
    if choice is None:
        return None
    raise InvalidRequestError("tool_choice must be 'auto', 'none', 'required' or a function.", param="tool_choice")


def generation_config(body: dict) -> dict:
    config = {new: body[old] for old, new in GENERATION_PARAMS.items() if body.get(old) is not None}
    if max_output_tokens(body) is not None:
        config["maxOutputTokens"] = max_output_tokens(body)
    if stop_list(body.get("stop")):
        config["stopSequences"] = stop_list(body.get("stop"))
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema"):
        config["responseMimeType"] = "application/json"
        schema = json_schema_of(response_format)
        if schema:
            config["responseSchema"] = gemini_schema(schema)
    effort = body.get("reasoning_effort")
    if effort in ("none", "disable"):
        config["thinkingConfig"] = {"thinkingBudget": 0}
    elif effort in THINKING_BUDGETS:
        config["thinkingConfig"] = {"thinkingBudget": THINKING_BUDGETS[effort], "includeThoughts": True}
    return config


def generate_request(body: dict, messages: list) -> dict:
    """An OpenAI chat body -> a ``GenerateContentRequest``. Other OpenAI parameters (logprobs,
    user, parallel_tool_calls, ...) have no Gemini counterpart and are dropped."""
    system, contents = convert_messages(messages)
    out: dict = {"contents": contents}
    if system:
        out["systemInstruction"] = {"parts": system}
    config = generation_config(body)
    if config:
        out["generationConfig"] = config
    tools = function_declarations(body.get("tools"))
    if tools:
        out["tools"] = tools
        choice = tool_config(body.get("tool_choice"))
        if choice:
            out["toolConfig"] = choice
    safety = body.get("safety_settings") or body.get("safetySettings")
    if isinstance(safety, list):
        out["safetySettings"] = safety
    return out


def embed_request(path: str, body: dict) -> tuple[str, dict]:
    """One text -> ``embedContent``; a list -> ``batchEmbedContents``."""
    extra = {}
    if body.get("dimensions"):
        extra["outputDimensionality"] = body["dimensions"]
    if isinstance(body.get("task_type"), str):
        extra["taskType"] = body["task_type"]
    inputs = body.get("input")
    if isinstance(inputs, str):
        return "embedContent", {"content": {"parts": [{"text": inputs}]}, **extra}
    if isinstance(inputs, list) and inputs and all(isinstance(x, str) for x in inputs):
        return "batchEmbedContents", {"requests": [
            {"model": path, "content": {"parts": [{"text": text}]}, **extra} for text in inputs]}
    raise InvalidRequestError("Gemini embeddings take text (a string or a list of strings), not token ids.",
                              param="input")


# --- replies ------------------------------------------------------------------------------------

def usage_of(meta) -> dict | None:
    if not isinstance(meta, dict):
        return None
    prompt = meta.get("promptTokenCount", 0) + meta.get("toolUsePromptTokenCount", 0)
    thoughts = meta.get("thoughtsTokenCount", 0)
    completion = meta.get("candidatesTokenCount", 0) + thoughts
    return usage_block(prompt, completion, meta.get("totalTokenCount", prompt + completion),
                       cached=meta.get("cachedContentTokenCount"), reasoning=thoughts)


def finish_reason(reason, has_tool_calls: bool) -> str:
    mapped = FINISH_REASONS.get(reason, "stop")
    return "tool_calls" if has_tool_calls and mapped == "stop" else mapped


def read_parts(parts, first_tool_index: int | None = None) -> tuple[str | None, str | None, list[dict]]:
    """Gemini parts -> (text, thought text, OpenAI tool calls; stream deltas carry an index)."""
    text, thoughts, calls = [], [], []
    for part in parts if isinstance(parts, list) else ():
        if not isinstance(part, dict):
            continue
        call = part.get("functionCall")
        if isinstance(call, dict):
            call_id = call.get("id") or new_call_id()
            if part.get("thoughtSignature"):
                call_id += THOUGHT_SEPARATOR + part["thoughtSignature"]
            index = None if first_tool_index is None else first_tool_index + len(calls)
            calls.append(tool_call(call.get("name") or "", call.get("args") or {}, call_id, index))
        elif isinstance(part.get("text"), str):
            (thoughts if part.get("thought") else text).append(part["text"])
    return "".join(text) if text else None, "".join(thoughts) if thoughts else None, calls


def parts_of(candidate: dict):
    content = candidate.get("content")
    return content.get("parts") if isinstance(content, dict) else None


def choices_of(reply: dict) -> list[Choice]:
    candidates = reply.get("candidates")
    if not candidates:
        blocked = (reply.get("promptFeedback") or {}).get("blockReason")
        return [Choice(0, None, [], "content_filter" if blocked else "stop")]
    out = []
    for i, candidate in enumerate(c for c in candidates if isinstance(c, dict)):
        content, thoughts, calls = read_parts(parts_of(candidate))
        out.append(Choice(candidate.get("index", i), content, calls,
                          finish_reason(candidate.get("finishReason"), bool(calls)), thoughts))
    return out


def retry_after(reply: UpstreamReply, err: dict) -> dict[str, str]:
    """``retry-after`` from the header, else from a ``google.rpc.RetryInfo`` detail (``"37s"``)."""
    for name, value in reply.headers.items():
        if name.lower() == "retry-after":
            return {"retry-after": value}
    for detail in err.get("details") or ():
        match = RETRY_DELAY.match(str(detail.get("retryDelay", ""))) if isinstance(detail, dict) else None
        if match:
            return {"retry-after": str(max(1, math.ceil(float(match.group(1)))))}
    return {}


class GeminiProvider(Provider):
    name = "gemini"

    def defaults(self, environ: Mapping[str, str]) -> ProviderDefaults:
        return ProviderDefaults(api_base=environ.get("GEMINI_API_BASE") or DEFAULT_BASE,
                                api_key=environ.get("GEMINI_API_KEY") or environ.get("GOOGLE_API_KEY") or None)

    def build_request(self, d: Deployment, endpoint: str, body: dict, stream: bool) -> UpstreamRequest:
        body = {**d.defaults, **body} if d.defaults else body
        path = model_path(d.model)
        if endpoint == "embeddings":
            method, payload = embed_request(path, body)
        else:
            messages = body["messages"] if endpoint == "chat" else prompt_messages(body, "Gemini")
            payload = generate_request(body, messages)
            method = "streamGenerateContent?alt=sse" if stream else "generateContent"
        headers = {"Content-Type": "application/json", **d.extra_headers}
        if d.api_key:
            headers["x-goog-api-key"] = d.api_key.reveal()
        base = (d.api_base or DEFAULT_BASE).rstrip("/")
        return UpstreamRequest(f"{base}/{path}:{method}", "POST", headers, orjson.dumps(payload))

    def parse_response(self, endpoint: str, reply: UpstreamReply) -> ProviderResponse:
        parsed = reply_object(reply.body, "Gemini")
        if endpoint == "embeddings":
            require_field(parsed, "Gemini", ("embedding", dict), ("embeddings", list))
            items = parsed.get("embeddings") if "embeddings" in parsed else [parsed.get("embedding")]
            vectors = [item.get("values") or [] for item in items or () if isinstance(item, dict)]
            usage = usage_of(parsed.get("usageMetadata")) or usage_block(0, 0)
            usage.pop("completion_tokens", None)
            return ProviderResponse(embedding_list_body(vectors, "", usage), usage)
        require_field(parsed, "Gemini", ("candidates", list), ("promptFeedback", dict))
        usage = usage_of(parsed.get("usageMetadata"))
        reply_id = "chatcmpl-" + parsed["responseId"] if parsed.get("responseId") else None
        body = completion_body(endpoint, parsed.get("modelVersion") or "", choices_of(parsed), usage, reply_id)
        return ProviderResponse(body, usage)

    def parse_event(self, endpoint: str, data: bytes, state: StreamState) -> list[bytes]:
        event = event_object(data)
        if event is None:
            state.error = bad_event("Gemini")
            return []
        if isinstance(event.get("error"), dict):
            err = event["error"]
            code = err.get("code") if isinstance(err.get("code"), int) else 500
            state.error = upstream_error(code, f"GeminiException: {err.get('message', '')}")
            return []
        writer = state.extra.get("writer")
        if writer is None:
            writer = state.extra["writer"] = ChunkWriter(endpoint, event.get("modelVersion") or "",
                                                         state.include_usage)
            if event.get("responseId"):
                writer.id = "chatcmpl-" + event["responseId"]
        state.chunks += 1
        if event.get("usageMetadata"):
            state.usage = usage_of(event["usageMetadata"])
        out, finished = [], False
        tool_counts = state.extra.setdefault("tool_counts", {})
        for i, candidate in enumerate(c for c in event.get("candidates") or () if isinstance(c, dict)):
            index = candidate.get("index", i)
            content, thoughts, calls = read_parts(parts_of(candidate), tool_counts.get(index, 0))
            tool_counts[index] = tool_counts.get(index, 0) + len(calls)
            if content or thoughts or calls or index not in writer.started:
                out.append(writer.delta(index, content=content, reasoning=thoughts, tool_calls=calls or None))
            if candidate.get("finishReason"):
                finished = True
                out.append(writer.delta(index, finish=finish_reason(candidate["finishReason"],
                                                                     tool_counts[index] > 0)))
        if not event.get("candidates") and (event.get("promptFeedback") or {}).get("blockReason"):
            finished = True
            out.append(writer.delta(0, finish="content_filter"))
        if finished and not state.done:
            state.done = True
            if state.include_usage and state.usage:
                out.append(writer.usage(state.usage))
        return out

    def parse_error(self, reply: UpstreamReply, d: Deployment) -> ProxyError:
        try:
            parsed = orjson.loads(reply.body)
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, list) and parsed:  # streamGenerateContent without alt=sse wraps it
            parsed = parsed[0]
        err = parsed.get("error") if isinstance(parsed, dict) else None
        err = err if isinstance(err, dict) else {}
        message = err.get("message") if isinstance(err.get("message"), str) else error_message(reply.body)
        status = reply.status
        reasons = {x.get("reason") for x in err.get("details") or () if isinstance(x, dict)}
        if status == 400 and ("API_KEY_INVALID" in reasons or "API key not valid" in message):
            status = 401  # Google answers a bad key with 400 INVALID_ARGUMENT; clients expect 401
        return d.scrubber.error(upstream_error(status, f"GeminiException - {d.provider}/{d.model}: {message}",
                                               headers=retry_after(reply, err)))
