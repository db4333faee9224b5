"""A fake OpenAI-compatible provider (api.openai.com / openrouter.ai wire format) on Tornado.

Azure OpenAI paths (``/openai/deployments/<name>/...``) behave as Azure does: the model comes
from the path, ``api-version`` is required (404 "Resource not found" without it), a wrong key
gets Azure's 401 body, and chat replies carry ``prompt_filter_results`` (a stream opens with a
chunk that has no choices, only those results).

``/v1/responses`` is OpenAI's Responses API: the fake answers ``response`` objects (or the typed
event stream, ``event:`` lines and ``sequence_number``s, no ``[DONE]``), keeps them (``store``,
default true) for ``previous_response_id`` and ``GET`` / ``DELETE /v1/responses/{id}``, and
echoes the last user text or function-call output (a function call when tools are offered and
the last user text asks about the weather). Azure's ``/openai/responses?api-version=`` too.

Tests serve it in-process with `common.listen(make_app(FakeState(...)))`, turn the knobs on the
state and assert on `state.received`. The benchmark runs it standalone:

    python -m contrib.fake_providers.openai_compat --port 9001 --latency 0.05 --chunks 20
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import struct
import time
import uuid
from dataclasses import dataclass, field

import multipart
import orjson
import tornado.web

from .common import FakeHandler, RawReply, Received, run_standalone, standalone_parser

MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-3.5-turbo-instruct", "text-embedding-3-small")
FINGERPRINT = "fp_fake00001"
EMBEDDING_DIM = 8
OPENROUTER_COMMENT = b": OPENROUTER PROCESSING\n\n"
DEFAULT_MODERATION_MODEL = "omni-moderation-latest"
MODERATION_CATEGORIES = ("harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
                         "illicit/violent", "self-harm", "self-harm/intent", "self-harm/instructions", "sexual",
                         "sexual/minors", "violence", "violence/graphic")
PNG_HEADER = b"\x89PNG\r\n\x1a\n"
AUDIO_TYPES = {"mp3": "audio/mpeg", "opus": "audio/opus", "aac": "audio/aac", "flac": "audio/flac",
               "wav": "audio/wav", "pcm": "audio/pcm"}

_PIECE = re.compile(r"\s*\S+\s*")  # a word with its trailing whitespace
_DEPLOYMENT = re.compile(r"/deployments/([^/]+)/")  # Azure: the model is in the path

# status -> (type, code, message), as OpenAI sends them.
ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided. You can find "
          "your API key at https://platform.openai.com/account/api-keys."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Forbidden."),
    404: ("invalid_request_error", None, "Not found."),
    405: ("invalid_request_error", None, "Method not allowed."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests per min (RPM): "
          "Limit 3, Used 3, Requested 1. Please try again in 1s."),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}
BAD_JSON = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
    "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
    "sent was not valid JSON.)"
)
# Azure's own error bodies: {"error": {"code", "message"}}.
AZURE_ERRORS = {
    401: "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid "
         "key for an active subscription and use a correct regional API endpoint for your resource.",
    404: "Resource not found",
    429: "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have "
         "exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after 1 second.",
}
AZURE_FILTER = {"hate": {"filtered": False, "severity": "safe"}, "self_harm": {"filtered": False, "severity": "safe"},
                "sexual": {"filtered": False, "severity": "safe"}, "violence": {"filtered": False, "severity": "safe"}}
NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)


@dataclass
class FakeState:
    """Knobs (set by tests, may change between requests) and observations for one fake server.

    Order per request: record -> auth (401) -> injected failure -> JSON/model check (400) ->
    latency -> reply. Errors are answered without latency.
    """

    api_key: str | None = None  # Bearer (or Azure `api-key`) must match, else 401
    latency: float = 0.0  # before the reply / before the first stream chunk
    chunk_delay: float = 0.0  # between stream chunks
    fail_times: int = 0  # the next N requests fail with fail_status (counts down)
    fail_status: int = 500
    retry_after: str | None = None  # on injected failures; 429 sends "1" when unset
    fail_mid_stream_after: int | None = None  # close the socket after N content chunks
    openrouter_comments: bool = False  # ": OPENROUTER PROCESSING" before every chunk
    reply_text: str | None = None  # default: "echo: " + last user message
    stream_chunks: int | None = None  # reply is N pieces of "tok " (stream and non-stream)
    raw_reply: RawReply | None = None  # answer with exactly these bytes (common.RawReply)
    record: bool = True  # standalone mode turns this off so memory stays flat
    speech_chunks: int = 4  # /audio/speech sends its audio in this many pieces
    speech_bytes: int = 64 * 1024  # of this much audio
    speech_pause: float = 0.02  # seconds between the pieces
    speech_gate: asyncio.Event | None = None  # pieces after the first wait for it
    speech_bytes_sent: int = 0
    received: list[Received] = field(default_factory=list)
    stream_aborted: bool = False  # a client left before [DONE]
    streams_finished: int = 0  # streams that sent [DONE]
    responses: dict = field(default_factory=dict)  # Responses API: id -> (response, conversation items)

    def count(self, path_suffix: str) -> int:
        return sum(1 for r in self.received if r.path.endswith(path_suffix))


def error_body(status: int, message: str | None = None, *, code=..., param=None) -> bytes:
    type_, default_code, default_message = ERRORS.get(status, ERRORS[500 if status >= 500 else 400])
    return orjson.dumps({"error": {
        "message": message or default_message,
        "type": type_,
        "param": param,
        "code": default_code if code is ... else code,
    }})


def text_of(content) -> str:
    """Message content as text: a string, or the text parts of a content list joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def prompt_text(prompt) -> tuple[str, int]:
    """Legacy `prompt` (str, [str], [int] or [[int]]) -> (text to echo, prompt tokens)."""
    items = prompt if isinstance(prompt, list) else [prompt]
    if items and all(isinstance(x, int) for x in items):
        items = [items]
    text = " ".join(x for x in items if isinstance(x, str))
    tokens = sum(len(x.split()) if isinstance(x, str) else len(x) for x in items)
    return text, tokens


