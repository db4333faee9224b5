"""A fake Gemini API (Google AI Studio, generativelanguage.googleapis.com wire format) on Tornado:
``POST /v1beta/models/<model>:generateContent``, ``:streamGenerateContent`` (SSE with
``?alt=sse``, else a streamed JSON array), ``:embedContent``, ``:batchEmbedContents`` and
``GET /v1beta/models``.

Faithful where the gateway can get it wrong: the key comes in ``x-goog-api-key`` (or ``?key=``);
a missing key is 403 PERMISSION_DENIED, a wrong one 400 INVALID_ARGUMENT with reason
API_KEY_INVALID, as Google answers; bodies are checked the way Google checks them (unknown
fields, roles other than user/model, empty parts or text, ``functionResponse.response`` not an
object, batch requests naming another model); errors are ``{"error": {"code", "message",
"status"}}``, a 429 is RESOURCE_EXHAUSTED with a ``RetryInfo`` ``retryDelay``; SSE events end in
CRLF CRLF and there is no ``[DONE]``.

Replies: "echo: " + the last user turn's text (or the last function response's content), or a
``functionCall`` of the first declared function with ``{"location": "Paris"}`` when tools are
given and the last user text mentions the weather. ``maxOutputTokens`` (one token per word) cuts
the reply with MAX_TOKENS, ``candidateCount`` gives that many candidates, a JSON
``responseMimeType`` wraps the text in a JSON object. Tests start it with
``common.listen(make_app(FakeState(...)))``; standalone: ``python -m contrib.fake_providers.gemini --port 9003``.
"""

from __future__ import annotations

import hashlib
import re
import struct
import uuid
from dataclasses import dataclass, field

import orjson
import tornado.web

from .common import FakeHandler, RawReply, Received, run_standalone, standalone_parser

_PIECE = re.compile(r"\s*\S+\s*")
EMBEDDING_DIM = 8
MODEL_PREFIXES = ("gemini", "gemma", "text-embedding", "embedding")
REQUEST_FIELDS = {"contents", "tools", "toolConfig", "tool_config", "safetySettings", "safety_settings",
                  "systemInstruction", "system_instruction", "generationConfig", "generation_config",
                  "cachedContent", "cached_content"}
GENERATION_FIELDS = {"stopSequences", "responseMimeType", "responseSchema", "responseJsonSchema", "candidateCount",
                     "maxOutputTokens", "temperature", "topP", "topK", "seed", "presencePenalty",
                     "frequencyPenalty", "responseLogprobs", "logprobs", "thinkingConfig", "responseModalities",
                     "mediaResolution", "speechConfig", "enableEnhancedCivicAnswers"}
EMBED_FIELDS = {"content", "taskType", "title", "outputDimensionality", "model"}
SCHEMA_FIELDS = {"type", "format", "title", "description", "nullable", "enum", "maxItems", "minItems", "properties",
                 "required", "minProperties", "maxProperties", "minLength", "maxLength", "pattern", "example",
                 "anyOf", "propertyOrdering", "default", "items", "minimum", "maximum"}
PART_FIELDS = {"text", "inlineData", "fileData", "functionCall", "functionResponse", "executableCode",
               "codeExecutionResult"}
STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                409: "ABORTED", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL",
                503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
MESSAGES = {
    400: "Request contains an invalid argument.",
    403: "Method doesn't allow unregistered callers (callers without established identity). Please use API "
         "Key or other form of API consumer identity to call this API.",
    404: "Requested entity was not found.",
    429: "You exceeded your current quota, please check your plan and billing details.",
    500: "An internal error has occurred. Please retry or report in "
         "https://developers.generativeai.google/guide/troubleshooting",
    503: "The model is overloaded. Please try again later.",
    504: "Deadline expired before operation could complete.",
}
BAD_KEY = "API key not valid. Please pass a valid API key."



@dataclass
class FakeState:
    """Knobs (set by tests, may change between requests) and what the fake received.

    Order per request: record -> auth -> injected failure -> model/JSON/body checks (400/404)
    -> latency -> reply. Errors are answered without latency."""

    api_key: str | None = None        # x-goog-api-key (or ?key=) must match
    latency: float = 0.0              # before the reply / the first stream event
    chunk_delay: float = 0.0          # between stream events
    fail_times: int = 0               # the next N requests fail with fail_status
    fail_status: int = 500
    retry_delay: str = "1s"           # RetryInfo.retryDelay on an injected 429
    fail_mid_stream_after: int | None = None  # close the socket after N content events
    reply_text: str | None = None     # default: "echo: " + the last user text
    finish_reason: str | None = None  # override the finishReason of the last event (e.g. "SAFETY")
    raw_reply: RawReply | None = None  # answer with exactly these bytes (common.RawReply)
    record: bool = True
    received: list[Received] = field(default_factory=list)
    stream_aborted: bool = False
    streams_finished: int = 0


