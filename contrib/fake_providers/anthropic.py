"""A fake Anthropic API (api.anthropic.com wire format) on Tornado: ``POST /v1/messages``, plain
and streamed (SSE with ``event:`` lines), and ``POST /v1/messages/count_tokens``.

Faithful where the gateway can get it wrong: a key (``x-api-key``, or ``Authorization: Bearer``
as current SDKs send it) and ``anthropic-version`` are required, bodies are checked the way
Anthropic checks them (``max_tokens`` required, roles, empty text blocks, every ``tool_result``
answering a ``tool_use`` of the turn before, extra fields on count_tokens), errors are
``{"type": "error", "error": {"type", "message"}}`` with Anthropic's statuses (429 with
``retry-after``, 529 ``overloaded_error``) and a ``request-id``.

Replies: "echo: " + the last user message's text, or a ``tool_use`` per city named (Paris when
none) when tools are offered and the last user message mentions the weather, after a short
text block, as Claude does. ``stop_sequences`` and ``max_tokens`` (one token per word) cut the
reply with the right ``stop_reason``. Tests start it with ``common.listen(make_app(FakeState(...)))``;
standalone: ``python -m contrib.fake_providers.anthropic --port 9002``.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field

import orjson
import tornado.web

from .common import FakeHandler, RawReply, run_standalone, standalone_parser

_PIECE = re.compile(r"\s*\S+\s*")
CITIES = ("Paris", "London", "Tokyo")
TOOL_PREAMBLE = "Let me check."
OVERLOADED_EVENT = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
COUNT_TOKENS_FIELDS = {"model", "messages", "system", "tools", "tool_choice", "thinking", "mcp_servers"}

# status -> (Anthropic error type, default message)
ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    402: ("billing_error", "Your credit balance is too low to access the Anthropic API."),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "Not found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit."),
    500: ("api_error", "Internal server error"),
    504: ("timeout_error", "Request timed out."),
    529: ("overloaded_error", "Overloaded"),
}


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: dict | None


@dataclass
class FakeState:
    """Knobs (tests may change them between requests) and what the fake saw.

    Order per request: record -> auth (401) -> version header (400) -> injected failure ->
    body checks (400) -> latency -> reply."""

    api_key: str | None = None
    latency: float = 0.0                   # before the reply / the first event
    chunk_delay: float = 0.0               # between stream events
    fail_times: int = 0                    # the next N requests fail with fail_status
    fail_status: int = 500
    retry_after: str | None = None         # on injected failures; 429 sends "1" when unset
    fail_mid_stream_after: int | None = None   # close the socket after N content deltas
    error_mid_stream_after: int | None = None  # send an `error` event after N content deltas
    reply_text: str | None = None
    cache_read_tokens: int = 0             # reported as cache_read_input_tokens
    cache_creation_tokens: int = 0         # reported as cache_creation_input_tokens
    raw_reply: RawReply | None = None  # answer with exactly these bytes (common.RawReply)
    record: bool = True
    received: list[Received] = field(default_factory=list)
    stream_aborted: bool = False
    streams_finished: int = 0

    def count(self, path_suffix: str) -> int:
        return sum(1 for r in self.received if r.path.endswith(path_suffix))


def error_body(status: int, message: str | None = None) -> bytes:
    kind, default = ERRORS.get(status, ERRORS[500 if status >= 500 else 400])
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message or default},
                         "request_id": "req_" + uuid.uuid4().hex[:24]})


class BadRequest(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def block_text(content) -> str:
    if isinstance(content, str):
        return content
    out = []
    for block in content or ():
        if block.get("type") == "text":
            out.append(block.get("text", ""))
        elif block.get("type") == "tool_result":
            out.append(block_text(block.get("content")))
    return " ".join(out)


def words(text: str) -> int:
    return len(text.split())


def input_tokens(body: dict) -> int:
    system = body.get("system")
    total = words(system if isinstance(system, str) else block_text(system))
    return total + sum(words(block_text(m.get("content"))) for m in body.get("messages") or ())


def check_messages(messages) -> None:
    """The checks Anthropic makes that a translating gateway can fail."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: at least one message is required")
    pending_tool_ids: set[str] = set()
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ("user", "assistant"):
            raise BadRequest(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        final_assistant = i == len(messages) - 1 and role == "assistant"
        if (content == "" or content == []) and not final_assistant:
            raise BadRequest(f"messages.{i}: all messages must have non-empty content except for the "
                             "optional final assistant message")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        results = [b.get("tool_use_id") for b in blocks if b.get("type") == "tool_result"]
        if pending_tool_ids and set(results) != pending_tool_ids:
            raise BadRequest(f"messages.{i}.content.0: `tool_use` ids were found without `tool_result` blocks "
                             "immediately after")
        if results and (role != "user" or set(results) - pending_tool_ids):
            raise BadRequest(f"messages.{i}.content.0: unexpected `tool_use_id` found in `tool_result` blocks")
        if results and any(b.get("type") != "tool_result" for b in blocks[:len(results)]):
            raise BadRequest(f"messages.{i}: tool_result blocks must come first in the message content")
        for j, b in enumerate(blocks):
            if b.get("type") == "text" and not b.get("text") and not final_assistant:
                raise BadRequest(f"messages.{i}.content.{j}.text: text content blocks must be non-empty")
        pending_tool_ids = {b.get("id") for b in blocks if b.get("type") == "tool_use"}


class BaseHandler(FakeHandler):
    def initialize(self, state: FakeState) -> None:
        super().initialize(state)
        self.body: dict = {}

    def set_default_headers(self) -> None:
        self.set_header("content-type", "application/json")
        self.set_header("request-id", "req_" + uuid.uuid4().hex[:24])

    def compute_etag(self) -> None:
        return None

    def fail(self, status: int, message: str | None = None) -> None:
        self.set_status(status, "Overloaded" if status == 529 else None)
        self.finish(error_body(status, message))

    def write_error(self, status_code: int, **kwargs) -> None:
        self.write(error_body(status_code))

    async def prepare(self) -> None:
        state, req = self.state, self.request
        try:
            body = orjson.loads(req.body) if req.body else None
        except orjson.JSONDecodeError:
            body = False
        if state.record:
            state.received.append(Received(req.method, req.path, {k.lower(): v for k, v in req.headers.items()},
                                           body if isinstance(body, dict) else None))
        auth = req.headers.get("Authorization", "")  # current SDKs send the key as a Bearer token
        key = req.headers.get("x-api-key") or (auth[7:] if auth.startswith("Bearer ") else None)
        if state.api_key is not None and not key:
            return self.fail(401, "x-api-key header is required")
        if state.api_key is not None and key != state.api_key:
            return self.fail(401, "invalid x-api-key")
        if not req.headers.get("anthropic-version"):
            return self.fail(400, "anthropic-version: header is required")
        if state.raw_reply is not None:
            return await self.send_raw(state.raw_reply)
        if state.fail_times > 0:
            state.fail_times -= 1
            retry_after = state.retry_after or ("1" if state.fail_status == 429 else None)
            if retry_after is not None:
                self.set_header("retry-after", retry_after)
            return self.fail(state.fail_status)
        if not isinstance(body, dict):
            return self.fail(400, "There was an issue with the format of your request: the body is not valid JSON")
        self.body = body
        if not isinstance(body.get("model"), str) or not body["model"]:
            return self.fail(400, "model: Field required")
        try:
            self.check(body)
        except BadRequest as exc:
            return self.fail(400, exc.message)
        if state.latency:
            await self.pause(state.latency)

    def check(self, body: dict) -> None:
        raise NotImplementedError


class MessagesHandler(BaseHandler):
    def check(self, body: dict) -> None:
        if not isinstance(body.get("max_tokens"), int):
            raise BadRequest("max_tokens: Field required")
        check_messages(body.get("messages"))
        for i, tool in enumerate(body.get("tools") or ()):
            if "input_schema" not in tool and tool.get("type") in (None, "custom"):
                raise BadRequest(f"tools.{i}.custom.input_schema: Field required")
        for seq in body.get("stop_sequences") or ():
            if not seq.strip():
                raise BadRequest("stop_sequences: each stop sequence must contain non-whitespace")

    def reply_blocks(self) -> tuple[list[dict], str, str | None]:
        """The content blocks, the stop_reason and the stop_sequence of the answer."""
        body, state = self.body, self.state
        users = [m for m in body["messages"] if m.get("role") == "user"]
        last = block_text(users[-1]["content"]) if users else ""
        tools = body.get("tools") or []
        forced = body.get("tool_choice") or {}
        if forced.get("type") == "tool":
            return [self.tool_use(forced.get("name"), {"location": "Paris"})], "tool_use", None
        if tools and "weather" in last.lower() and forced.get("type") != "none":
            cities = [c for c in CITIES if c.lower() in last.lower()] or ["Paris"]
            name = tools[0].get("name", "tool")
            return ([{"type": "text", "text": TOOL_PREAMBLE}]
                    + [self.tool_use(name, {"location": c}) for c in cities]), "tool_use", None
        text = state.reply_text if state.reply_text is not None else "echo: " + last
        for seq in body.get("stop_sequences") or ():
            if seq in text:
                return [{"type": "text", "text": text[:text.index(seq)]}], "stop_sequence", seq
        pieces = _PIECE.findall(text)
        if len(pieces) > body["max_tokens"]:
            return [{"type": "text", "text": "".join(pieces[: body["max_tokens"]])}], "max_tokens", None
        return [{"type": "text", "text": text}], "end_turn", None

    @staticmethod
    def tool_use(name: str, args: dict) -> dict:
        return {"type": "tool_use", "id": "toolu_" + uuid.uuid4().hex[:24], "name": name, "input": args}

    def usage(self, output_tokens: int) -> dict:
        return {"input_tokens": input_tokens(self.body), "output_tokens": output_tokens,
                "cache_creation_input_tokens": self.state.cache_creation_tokens,
                "cache_read_input_tokens": self.state.cache_read_tokens}

    async def post(self) -> None:
        blocks, stop_reason, stop_sequence = self.reply_blocks()
        output = sum(len(_PIECE.findall(b["text"])) if b["type"] == "text" else 5 for b in blocks)
        message = {"id": "msg_" + uuid.uuid4().hex[:24], "type": "message", "role": "assistant",
                   "model": self.body["model"], "content": blocks, "stop_reason": stop_reason,
                   "stop_sequence": stop_sequence, "usage": self.usage(output)}
        if self.body.get("stream") is not True:
            return self.finish(orjson.dumps(message))
        await self.send_stream(message)

    def events(self, message: dict) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]], list[tuple[str, dict]]]:
        """(head, content deltas, tail) of the event stream for ``message``."""
        start = {**message, "content": [], "stop_reason": None, "stop_sequence": None,
                 "usage": {**message["usage"], "output_tokens": 1}}
        head = [("message_start", {"type": "message_start", "message": start}), ("ping", {"type": "ping"})]
        content: list[tuple[str, dict]] = []
        for i, block in enumerate(message["content"]):
            opening = {**block, "text": ""} if block["type"] == "text" else {**block, "input": {}}
            content.append(("content_block_start", {"type": "content_block_start", "index": i,
                                                    "content_block": opening}))
            if block["type"] == "text":
                deltas = [{"type": "text_delta", "text": p} for p in _PIECE.findall(block["text"])]
            else:
                deltas = [{"type": "input_json_delta", "partial_json": p}
                          for p in ["", *re.findall(r"\w+|\W+", orjson.dumps(block["input"]).decode())]]
            content += [("content_block_delta", {"type": "content_block_delta", "index": i, "delta": d})
                        for d in deltas]
            content.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
        tail = [("message_delta", {"type": "message_delta",
                                   "delta": {"stop_reason": message["stop_reason"],
                                             "stop_sequence": message["stop_sequence"]},
                                   "usage": {"output_tokens": message["usage"]["output_tokens"]}}),
                ("message_stop", {"type": "message_stop"})]
        return head, content, tail

    async def send_stream(self, message: dict) -> None:
        state = self.state
        self.set_header("content-type", "text/event-stream; charset=utf-8")
        self.set_header("cache-control", "no-cache")
        head, content, tail = self.events(message)
        self.streaming = True
        deltas = 0
        for i, (name, data) in enumerate(head + content + tail):
            if name == "content_block_delta":
                if deltas == state.fail_mid_stream_after:
                    return self.cut_stream()
                if deltas == state.error_mid_stream_after:
                    self.write(b"event: error\ndata: " + orjson.dumps(OVERLOADED_EVENT) + b"\n\n")
                    self.streaming = False
                    await self.flush()
                    return self.finish()
                deltas += 1
            if not await self.send_frame(b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n",
                                         after_delay=i > 0):
                return
        self.end_stream()