def embedding(item) -> list[float]:
    """EMBEDDING_DIM deterministic float32 values in [-1, 1) derived from the input."""
    digest = hashlib.sha256(orjson.dumps(item)).digest()
    raw = struct.unpack(f"<{EMBEDDING_DIM}I", digest[: 4 * EMBEDDING_DIM])
    floats = [u / 2**31 - 1.0 for u in raw]
    return list(struct.unpack(f"<{EMBEDDING_DIM}f", struct.pack(f"<{EMBEDDING_DIM}f", *floats)))


def tool_call(body: dict) -> dict | None:
    """The tool call to make, if the request offers tools and asks about the weather."""
    tools = body.get("tools")
    users = [m for m in body.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
    if not tools or not users or "weather" not in text_of(users[-1].get("content")).lower():
        return None
    name = tools[0].get("function", {}).get("name", "tool")
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": name, "arguments": '{"location":"Paris"}'}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class BaseHandler(FakeHandler):
    """Records, authenticates, injects failures and parses JSON; owns error bodies and SSE."""

    def initialize(self, state: FakeState) -> None:
        super().initialize(state)
        self.body: dict = {}
        self.include_usage = False
        self.azure = "/openai/deployments/" in self.request.path or "/openai/responses" in self.request.path

    def set_default_headers(self) -> None:
        self.set_header("content-type", "application/json")
        self.set_header("x-request-id", "req_" + uuid.uuid4().hex)

    def compute_etag(self) -> None:
        return None

    def fail(self, status: int, message: str | None = None, **kw) -> None:
        self.set_status(status)
        if self.azure and status in AZURE_ERRORS:
            return self.finish(orjson.dumps({"error": {"code": str(status), "message": AZURE_ERRORS[status]}}))
        self.finish(error_body(status, message, **kw))

    def write_error(self, status_code: int, **kwargs) -> None:
        self.write(error_body(status_code))

    async def prepare(self) -> None:
        state, req = self.state, self.request
        body, bad_json = self.read_json()
        if not await self.admitted():
            return
        if req.method == "POST":
            if bad_json or not isinstance(body, dict):
                return self.fail(400, BAD_JSON)
            self.body = body
            if (m := _DEPLOYMENT.search(req.path)) and not body.get("model"):
                body["model"] = m.group(1)
            if not body.get("model") and req.path.endswith("/moderations"):
                body["model"] = DEFAULT_MODERATION_MODEL  # optional there, as in OpenAI's API
            if not body.get("model"):
                return self.fail(400, "you must provide a model parameter")
            self.streaming = body.get("stream") is True
            self.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if state.latency:
            await self.pause(state.latency)

    async def admitted(self) -> bool:
        """Auth, Azure's api-version, raw replies and injected failures, from the head alone;
        False once one of them has answered."""
        state = self.state
        if state.api_key is not None:
            auth = self.request.headers.get("Authorization", "")
            key = auth[7:] if auth.startswith("Bearer ") else self.request.headers.get("api-key")
            if not key:
                self.fail(401, NO_KEY, code=None)
                return False
            if key != state.api_key:
                self.fail(401)  # never echo the presented key
                return False
        if self.azure and not self.get_query_argument("api-version", None):
            self.fail(404)
            return False
        if state.raw_reply is not None:
            await self.send_raw(state.raw_reply)
            return False
        if state.fail_times > 0:
            state.fail_times -= 1
            retry_after = state.retry_after or ("1" if state.fail_status == 429 else None)
            if retry_after is not None:
                self.set_header("retry-after", retry_after)
            self.fail(state.fail_status)
            return False
        return True

    def reply_pieces(self, echo: str) -> list[str]:
        """The reply as stream pieces; joined, they are the non-stream content."""
        state = self.state
        if state.stream_chunks is not None:
            return ["tok "] * state.stream_chunks
        text = state.reply_text if state.reply_text is not None else "echo: " + echo
        return _PIECE.findall(text) or ([text] if text else [])

    def send_json(self, obj: dict) -> None:
        self.finish(orjson.dumps(obj))

    async def send_stream(self, head: list[dict], content: list[dict], tail: list[dict]) -> None:
        """Send SSE events, flushing each; honour chunk_delay, comments and mid-stream failure."""
        state = self.state
        self.set_header("content-type", "text/event-stream")
        self.set_header("cache-control", "no-cache")
        cut = None if state.fail_mid_stream_after is None else len(head) + state.fail_mid_stream_after
        for i, event in enumerate(head + content + tail):
            if i == cut:
                return self.cut_stream()  # no [DONE]
            comment = OPENROUTER_COMMENT if state.openrouter_comments else b""
            if not await self.send_frame(comment + b"data: " + orjson.dumps(event) + b"\n\n", after_delay=i > 0):
                return
        if await self.send_frame(b"data: [DONE]\n\n", after_delay=False):
            self.end_stream()


class ChatCompletionsHandler(BaseHandler):
    async def post(self) -> None:
        body = self.body
        messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
        prompt_tokens = sum(len(text_of(m.get("content")).split()) for m in messages)
        users = [m for m in messages if m.get("role") == "user"]
        n = int(body.get("n") or 1)
        call = tool_call(body)
        if call:
            pieces = re.findall(r"\w+|\W+", call["function"]["arguments"])
            message = {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None}
            finish = "tool_calls"
        else:
            pieces = self.reply_pieces(text_of(users[-1].get("content")) if users else "")
            message = {"role": "assistant", "content": "".join(pieces), "refusal": None}
            finish = "stop"
        use = usage(prompt_tokens, n * len(pieces))
        cid, created = "chatcmpl-" + uuid.uuid4().hex[:29], int(time.time())

        def envelope(obj: str) -> dict:
            return {"id": cid, "object": obj, "created": created, "model": body["model"],
                    "system_fingerprint": FINGERPRINT}

        if not self.streaming:
            choices = [{"index": i, "message": message, "logprobs": None, "finish_reason": finish}
                       for i in range(n)]
            reply = {**envelope("chat.completion"), "choices": choices, "usage": use}
            if self.azure:
                reply["prompt_filter_results"] = [{"prompt_index": 0, "content_filter_results": AZURE_FILTER}]
                for choice in choices:
                    choice["content_filter_results"] = AZURE_FILTER
            return self.send_json(reply)

        def chunk(i: int, delta: dict, finish_reason: str | None = None) -> dict:
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            out = {**envelope("chat.completion.chunk"), "choices": [choice]}
            return {**out, "usage": None} if self.include_usage else out

        if call:
            first = {"index": 0, **call, "function": {**call["function"], "arguments": ""}}
            head = [chunk(i, {"role": "assistant", "content": None, "tool_calls": [first]}) for i in range(n)]
            content = [chunk(i, {"tool_calls": [{"index": 0, "function": {"arguments": p}}]})
                       for p in pieces for i in range(n)]
        else:
            head = [chunk(i, {"role": "assistant", "content": ""}) for i in range(n)]
            content = [chunk(i, {"content": p}) for p in pieces for i in range(n)]
        tail = [chunk(i, {}, finish) for i in range(n)]
        if self.include_usage:
            tail.append({**envelope("chat.completion.chunk"), "choices": [], "usage": use})
        if self.azure:
            head.insert(0, {"choices": [], "created": 0, "id": "", "model": "", "object": "",
                            "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": AZURE_FILTER}]})
        await self.send_stream(head, content, tail)


