"""A fake Ollama server (the native ``/api`` wire format) on Tornado: ``POST /api/chat``,
``/api/generate``, ``/api/embed`` (and the legacy ``/api/embeddings``), ``GET /api/tags``,
``/api/version`` and ``/``.

Faithful where the gateway can get it wrong: replies stream as newline-delimited JSON unless the
body says ``"stream": false``; the last object has ``done: true``, ``done_reason`` and the counts
(``prompt_eval_count``, ``eval_count``); bodies are decoded the way Ollama's Go server decodes them
(message ``content`` must be a string, tool-call ``arguments`` an object, ``images`` base64);
errors are ``{"error": "..."}`` with Ollama's statuses (404 for a model that is not pulled, 400 for
a bad body); an error inside a stream is an ``{"error": ...}`` line. No auth unless ``api_key``
is set (Ollama behind a proxy, or ollama.com), then ``Authorization: Bearer``.

Replies: "echo: " + the last user message (for /api/generate, the last line of the prompt), the
content of the last tool message after a tool call, or a tool call of the first tool with
``{"location": "Paris"}`` when tools are given and the last user message mentions the weather.
``options.num_predict`` (one token per word) cuts the reply with ``done_reason: "length"``;
``format`` wraps it in a JSON object. Tests start it with ``common.listen(make_app(FakeState(...)))``;
standalone: ``python -m contrib.fake_providers.ollama --port 11434``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from dataclasses import dataclass, field
from datetime import datetime, timezone

import orjson
import tornado.web

from .common import FakeHandler, RawReply, Received, run_standalone, standalone_parser

_PIECE = re.compile(r"\s*\S+\s*")
EMBEDDING_DIM = 8
MODELS = ("llama3.2", "llama3.1", "qwen2.5", "nomic-embed-text", "all-minilm")
ROLES = ("system", "user", "assistant", "tool")
MESSAGES = {400: "bad request", 401: "unauthorized", 404: "not found",
            500: "an error was encountered while running the model: unexpected EOF",
            503: "server busy, please try again.  maximum pending requests exceeded"}



@dataclass
class FakeState:
    """Knobs (set by tests, may change between requests) and what the fake received.

    Order per request: record -> auth (if api_key) -> injected failure -> JSON/model/body checks
    -> latency -> reply. Errors are answered without latency."""

    api_key: str | None = None          # require Authorization: Bearer <key> (plain Ollama has none)
    latency: float = 0.0
    chunk_delay: float = 0.0
    fail_times: int = 0
    fail_status: int = 500
    fail_mid_stream_after: int | None = None   # close the socket after N content lines
    error_mid_stream_after: int | None = None  # send an {"error": ...} line after N content lines
    reply_text: str | None = None
    models: tuple[str, ...] = MODELS    # what is "pulled"; others get 404
    raw_reply: RawReply | None = None  # answer with exactly these bytes (common.RawReply)
    record: bool = True
    received: list[Received] = field(default_factory=list)
    stream_aborted: bool = False
    streams_finished: int = 0


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message, self.status = message, status


def words(text: str) -> int:
    return len(text.split())


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def embedding(text: str, dims: int) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    while len(digest) < 4 * dims:
        digest += hashlib.sha256(digest).digest()
    raw = struct.unpack(f"<{dims}I", digest[: 4 * dims])
    return list(struct.unpack(f"<{dims}f", struct.pack(f"<{dims}f", *[u / 2**31 - 1.0 for u in raw])))


def check_images(images, where: str) -> None:
    if images is None:
        return
    if not isinstance(images, list):
        raise BadRequest(f"json: cannot unmarshal {type(images).__name__} into Go struct field {where}.images "
                         "of type []api.ImageData")
    for image in images:
        try:
            base64.b64decode(image if isinstance(image, str) else b"!", validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("illegal base64 data at input byte 0") from None


def check_messages(messages) -> None:
    if not isinstance(messages, list):
        raise BadRequest("json: cannot unmarshal object into Go struct field ChatRequest.messages of type "
                         "[]api.Message")
    for m in messages:
        if not isinstance(m, dict):
            raise BadRequest("json: cannot unmarshal into Go struct field ChatRequest.messages of type api.Message")
        content = m.get("content", "")
        if not isinstance(content, str):
            kind = "array" if isinstance(content, list) else type(content).__name__
            raise BadRequest(f"json: cannot unmarshal {kind} into Go struct field Message.messages.content of "
                             "type string")
        for call in m.get("tool_calls") or ():
            arguments = (call.get("function") or {}).get("arguments") if isinstance(call, dict) else None
            if not isinstance(arguments, dict):
                raise BadRequest("json: cannot unmarshal string into Go struct field ToolCallFunction.messages."
                                 "tool_calls.function.arguments of type api.ToolCallFunctionArguments")
        check_images(m.get("images"), "Message.messages")
        if m.get("role") not in ROLES:
            raise BadRequest(f"invalid role: {m.get('role')}")


def tool_to_call(body: dict) -> str | None:
    tools, messages = body.get("tools"), body.get("messages") or []
    if not tools or not messages or messages[-1].get("role") != "user":
        return None
    if "weather" not in messages[-1].get("content", "").lower():
        return None
    return (tools[0].get("function") or {}).get("name", "tool")


class BaseHandler(FakeHandler):
    def initialize(self, state: FakeState) -> None:
        super().initialize(state)
        self.body: dict = {}

    def set_default_headers(self) -> None:
        self.set_header("content-type", "application/json; charset=utf-8")

    def compute_etag(self) -> None:
        return None

    def fail(self, status: int, message: str | None = None) -> None:
        self.set_status(status)
        self.finish(orjson.dumps({"error": message or MESSAGES.get(status, MESSAGES[500])}))

    def write_error(self, status_code: int, **kwargs) -> None:
        self.write(orjson.dumps({"error": MESSAGES.get(status_code, "error")}))

    async def prepare(self) -> None:
        state, req = self.state, self.request
        body, bad_json = self.read_json()
        if state.api_key is not None and req.headers.get("Authorization") != f"Bearer {state.api_key}":
            return self.fail(401)
        if state.raw_reply is not None:
            return await self.send_raw(state.raw_reply)
        if state.fail_times > 0:
            state.fail_times -= 1
            return self.fail(state.fail_status)
        if req.method == "POST":
            if bad_json or not isinstance(body, dict):
                return self.fail(400, "invalid character looking for beginning of value")
            model = body.get("model")
            if not model:
                return self.fail(400, "model is required")
            if model.removesuffix(":latest") not in state.models:
                return self.fail(404, f'model "{model}" not found, try pulling it first')
            if body.get("options") is not None and not isinstance(body["options"], dict):
                return self.fail(400, "json: cannot unmarshal into Go struct field options of type map")
            self.body = body
            self.streaming = body.get("stream", True) is not False  # Ollama streams by default
        if state.latency:
            await self.pause(state.latency)

    def pieces(self, echo: str) -> tuple[list[str], str]:
        """The reply split in stream pieces (one token per word), and the done_reason."""
        body = self.body
        text = self.state.reply_text if self.state.reply_text is not None else "echo: " + echo
        if body.get("format"):
            text = orjson.dumps({"echo": text}).decode()
        pieces = _PIECE.findall(text) or ([text] if text else [])
        limit = (body.get("options") or {}).get("num_predict")
        if isinstance(limit, int) and 0 <= limit < len(pieces):
            return pieces[:limit], "length"
        return pieces, "stop"

    def final(self, prompt_tokens: int, completion_tokens: int, done_reason: str) -> dict:
        return {"done": True, "done_reason": done_reason, "total_duration": 5_000_000,
                "load_duration": 1_000_000, "prompt_eval_count": prompt_tokens, "prompt_eval_duration": 1_000_000,
                "eval_count": completion_tokens, "eval_duration": 3_000_000}

    async def reply(self, lines: list[dict], last: dict) -> None:
        """The whole reply: one JSON object, or NDJSON lines with knobs for delays and failures."""
        state = self.state
        if not self.streaming:
            return self.finish(orjson.dumps(last))
        self.set_header("content-type", "application/x-ndjson")
        for k, line in enumerate(lines + [last]):
            if k == state.fail_mid_stream_after:
                return self.cut_stream()
            if k == state.error_mid_stream_after:
                self.write(orjson.dumps({"error": MESSAGES[500]}) + b"\n")
                self.streaming = False
                return self.finish()
            if not await self.send_frame(orjson.dumps(line) + b"\n", after_delay=k > 0):
                return
        self.end_stream()


class ChatHandler(BaseHandler):
    async def post(self) -> None:
        body = self.body
        try:
            check_messages(body.get("messages"))
        except BadRequest as exc:
            return self.fail(exc.status, exc.message)
        messages = body["messages"]
        prompt = sum(words(m.get("content", "")) for m in messages)
        head = {"model": body["model"], "created_at": now()}
        name = tool_to_call(body)
        if name:
            call = {"function": {"name": name, "arguments": {"location": "Paris"}}}
            message = {"role": "assistant", "content": "", "tool_calls": [call]}
            lines = [{**head, "message": message, "done": False}]
            last = {**head, "message": {"role": "assistant", "content": ""}, **self.final(prompt, 4, "stop")}
            if not self.streaming:
                last["message"] = message
            return await self.reply(lines, last)
        echo = messages[-1].get("content", "") if messages else ""
        pieces, reason = self.pieces(echo)
        lines = [{**head, "message": {"role": "assistant", "content": p}, "done": False} for p in pieces]
        text = "" if self.streaming else "".join(pieces)
        last = {**head, "message": {"role": "assistant", "content": text}, **self.final(prompt, len(pieces), reason)}
        await self.reply(lines, last)


class GenerateHandler(BaseHandler):
    async def post(self) -> None:
        body = self.body
        prompt = body.get("prompt", "")
        try:
            if not isinstance(prompt, str):
                raise BadRequest("json: cannot unmarshal array into Go struct field GenerateRequest.prompt of "
                                 "type string")
            check_images(body.get("images"), "GenerateRequest")
        except BadRequest as exc:
            return self.fail(exc.status, exc.message)
        head = {"model": body["model"], "created_at": now()}
        if not prompt:  # Ollama just loads the model
            self.streaming = False
            return self.finish(orjson.dumps({**head, "response": "", "done": True, "done_reason": "load"}))
        lines_of_prompt = [line for line in prompt.splitlines() if line.strip()]
        pieces, reason = self.pieces(lines_of_prompt[-1].strip() if lines_of_prompt else "")
        tokens = words(prompt) + words(body.get("system") or "")
        lines = [{**head, "response": p, "done": False} for p in pieces]
        text = "" if self.streaming else "".join(pieces)
        last = {**head, "response": text, **self.final(tokens, len(pieces), reason), "context": [1, 2, 3]}
        await self.reply(lines, last)


class EmbedHandler(BaseHandler):
    async def post(self) -> None:
        body = self.body
        inputs = body.get("input")
        inputs = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs):
            return self.fail(400, "invalid input type")
        dims = body.get("dimensions") or EMBEDDING_DIM
        self.finish(orjson.dumps({"model": body["model"], "embeddings": [embedding(x, dims) for x in inputs],
                                  "total_duration": 2_000_000, "load_duration": 1_000_000,
                                  "prompt_eval_count": sum(words(x) for x in inputs)}))


class LegacyEmbeddingsHandler(BaseHandler):
    async def post(self) -> None:
        self.finish(orjson.dumps({"embedding": embedding(str(self.body.get("prompt", "")), EMBEDDING_DIM)}))


class TagsHandler(BaseHandler):
    def get(self) -> None:
        self.finish(orjson.dumps({"models": [
            {"name": f"{m}:latest", "model": f"{m}:latest", "modified_at": "2025-01-01T00:00:00Z", "size": 1,
             "digest": hashlib.sha256(m.encode()).hexdigest(), "details": {"format": "gguf"}}
            for m in self.state.models]}))


class VersionHandler(BaseHandler):
    def get(self) -> None:
        self.finish(orjson.dumps({"version": "0.12.0"}))


class RootHandler(BaseHandler):
    def get(self) -> None:
        self.set_header("content-type", "text/plain; charset=utf-8")
        self.finish(b"Ollama is running")


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        self.record(None)
        self.set_status(404)
        self.set_header("content-type", "text/plain")
        self.finish(b"404 page not found")


def make_app(state: FakeState) -> tornado.web.Application:
    args = {"state": state}
    return tornado.web.Application(
        [(r"/api/chat", ChatHandler, args), (r"/api/generate", GenerateHandler, args),
         (r"/api/embed", EmbedHandler, args), (r"/api/embeddings", LegacyEmbeddingsHandler, args),
         (r"/api/tags", TagsHandler, args), (r"/api/version", VersionHandler, args), (r"/", RootHandler, args)],
        default_handler_class=NotFoundHandler, default_handler_args=args, log_function=lambda handler: None)


def main(argv=None) -> None:
    p = standalone_parser("Fake Ollama server.")
    args = p.parse_args(argv)
    run_standalone(lambda: make_app(FakeState(latency=args.latency, chunk_delay=args.chunk_delay, record=False)), args)


if __name__ == "__main__":
    main()