class CountTokensHandler(BaseHandler):
    def check(self, body: dict) -> None:
        extra = sorted(set(body) - COUNT_TOKENS_FIELDS)
        if extra:
            raise BadRequest(f"{extra[0]}: Extra inputs are not permitted")
        check_messages(body.get("messages"))

    def post(self) -> None:
        self.finish(orjson.dumps({"input_tokens": input_tokens(self.body)}))


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        if self.state.record:
            self.state.received.append(Received(self.request.method, self.request.path, {}, None))
        self.fail(404, f"Not found: {self.request.method} {self.request.path}")


def make_app(state: FakeState) -> tornado.web.Application:
    args = {"state": state}
    return tornado.web.Application(
        [(r"/v1/messages", MessagesHandler, args), (r"/v1/messages/count_tokens", CountTokensHandler, args)],
        default_handler_class=NotFoundHandler, default_handler_args=args, log_function=lambda handler: None)


def main(argv=None) -> None:
    p = standalone_parser("Fake Anthropic API.")
    p.add_argument("--api-key", default=None, help="require this x-api-key")
    args = p.parse_args(argv)
    run_standalone(lambda: make_app(FakeState(api_key=args.api_key, latency=args.latency, chunk_delay=args.chunk_delay, record=False)), args)


if __name__ == "__main__":
    main()