def error_body(status: int, message: str | None = None, details: list | None = None) -> bytes:
    err = {"code": status, "message": message or MESSAGES.get(status, MESSAGES[500 if status >= 500 else 400]),
           "status": STATUS_NAMES.get(status, "INTERNAL" if status >= 500 else "INVALID_ARGUMENT")}
    if details:
        err["details"] = details
    return orjson.dumps({"error": err})


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message, self.status = message, status


def words(text: str) -> int:
    return len(text.split())


def part_text(parts) -> str:
    return " ".join(p["text"] for p in parts or () if isinstance(p, dict) and isinstance(p.get("text"), str))


def check_parts(parts, where: str) -> None:
    if not isinstance(parts, list) or not parts:
        raise BadRequest(f"* GenerateContentRequest.{where}.parts: contents.parts must not be empty.\n")
    for j, part in enumerate(parts):
        known = [k for k in part if k in PART_FIELDS] if isinstance(part, dict) else []
        if not known:
            raise BadRequest(f"* GenerateContentRequest.{where}.parts[{j}].data: required oneof field 'data' "
                             "must have one initialized field\n")
        if part.get("text") == "":
            raise BadRequest("Unable to submit request because it has an empty text parameter. Add a value to "
                             "the parameter and try again.")
        response = part.get("functionResponse")
        if response is not None and not isinstance((response or {}).get("response"), dict):
            raise BadRequest(f"Invalid value at '{where}.parts[{j}].function_response.response' "
                             "(type.googleapis.com/google.protobuf.Struct)")


def check_schema(schema, where: str) -> None:
    """Gemini's Schema is an OpenAPI subset: JSON Schema keywords outside it are unknown fields."""
    if not isinstance(schema, dict):
        return
    for name, value in schema.items():
        if name not in SCHEMA_FIELDS:
            raise BadRequest(f'Invalid JSON payload received. Unknown name "{name}" at \'{where}\': '
                             "Cannot find field.")
        if name == "properties" and isinstance(value, dict):
            for prop, sub in value.items():
                check_schema(sub, f"{where}.properties[{prop}].value")
        elif name == "items":
            check_schema(value, f"{where}.items")
        elif name == "anyOf" and isinstance(value, list):
            for k, sub in enumerate(value):
                check_schema(sub, f"{where}.any_of[{k}]")


def check_tools(tools) -> None:
    for i, tool in enumerate(tools or ()):
        for j, fn in enumerate(tool.get("functionDeclarations") or () if isinstance(tool, dict) else ()):
            if not isinstance(fn, dict) or not fn.get("name"):
                raise BadRequest(f"* GenerateContentRequest.tools[{i}].function_declarations[{j}].name: "
                                 "[FIELD_INVALID] Invalid function name.\n")
            check_schema(fn.get("parameters"), f"tools[{i}].function_declarations[{j}].parameters")