class CompletionsHandler(BaseHandler):
    async def post(self) -> None:
        body = self.body
        echo, prompt_tokens = prompt_text(body.get("prompt", ""))
        n = int(body.get("n") or 1)
        pieces = self.reply_pieces(echo)
        use = usage(prompt_tokens, n * len(pieces))
        base = {"id": "cmpl-" + uuid.uuid4().hex[:29], "object": "text_completion",
                "created": int(time.time()), "model": body["model"],
                "system_fingerprint": FINGERPRINT}

        def choice(i: int, text: str, finish: str | None) -> dict:
            return {"text": text, "index": i, "logprobs": None, "finish_reason": finish}

        if not self.streaming:
            text = "".join(pieces)
            return self.send_json({**base, "choices": [choice(i, text, "stop") for i in range(n)],
                                   "usage": use})
        extra = {"usage": None} if self.include_usage else {}
        content = [{**base, "choices": [choice(i, p, None)], **extra} for p in pieces for i in range(n)]
        tail = [{**base, "choices": [choice(i, "", "stop")], **extra} for i in range(n)]
        if self.include_usage:
            tail.append({**base, "choices": [], "usage": use})
        await self.send_stream([], content, tail)


class EmbeddingsHandler(BaseHandler):
    async def post(self) -> None:
        body = self.body
        inp = body.get("input")
        if isinstance(inp, str) or (isinstance(inp, list) and inp and all(isinstance(x, int) for x in inp)):
            inp = [inp]
        if not isinstance(inp, list) or not inp or not all(isinstance(x, (str, list)) for x in inp):
            return self.fail(400, "'$.input' is invalid. Please check the API reference: "
                                  "https://platform.openai.com/docs/api-reference.", param="input")
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for i, item in enumerate(inp):
            vec = embedding(item)
            if as_base64:
                vec = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
            data.append({"object": "embedding", "index": i, "embedding": vec})
        tokens = sum(len(x.split()) if isinstance(x, str) else len(x) for x in inp)
        self.send_json({"object": "list", "data": data, "model": body["model"],
                        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def moderation_result(text: str) -> dict:
    """OpenAI's result for one input: flagged (violence) when it mentions killing."""
    violent = "kill" in text.lower()
    scores = {c: 0.0001 for c in MODERATION_CATEGORIES}
    scores["violence"] = 0.91 if violent else 0.0002
    return {"flagged": violent, "categories": {c: scores[c] > 0.5 for c in MODERATION_CATEGORIES},
            "category_scores": scores,
            "category_applied_input_types": {c: ["text"] for c in MODERATION_CATEGORIES}}


class ModerationsHandler(BaseHandler):
    async def post(self) -> None:
        inp = self.body.get("input")
        items = [inp] if isinstance(inp, str) else inp
        if not isinstance(items, list) or not items:
            return self.fail(400, "'$.input' is invalid.", param="input")
        texts = [x if isinstance(x, str) else str((x or {}).get("text", "")) if isinstance(x, dict) else ""
                 for x in items]
        if any(isinstance(x, dict) for x in items):
            texts = [" ".join(texts)]  # multi-modal input: one result for the whole list
        self.send_json({"id": "modr-" + uuid.uuid4().hex[:24], "model": self.body["model"],
                        "results": [moderation_result(t) for t in texts]})


class ImagesHandler(BaseHandler):
    """dall-e: ``url`` (default) or ``b64_json``; gpt-image: always ``b64_json``, with usage."""

    async def post(self) -> None:
        body = self.body
        n, prompt, model = int(body.get("n") or 1), str(body.get("prompt") or ""), body["model"]
        gpt_image = model.startswith("gpt-image")
        b64 = gpt_image or body.get("response_format") == "b64_json"
        data = []
        for i in range(n):
            image = PNG_HEADER + hashlib.sha256(f"{prompt}/{i}".encode()).digest()
            item = ({"b64_json": base64.b64encode(image).decode()} if b64
                    else {"url": f"https://images.fake/{uuid.uuid4().hex}.png"})
            if model.startswith("dall-e-3"):
                item["revised_prompt"] = "A picture of " + prompt
            data.append(item)
        reply = {"created": int(time.time()), "data": data}
        if gpt_image:
            tokens = len(prompt.split())
            reply["usage"] = {"input_tokens": tokens, "output_tokens": 1056 * n, "total_tokens": tokens + 1056 * n,
                              "input_tokens_details": {"text_tokens": tokens, "image_tokens": 0}}
        self.send_json(reply)


def speech_audio(text: str, size: int) -> bytes:
    """``size`` deterministic bytes standing for the audio of ``text`` (an ID3 head first)."""
    seed = hashlib.sha256(text.encode()).digest()
    return (b"ID3\x04\x00\x00" + seed * (size // len(seed) + 1))[:size]


class SpeechHandler(BaseHandler):
    """The audio in ``state.speech_chunks`` pieces, chunked, ``speech_pause`` apart; with
    ``state.speech_gate`` set, everything after the first piece waits for that event (a
    test sets it once the first bytes came through), so streaming can be shown without timing."""

    async def post(self) -> None:
        state, body = self.state, self.body
        if not isinstance(body.get("input"), str) or not body.get("voice"):
            return self.fail(400, "Missing required parameter: 'input' or 'voice'.")
        audio = speech_audio(body["input"], state.speech_bytes)
        self.set_header("content-type", AUDIO_TYPES.get(body.get("response_format") or "mp3", "audio/mpeg"))
        step = -(-len(audio) // max(state.speech_chunks, 1))
        self.streaming = True
        for i in range(0, len(audio), step):
            if i and state.speech_gate is not None:
                await asyncio.wait_for(state.speech_gate.wait(), 10)
            if i and state.speech_pause:
                await self.pause(state.speech_pause)
            if not await self.send_frame(audio[i:i + step], after_delay=False):
                return
            state.speech_bytes_sent += len(audio[i:i + step])
        self.end_stream()


@tornado.web.stream_request_body
class TranscriptionsHandler(BaseHandler):
    """Transcriptions and translations: a real multipart/form-data body, parsed as it arrives
    (the file is hashed, never kept); the reply echoes what came in (file name, type, size,
    sha256 and the other fields) in the shape ``response_format`` asks for."""

    async def prepare(self) -> None:
        req = self.request
        self.received = Received(req.method, req.path, req.query, {k.lower(): v for k, v in req.headers.items()}, None)
        if self.state.record:
            self.state.received.append(self.received)
        self.parser, self.fields, self.file, self.bad = None, {}, None, None
        if not await self.admitted():
            return
        kind, options = multipart.parse_options_header(req.headers.get("Content-Type", ""))
        if kind != "multipart/form-data" or not options.get("boundary"):
            return self.fail(400, "Invalid Content-Type header: expected multipart/form-data with a boundary.")
        self.parser = multipart.PushMultipartParser(options["boundary"])
        self.part, self.value, self.digest = None, bytearray(), None

    def data_received(self, chunk: bytes) -> None:
        if self.parser is None or self.bad:
            return
        try:
            for event in self.parser.parse(chunk):
                self.on_event(event)
        except multipart.MultipartError as exc:
            self.bad = str(exc)

    def on_event(self, event) -> None:
        if isinstance(event, multipart.MultipartSegment):
            self.part, self.value = event, bytearray()
            self.digest = hashlib.sha256() if event.filename is not None else None
        elif event is None:
            part = self.part
            if self.digest is not None:
                self.file = {"field": part.name, "filename": part.filename, "content_type": part.content_type,
                             "size": part.size, "sha256": self.digest.hexdigest()}
            else:
                self.fields.setdefault(part.name, self.value.decode("utf-8", "replace"))
        elif self.digest is not None:
            self.digest.update(event)
        else:
            self.value += event

    async def post(self) -> None:
        if not self.bad:
            try:
                self.parser.close()
            except multipart.MultipartError as exc:
                self.bad = str(exc)
        if self.bad:
            return self.fail(400, f"Could not parse multipart form: {self.bad}")
        fields = dict(self.fields)
        if (m := _DEPLOYMENT.search(self.request.path)) and not fields.get("model"):
            fields["model"] = m.group(1)
        self.received.body = {**fields, "file": self.file}
        if not fields.get("model"):
            return self.fail(400, "you must provide a model parameter", param="model")
        if self.file is None or self.file["field"] != "file":
            return self.fail(400, "Missing required parameter: 'file'.", param="file")
        if self.state.latency:
            await self.pause(self.state.latency)
        self.answer(fields, self.file)

    def answer(self, fields: dict, file: dict) -> None:
        task = "translate" if self.request.path.endswith("/translations") else "transcribe"
        others = ", ".join(f"{k}={v}" for k, v in sorted(fields.items()))
        text = (f"{task} of {file['filename']} ({file['content_type']}, {file['size']} bytes, sha256 {file['sha256']}) "
                f"with {others}")
        seconds = max(1, file["size"] // 16000)
        fmt = fields.get("response_format") or "json"
        if fmt in ("text", "srt", "vtt"):
            self.set_header("content-type", "text/plain; charset=utf-8")
            if fmt == "srt":
                return self.finish(f"1\n00:00:00,000 --> 00:00:{min(seconds, 59):02d},000\n{text}\n\n")
            if fmt == "vtt":
                return self.finish(f"WEBVTT\n\n00:00:00.000 --> 00:00:{min(seconds, 59):02d}.000\n{text}\n\n")
            return self.finish(text + "\n")
        if fields["model"].startswith("gpt-4o"):
            tokens = len(text.split())
            use = {"type": "tokens", "input_tokens": seconds * 10, "output_tokens": tokens,
                   "total_tokens": seconds * 10 + tokens}
        else:
            use = {"type": "duration", "seconds": seconds}
        if fmt == "verbose_json":
            return self.send_json({"task": task, "language": "english", "duration": float(seconds), "text": text,
                                   "segments": [{"id": 0, "seek": 0, "start": 0.0, "end": float(seconds),
                                                 "text": text, "tokens": [], "temperature": 0.0,
                                                 "avg_logprob": -0.2, "compression_ratio": 1.0,
                                                 "no_speech_prob": 0.01}],
                                   "usage": use})
        self.send_json({"text": text, "usage": use})


def response_items(value) -> list[dict]:
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}]
    return [item for item in value or () if isinstance(item, dict)]


def item_text(item: dict) -> str:
    if item.get("type") == "function_call_output":
        out = item.get("output")
        return out if isinstance(out, str) else text_of(out)
    content = item.get("content")
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return content if isinstance(content, str) else ""


class ResponsesHandler(BaseHandler):
    """``POST /v1/responses`` as OpenAI answers it (see the module doc)."""

    async def post(self) -> None:
        body, state = self.body, self.state
        items = response_items(body.get("input"))
        previous = body.get("previous_response_id")
        if previous is not None:
            if previous not in state.responses:
                return self.fail(400, f"Previous response with id '{previous}' not found.",
                                 code="previous_response_not_found", param="previous_response_id")
            items = state.responses[previous][1] + items
        last = items[-1] if items else {}
        words = sum(len(item_text(i).split()) for i in items) + len((body.get("instructions") or "").split())
        tools = [t for t in body.get("tools") or () if t.get("type") == "function"]
        rid, created = "resp_" + uuid.uuid4().hex, int(time.time())
        if tools and last.get("role") == "user" and "weather" in item_text(last).lower():
            args = '{"location":"Paris"}'
            pieces = re.findall(r"\w+|\W+", args)
            item = {"id": "fc_" + uuid.uuid4().hex, "type": "function_call", "status": "completed",
                    "call_id": "call_" + uuid.uuid4().hex[:24], "name": tools[0].get("name"), "arguments": args}
        else:
            pieces = self.reply_pieces(item_text(last))
            item = {"id": "msg_" + uuid.uuid4().hex, "type": "message", "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": "".join(pieces), "annotations": [], "logprobs": []}]}
        use = {"input_tokens": words, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": len(pieces),
               "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": words + len(pieces)}
        response = {"id": rid, "object": "response", "created_at": created, "status": "completed", "error": None,
                    "incomplete_details": None, "instructions": body.get("instructions"),
                    "max_output_tokens": body.get("max_output_tokens"), "model": body["model"], "output": [item],
                    "parallel_tool_calls": True, "previous_response_id": previous, "store": body.get("store", True),
                    "temperature": body.get("temperature", 1.0), "text": {"format": {"type": "text"}},
                    "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [],
                    "top_p": body.get("top_p", 1.0), "truncation": "disabled", "usage": use,
                    "user": body.get("user"), "metadata": body.get("metadata") or {}}
        if body.get("store", True) and state.record:  # standalone (benchmark) mode keeps nothing
            state.responses[rid] = (response, items + [item])
        if not self.streaming:
            return self.send_json(response)
        await self.send_events(response, item, pieces)

    async def send_events(self, response: dict, item: dict, pieces: list[str]) -> None:
        state = self.state
        self.set_header("content-type", "text/event-stream")
        started = {**response, "status": "in_progress", "output": [], "usage": None}
        where = {"item_id": item["id"], "output_index": 0}
        if item["type"] == "message":
            text = item["content"][0]["text"]
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            opened = {**item, "status": "in_progress", "content": []}
            content = [("response.output_text.delta", {**where, "content_index": 0, "delta": p, "logprobs": []})
                       for p in pieces]
            closing = [("response.output_text.done", {**where, "content_index": 0, "text": text, "logprobs": []}),
                       ("response.content_part.done", {**where, "content_index": 0, "part": item["content"][0]})]
            head = [("response.output_item.added", {"output_index": 0, "item": opened}),
                    ("response.content_part.added", {**where, "content_index": 0, "part": part})]
        else:
            opened = {**item, "status": "in_progress", "arguments": ""}
            content = [("response.function_call_arguments.delta", {**where, "delta": p}) for p in pieces]
            closing = [("response.function_call_arguments.done", {**where, "name": item["name"],
                                                                   "arguments": item["arguments"]})]
            head = [("response.output_item.added", {"output_index": 0, "item": opened})]
        head = [("response.created", {"response": started}), ("response.in_progress", {"response": started}),
                *head]
        tail = [*closing, ("response.output_item.done", {"output_index": 0, "item": item}),
                ("response.completed", {"response": response})]
        cut = None if state.fail_mid_stream_after is None else len(head) + state.fail_mid_stream_after
        for i, (name, data) in enumerate(head + content + tail):
            if i == cut:
                return self.cut_stream()
            frame = b"event: " + name.encode() + b"\ndata: " + orjson.dumps(
                {"type": name, **data, "sequence_number": i}) + b"\n\n"
            if not await self.send_frame(frame, after_delay=i > 0):
                return
        self.end_stream()


class InputItemsHandler(BaseHandler):
    """``GET /v1/responses/{id}/input_items``: the input items the response was made from,
    as OpenAI lists them (``limit``, ``order``, default ``desc``)."""

    def get(self, response_id: str) -> None:
        found = self.state.responses.get(response_id)
        if found is None:
            return self.fail(404, f"Response with id '{response_id}' not found.", code=None)
        items = [{"id": item.get("id") or f"msg_in_{n}", **item} for n, item in enumerate(found[1][:-1])]
        if self.get_query_argument("order", "desc") == "desc":
            items.reverse()
        limit = int(self.get_query_argument("limit", "20"))
        page = items[:limit]
        self.send_json({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                        "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit})


class StoredResponseHandler(BaseHandler):
    """``GET`` / ``DELETE /v1/responses/{id}``."""

    def stored(self, response_id: str):
        found = self.state.responses.get(response_id)
        if found is None:
            self.fail(404, f"Response with id '{response_id}' not found.", code=None)
        return found

    def get(self, response_id: str) -> None:
        found = self.stored(response_id)
        if found is not None:
            self.send_json(found[0])

    def delete(self, response_id: str) -> None:
        if self.stored(response_id) is not None:
            del self.state.responses[response_id]
            self.send_json({"id": response_id, "object": "response", "deleted": True})


class ModelsHandler(BaseHandler):
    def get(self) -> None:
        self.send_json({"object": "list", "data": [
            {"id": m, "object": "model", "created": 1700000000, "owned_by": "system"} for m in MODELS
        ]})


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:  # record, then 404 like OpenAI; no auth or failure injection
        self.record(None)
        self.fail(404, f"Invalid URL ({self.request.method} {self.request.path})")


def make_app(state: FakeState) -> tornado.web.Application:
    args = {"state": state}
    return tornado.web.Application(
        [
            (r".*/moderations", ModerationsHandler, args),
            (r".*/images/generations", ImagesHandler, args),
            (r".*/audio/speech", SpeechHandler, args),
            (r".*/audio/(?:transcriptions|translations)", TranscriptionsHandler, args),
            (r".*/chat/completions", ChatCompletionsHandler, args),
            (r".*/responses", ResponsesHandler, args),
            (r".*/responses/([^/]+)", StoredResponseHandler, args),
            (r".*/responses/([^/]+)/input_items", InputItemsHandler, args),
            (r".*/completions", CompletionsHandler, args),
            (r".*/embeddings", EmbeddingsHandler, args),
            (r".*/models", ModelsHandler, args),
        ],
        default_handler_class=NotFoundHandler,
        default_handler_args=args,
        log_function=lambda handler: None,  # no access log: cheap under the benchmark
    )


def main(argv=None) -> None:
    p = standalone_parser("Fake OpenAI-compatible provider.")
    p.add_argument("--chunks", type=int, default=None, help='content chunks of "tok " per stream')
    p.add_argument("--api-key", default=None, help="require this bearer key")
    p.add_argument("--openrouter-comments", action="store_true")
    args = p.parse_args(argv)
    run_standalone(lambda: make_app(FakeState(api_key=args.api_key, latency=args.latency, chunk_delay=args.chunk_delay,
                               stream_chunks=args.chunks, openrouter_comments=args.openrouter_comments,
                               record=False)), args)


if __name__ == "__main__":
    main()