def check_generate(body: dict) -> None:
    for name in body:
        if name not in REQUEST_FIELDS:
            raise BadRequest(f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.')
    config = body.get("generationConfig") or body.get("generation_config") or {}
    for name in config:
        if name not in GENERATION_FIELDS:
            raise BadRequest(f'Invalid JSON payload received. Unknown name "{name}" at \'generation_config\': '
                             "Cannot find field.")
    check_schema(config.get("responseSchema"), "generation_config.response_schema")
    check_tools(body.get("tools"))
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise BadRequest("* GenerateContentRequest.contents: contents is not specified\n")
    for i, content in enumerate(contents):
        if not isinstance(content, dict) or content.get("role", "user") not in ("user", "model"):
            raise BadRequest("Please use a valid role: user, model.")
        check_parts(content.get("parts"), f"contents[{i}]")
    system = body.get("systemInstruction") or body.get("system_instruction")
    if system is not None:
        check_parts(system.get("parts") if isinstance(system, dict) else None, "system_instruction")


def embedding(text: str, dims: int) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    while len(digest) < 4 * dims:
        digest += hashlib.sha256(digest).digest()
    raw = struct.unpack(f"<{dims}I", digest[: 4 * dims])
    return list(struct.unpack(f"<{dims}f", struct.pack(f"<{dims}f", *[u / 2**31 - 1.0 for u in raw])))


def function_to_call(body: dict) -> str | None:
    """The function to call: tools offered, calling allowed, and the last user text asks about the weather."""
    declarations = [d for t in body.get("tools") or () for d in t.get("functionDeclarations") or ()]
    config = (body.get("toolConfig") or {}).get("functionCallingConfig") or {}
    last = body["contents"][-1]
    if not declarations or config.get("mode") == "NONE" or last.get("role", "user") != "user":
        return None
    if "weather" not in part_text(last.get("parts")).lower():
        return None
    allowed = config.get("allowedFunctionNames")
    return allowed[0] if allowed else declarations[0].get("name")


def echo_of(body: dict) -> str:
    """The last user turn's text, or the content of the last function response in it."""
    parts = body["contents"][-1].get("parts") or ()
    text = part_text(parts)
    if text:
        return text
    responses = [p["functionResponse"] for p in parts if "functionResponse" in p]
    if responses:
        response = responses[-1].get("response") or {}
        return str(response.get("content", orjson.dumps(response).decode()))
    return ""


class BaseHandler(FakeHandler):
    def initialize(self, state: FakeState) -> None:
        super().initialize(state)
        self.body: dict = {}

    def set_default_headers(self) -> None:
        self.set_header("content-type", "application/json; charset=UTF-8")
        self.set_header("server", "scaffolding on HTTPServer2")

    def compute_etag(self) -> None:
        return None

    def fail(self, status: int, message: str | None = None, details: list | None = None) -> None:
        self.set_status(status)
        self.finish(error_body(status, message, details))

    def write_error(self, status_code: int, **kwargs) -> None:
        self.write(error_body(status_code))

    async def prepare(self) -> None:
        state, req = self.state, self.request
        body, bad_json = self.read_json()
        if state.api_key is not None:
            key = req.headers.get("x-goog-api-key") or self.get_query_argument("key", None)
            if not key:
                return self.fail(403)
            if key != state.api_key:  # Google answers a bad key with 400, never echoing it
                return self.fail(400, BAD_KEY, [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                                 "reason": "API_KEY_INVALID", "domain": "googleapis.com",
                                                 "metadata": {"service": "generativelanguage.googleapis.com"}}])
        if state.raw_reply is not None:
            return await self.send_raw(state.raw_reply)
        if state.fail_times > 0:
            state.fail_times -= 1
            details = None
            if state.fail_status == 429:
                details = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": state.retry_delay}]
            return self.fail(state.fail_status, details=details)
        if req.method == "POST":
            if bad_json or not isinstance(body, dict):
                return self.fail(400, "Invalid JSON payload received. Unexpected token.")
            self.body = body
        if state.latency:
            await self.pause(state.latency)


class ModelHandler(BaseHandler):
    """``POST /{version}/models/{model}:{method}``."""

    async def post(self, version: str, model: str, method: str) -> None:
        if not model.startswith(MODEL_PREFIXES):
            return self.fail(404, f"models/{model} is not found for API version {version}, or is not supported "
                                  f"for {method}. Call ListModels to see the list of available models and their "
                                  "supported methods.")
        try:
            if method == "generateContent":
                check_generate(self.body)
                return self.finish(orjson.dumps(self.whole_reply(model)))
            if method == "streamGenerateContent":
                check_generate(self.body)
                return await self.stream(model, sse=self.get_query_argument("alt", None) == "sse")
            if method == "embedContent":
                return self.finish(orjson.dumps({"embedding": self.embed(self.body, f"models/{model}")}))
            if method == "batchEmbedContents":
                requests = self.body.get("requests")
                if not isinstance(requests, list) or not requests:
                    raise BadRequest("* BatchEmbedContentsRequest.requests: requests is not specified\n")
                return self.finish(orjson.dumps({"embeddings": [self.embed(r, f"models/{model}") for r in requests]}))
        except BadRequest as exc:
            return self.fail(exc.status, exc.message)
        self.fail(404, f"Method {method} is not found.")

    def embed(self, request: dict, model_path: str) -> dict:
        for name in request:
            if name not in EMBED_FIELDS:
                raise BadRequest(f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.')
        if request.get("model", model_path) != model_path:
            raise BadRequest(f"Model name in request {request.get('model')} does not match the model in the "
                             f"URL {model_path}.")
        parts = (request.get("content") or {}).get("parts")
        check_parts(parts, "content")
        dims = request.get("outputDimensionality") or EMBEDDING_DIM
        return {"values": embedding(part_text(parts), dims)}

    def reply(self, model: str) -> tuple[list[list[dict]], str, dict]:
        """(per-candidate list of parts, one per stream event; finishReason; usageMetadata)."""
        body = self.body
        config = body.get("generationConfig") or {}
        n = int(config.get("candidateCount") or 1)
        prompt = sum(words(part_text(c.get("parts"))) for c in body["contents"])
        prompt += words(part_text((body.get("systemInstruction") or {}).get("parts")))
        finish = "STOP"
        name = function_to_call(body)
        if name:
            events = [[{"functionCall": {"name": name, "args": {"location": "Paris"}}}]]
            completion = 4
        else:
            text = self.state.reply_text if self.state.reply_text is not None else "echo: " + echo_of(body)
            if config.get("responseMimeType") == "application/json":
                text = orjson.dumps({"echo": text}).decode()
            pieces = _PIECE.findall(text) or [text]
            limit = config.get("maxOutputTokens")
            if limit is not None and len(pieces) > limit:
                pieces, finish = pieces[:limit], "MAX_TOKENS"
            events = [[{"text": p}] for p in pieces]
            completion = len(pieces)
        finish = self.state.finish_reason or finish
        usage = {"promptTokenCount": prompt, "candidatesTokenCount": n * completion,
                 "totalTokenCount": prompt + n * completion}
        return [events] * n, finish, usage

    def whole_reply(self, model: str) -> dict:
        per_candidate, finish, usage = self.reply(model)
        candidates = []
        for i, events in enumerate(per_candidate):
            parts = [p for event in events for p in event]
            texts = [p["text"] for p in parts if "text" in p]
            parts = ([{"text": "".join(texts)}] if texts else []) + [p for p in parts if "text" not in p]
            candidates.append({"content": {"parts": parts, "role": "model"}, "finishReason": finish, "index": i})
        return {"candidates": candidates, "usageMetadata": usage, "modelVersion": model,
                "responseId": uuid.uuid4().hex[:22]}

    async def stream(self, model: str, sse: bool) -> None:
        per_candidate, finish, usage = self.reply(model)
        response_id, state = uuid.uuid4().hex[:22], self.state
        count = len(per_candidate[0])
        events = []
        for k in range(count):
            last = k == count - 1
            candidates = []
            for i, parts in enumerate(per_candidate):
                candidate = {"content": {"parts": parts[k], "role": "model"}, "index": i}
                if last:
                    candidate["finishReason"] = finish
                candidates.append(candidate)
            running = usage if last else {"promptTokenCount": usage["promptTokenCount"],
                                          "totalTokenCount": usage["promptTokenCount"]}
            events.append({"candidates": candidates, "usageMetadata": running, "modelVersion": model,
                           "responseId": response_id})
        self.streaming = True
        if sse:
            self.set_header("content-type", "text/event-stream")
        for k, event in enumerate(events):
            if k == state.fail_mid_stream_after:
                return self.cut_stream()
            data = orjson.dumps(event)
            if not await self.send_frame(b"data: " + data + b"\r\n\r\n" if sse else (b"[" if k == 0 else b",\r\n") + data,
                                         after_delay=k > 0):
                return
        if not sse:
            self.write(b"]")
        self.end_stream()


class ModelsHandler(BaseHandler):
    def get(self, version: str) -> None:
        models = ["gemini-2.0-flash", "gemini-2.5-flash", "gemini-2.5-pro", "text-embedding-004"]
        self.finish(orjson.dumps({"models": [
            {"name": f"models/{m}", "displayName": m, "supportedGenerationMethods":
             ["embedContent", "batchEmbedContents"] if "embedding" in m else
             ["generateContent", "countTokens"]} for m in models]}))


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        self.record(None)
        self.set_status(404)
        self.set_header("content-type", "text/html; charset=UTF-8")
        self.finish(b"<!DOCTYPE html><title>Error 404 (Not Found)!!1</title><p>The requested URL was not found "
                    b"on this server.")


def make_app(state: FakeState) -> tornado.web.Application:
    args = {"state": state}
    return tornado.web.Application(
        [(r"/(v1beta|v1)/models/([^/:]+):(\w+)", ModelHandler, args),
         (r"/(v1beta|v1)/models", ModelsHandler, args)],
        default_handler_class=NotFoundHandler, default_handler_args=args, log_function=lambda handler: None)


def main(argv=None) -> None:
    p = standalone_parser("Fake Gemini API (Google AI Studio).")
    p.add_argument("--api-key", default=None, help="require this key (x-goog-api-key or ?key=)")
    args = p.parse_args(argv)
    run_standalone(lambda: make_app(FakeState(api_key=args.api_key, latency=args.latency, chunk_delay=args.chunk_delay, record=False)), args)


if __name__ == "__main__":
    main()
