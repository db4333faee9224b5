"""Issue 9, items 3, 4 and 12: what a misbehaving or hostile provider can send through a stream.

3: an endless line is parsed in linear work and bounded (8 MB); past the bound the client gets
an error event and the upstream transfer is aborted. 4: a provider's error text never carries
its key out, in any casing or common encoding, streamed or not, for every provider. 12: a reply
that is not what was asked for (a JSON 200 to a streamed request, an event that is not JSON,
a non-stream reply that is not a completion) is an upstream error, never a success.
"""

from __future__ import annotations

import base64
import re
from urllib.parse import quote

import orjson
import pytest

from contrib.fake_providers import anthropic as anthropic_fake
from contrib.fake_providers import gemini as gemini_fake
from contrib.fake_providers import ollama as ollama_fake
from contrib.fake_providers import openai_compat
from contrib.fake_providers.common import RawReply
from tests.conftest import PROVIDER_KEY, error_of, provider_yaml, running_fake, wait_for
from tornado_proxy import sse
from tornado_proxy.config import Secret
from tornado_proxy.providers.base import Deployment
from tornado_proxy.providers.ollama import NdjsonParser
from tornado_proxy.scrub import Scrubber
from tornado_proxy.sse import MAX_EVENT_BYTES, EventTooLargeError, SseEvent, SseParser

MB = 1024 * 1024
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True}


# --- the parsers: linear work, bounded events ------------------------------------------------------

class CountingPattern:
    """Stands in for ``sse.LINE_END`` and counts the bytes each search has to look at."""

    def __init__(self, pattern: re.Pattern):
        self.pattern, self.scanned = pattern, 0

    def search(self, string, pos=0):
        self.scanned += len(string) - pos
        return self.pattern.search(string, pos)

    def finditer(self, string, pos=0):
        self.scanned += len(string) - pos
        return self.pattern.finditer(string, pos)


def test_an_endless_sse_line_is_searched_once_not_per_chunk(monkeypatch):
    counter = CountingPattern(sse.LINE_END)
    monkeypatch.setattr(sse, "LINE_END", counter)
    parser = SseParser(max_event_bytes=64 * MB)
    piece, total = b"x" * 16384, 20 * MB
    assert parser.feed(b"data: ") == []
    for _ in range(total // len(piece)):
        assert parser.feed(piece) == []
    assert parser.feed(b"\n\n") == [SseEvent(b"x" * total)]
    # every byte looked at once (a quadratic parser looks at ~ total**2 / (2 * 16 KB) = 13 GB)
    assert counter.scanned <= total + 64


def test_an_sse_event_past_the_bound_raises_and_drops_what_it_held():
    assert MAX_EVENT_BYTES == 8 * MB
    parser, fed = SseParser(), 0
    with pytest.raises(EventTooLargeError) as raised:
        while fed < 20 * MB:
            fed += 16384
            parser.feed(b"data: " + b"y" * 16384 if fed == 16384 else b"y" * 16384)
    assert MAX_EVENT_BYTES - 16384 < fed <= MAX_EVENT_BYTES + 16384  # raised within a chunk of the bound
    assert raised.value.limit == MAX_EVENT_BYTES
    assert len(parser._partial) == 0  # nothing kept of it


def test_many_data_lines_count_toward_the_same_bound():
    parser = SseParser(max_event_bytes=1000)
    with pytest.raises(EventTooLargeError):
        for _ in range(100):
            parser.feed(b"data: " + b"z" * 50 + b"\n")  # lines end, but the event never does


@pytest.mark.parametrize("pieces", [
    [b"data: a\r", b"\n\r\n"],
    [b"data: a\r", b"\n", b"\r", b"\n"],
    [b"data: a", b"\r", b"\n", b"\r\n"],
    [b"data: a\r\n\r", b"\n"],
])
def test_crlf_split_across_chunks_is_one_line_end(pieces):
    parser = SseParser()
    events = [e for piece in pieces for e in parser.feed(piece)]
    assert events + parser.close() == [SseEvent(b"a")]


def test_a_lone_cr_split_from_the_next_line_is_still_a_line_end():
    parser = SseParser()
    events = parser.feed(b"data: a\r") + parser.feed(b"data: b\r\r")
    assert events == [SseEvent(b"a\nb")]


def test_ndjson_grows_one_buffer_in_place_and_is_bounded():
    parser = NdjsonParser()
    assert parser.feed(b'{"a":1}\n{"b":"') == [SseEvent(b'{"a":1}')]
    held = parser._partial
    for _ in range(64):
        assert parser.feed(b"q" * 16384) == []
        assert parser._partial is held  # appended to, never re-copied with the new bytes
    assert len(held) == len(b'{"b":"') + 64 * 16384
    assert parser.feed(b'"}\n') == [SseEvent(b'{"b":"' + b"q" * 64 * 16384 + b'"}')]
    with pytest.raises(EventTooLargeError):
        for _ in range(MAX_EVENT_BYTES // 16384 + 2):
            parser.feed(b"r" * 16384)
    assert len(parser._partial) == 0


def test_ndjson_lines_across_chunks():
    parser = NdjsonParser()
    assert parser.feed(b'{"a"') == []
    assert parser.feed(b':1}\n{"b":2}\n{"c"') == [SseEvent(b'{"a":1}'), SseEvent(b'{"b":2}')]
    assert parser.feed(b":3}\r\n") == [SseEvent(b'{"c":3}')]


# --- the scrubber ---------------------------------------------------------------------------------

KEY = "sk-provider-SECRET123"


def key_forms(key: str) -> list[str]:
    return [key, key.upper(), key.lower(), key.swapcase(), quote(key, safe=""), quote(key.upper(), safe=""),
            orjson.dumps(key).decode()[1:-1], base64.b64encode(key.encode()).decode(),
            base64.urlsafe_b64encode(key.encode()).decode(),
            base64.b64encode(f"user:{key}".encode()).decode(), base64.b64encode(f"ab:{key}".encode()).decode()]


@pytest.mark.parametrize("form", key_forms(KEY))
def test_scrubber_removes_every_form_of_the_key(form):
    scrub = Scrubber([KEY])
    out = scrub.text(f"upstream says key {form} is bad")
    assert out.startswith("upstream says key ") and out.endswith(" is bad") and "***" in out
    for f in key_forms(KEY)[:7]:
        assert f.lower() not in out.lower()
    # and the longest stretch of the encoded key left is a few boundary characters at most
    assert not any(form[i:i + 8] in out for i in range(len(form) - 8) if form[i:i + 8] != "is bad"), out
    assert scrub.bytes(f"x {form} y".encode()).count(b"***") == 1


def test_scrubber_keeps_other_text_and_ignores_placeholder_keys():
    assert Scrubber([KEY]).text("nothing secret here") == "nothing secret here"
    assert Scrubber(["none"]).text("none of that") == "none of that"  # a placeholder, not a secret
    assert not Scrubber([])


def test_deployment_scrubber_covers_the_key_and_secret_looking_headers():
    d = Deployment("id", "m", "openai", "gpt", api_key=Secret(KEY),
                   extra_headers={"Authorization": "Bearer hdr-token-4567", "X-Title": "my app"})
    out = d.scrubber.text(f"{KEY.upper()} / hdr-token-4567 / Bearer HDR-TOKEN-4567 / my app")
    assert out == "*** / *** / *** / my app"
    assert d.scrubber is d.scrubber  # built once


# --- end to end: the attacks, per provider ------------------------------------------------------------

PROVIDERS = {  # name -> (fake module, path of its api_base, model)
    "fake_openai": (openai_compat, "/v1", "openai/gpt-4o-mini"),
    "fake_gemini": (gemini_fake, "/v1beta", "gemini/gemini-2.0-flash"),
    "fake_anthropic": (anthropic_fake, "", "anthropic/claude-3-5-haiku-20241022"),
    "fake_ollama": (ollama_fake, "", "ollama_chat/llama3.2"),
}


@pytest.fixture
async def fake(request):
    """The fake provider named by the test's parameter (indirect), requiring PROVIDER_KEY."""
    module, path, _ = PROVIDERS[request.param]
    async with running_fake(module, module.FakeState(api_key=PROVIDER_KEY), path) as state:
        state.kind = request.param
        yield state
LEAKY = f"upstream says key {PROVIDER_KEY.upper()} (also {PROVIDER_KEY}, {quote(PROVIDER_KEY.swapcase())}, " \
        f"{base64.b64encode(PROVIDER_KEY.encode()).decode()})"


def assert_no_key(data: bytes) -> None:
    text = data.decode("utf-8", "replace").lower()
    for form in (PROVIDER_KEY, quote(PROVIDER_KEY), base64.b64encode(PROVIDER_KEY.encode()).decode()):
        assert form.lower() not in text, data[:2000]
    assert "secret-9876543210" not in text and "c2stchjvdmlkzxitc2vjcmv0ltk4nzy1ndmymta" not in text


def events_of(body: bytes) -> list[dict | str]:
    out = []
    for block in body.split(b"\n\n"):
        for line in block.splitlines():
            if line.startswith(b"data: "):
                data = line[6:]
                out.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return out


def chunk_frames(fixture: str, payload: bytes | None = None) -> tuple[str, list[bytes]]:
    """(content type, frames) of one normal content event in the provider's own framing."""
    if fixture == "fake_ollama":
        return "application/x-ndjson", [orjson.dumps({"model": "llama3.2", "message": {
            "role": "assistant", "content": "Hel"}, "done": False}) + b"\n"]
    if fixture == "fake_gemini":
        return "text/event-stream", [b"data: " + orjson.dumps({"candidates": [{"content": {
            "parts": [{"text": "Hel"}], "role": "model"}, "index": 0}]}) + b"\r\n\r\n"]
    if fixture == "fake_anthropic":
        start = {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
                                                      "content": [], "model": "claude", "usage": {"input_tokens": 1}}}
        return "text/event-stream; charset=utf-8", [b"event: message_start\ndata: " + orjson.dumps(start) + b"\n\n"]
    return "text/event-stream", [b"data: " + orjson.dumps({"id": "c1", "object": "chat.completion.chunk", "created": 1,
                                                            "model": "gpt", "choices": [{"index": 0, "delta": {
                                                                "content": "Hel"}, "finish_reason": None}]}) + b"\n\n"]


def error_frame(fixture: str, message: str) -> bytes:
    """An error inside the stream, as each provider words it."""
    if fixture == "fake_ollama":
        return orjson.dumps({"error": message}) + b"\n"
    if fixture == "fake_gemini":
        return b"data: " + orjson.dumps({"error": {"code": 500, "message": message, "status": "INTERNAL"}}) + b"\r\n\r\n"
    if fixture == "fake_anthropic":
        return b"event: error\ndata: " + orjson.dumps({"type": "error", "error": {"type": "api_error",
                                                                                 "message": message}}) + b"\n\n"
    return b"data: " + orjson.dumps({"error": {"message": message, "type": "server_error", "param": None,
                                                "code": None}}) + b"\n\n"


async def start(gateway, fake, fixture: str):
    return await gateway(provider_yaml(fake, name="m", model=PROVIDERS[fixture][2]))


@pytest.mark.parametrize("fake", ["fake_openai", "fake_ollama"], indirect=True)
async def test_an_endless_line_ends_the_stream_with_an_error_and_aborts_the_upstream(
        gateway, fetch, fake):
    fixture = fake.kind
    gw = await start(gateway, fake, fixture)
    content_type, frames = chunk_frames(fixture)
    line = b"data: " if fixture == "fake_openai" else b'{"model":"'
    fake.raw_reply = RawReply(200, content_type, (*frames, line, *[b"x" * MB] * 9), hold_open=30)
    r = await fetch(gw, "/v1/chat/completions", STREAM)
    assert r.code == 200
    events = events_of(r.body)
    assert events[0]["choices"][0]["delta"]["content"] == "Hel"
    assert "[DONE]" not in events
    assert "larger than 8 MB" in events[-1]["error"]["message"] and events[-1]["error"]["code"] == "502"
    assert len(r.body) < 64 * 1024
    await wait_for(lambda: fake.stream_aborted)  # the transfer was cut, not read to its end
    fake.raw_reply = None  # the worker still answers
    ok = await fetch(gw, "/v1/chat/completions", CHAT)
    assert ok.code == 200 and orjson.loads(ok.body)["choices"]


@pytest.mark.parametrize("fake", list(PROVIDERS), indirect=True)
async def test_a_mid_stream_error_never_carries_the_key(gateway, fetch, fake):
    fixture = fake.kind
    gw = await start(gateway, fake, fixture)
    content_type, frames = chunk_frames(fixture)
    fake.raw_reply = RawReply(200, content_type, (*frames, error_frame(fixture, LEAKY)), hold_open=30)
    r = await fetch(gw, "/v1/chat/completions", STREAM)
    assert r.code == 200
    assert_no_key(r.body)
    events = events_of(r.body)
    assert "[DONE]" not in events
    error = events[-1]["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "upstream says key ***" in error["message"]
    await wait_for(lambda: fake.stream_aborted)  # nothing after the error is relayed


async def test_an_anthropic_pass_through_error_event_never_carries_the_key(gateway, fetch, fake_anthropic):
    gw = await start(gateway, fake_anthropic, "fake_anthropic")
    content_type, frames = chunk_frames("fake_anthropic")
    fake_anthropic.raw_reply = RawReply(200, content_type, (*frames, error_frame("fake_anthropic", LEAKY)))
    r = await fetch(gw, "/v1/messages", {"model": "m", "max_tokens": 10, "stream": True,
                                         "messages": [{"role": "user", "content": "hi"}]})
    assert r.code == 200
    assert_no_key(r.body)
    assert b"event: message_start" in r.body
    last = events_of(r.body)[-1]
    assert last["type"] == "error" and "upstream says key ***" in last["error"]["message"]


@pytest.mark.parametrize("fake", list(PROVIDERS), indirect=True)
@pytest.mark.parametrize("status", [400, 500])
async def test_a_non_stream_error_never_carries_the_key(gateway, fetch, fake, status):
    fixture = fake.kind
    gw = await start(gateway, fake, fixture)
    body = orjson.dumps({"error": {"message": LEAKY, "type": "invalid_request_error", "param": PROVIDER_KEY.upper(),
                                   "code": status}})
    fake.raw_reply = RawReply(status, "application/json", (body,))
    for stream in (False, True):
        r = await fetch(gw, "/v1/chat/completions", {**CHAT, "stream": stream})
        assert r.code == status
        assert_no_key(r.body)
        assert "upstream says key ***" in error_of(r)["message"]


async def test_a_non_stream_pass_through_error_never_carries_the_key(gateway, fetch, fake_anthropic):
    gw = await start(gateway, fake_anthropic, "fake_anthropic")
    fake_anthropic.raw_reply = RawReply(401, "application/json", (orjson.dumps(
        {"type": "error", "error": {"type": "authentication_error", "message": LEAKY}}),))
    r = await fetch(gw, "/v1/messages", {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]})
    assert r.code == 401
    assert_no_key(r.body)
    assert "upstream says key ***" in orjson.loads(r.body)["error"]["message"]


@pytest.mark.parametrize("fake", list(PROVIDERS), indirect=True)
async def test_a_json_200_to_a_streamed_request_is_a_502(gateway, fetch, fake):
    fixture = fake.kind
    gw = await start(gateway, fake, fixture)
    fake.raw_reply = RawReply(200, "application/json", (b'{"id": "x", "choices": []}',))
    r = await fetch(gw, "/v1/chat/completions", STREAM)
    assert r.code == 502
    assert "answered a streamed request with a non-stream response (Content-Type: application/json)" \
        in error_of(r)["message"]


async def test_a_json_200_error_to_a_streamed_request_is_the_providers_error_scrubbed(gateway, fetch, fake_openai):
    gw = await start(gateway, fake_openai, "fake_openai")
    fake_openai.raw_reply = RawReply(200, "application/json", (orjson.dumps({"error": {"message": LEAKY}}),))
    r = await fetch(gw, "/v1/chat/completions", STREAM)
    assert r.code == 502
    assert_no_key(r.body)
    assert "upstream says key ***" in error_of(r)["message"]


@pytest.mark.parametrize("fake", list(PROVIDERS), indirect=True)
@pytest.mark.parametrize("garbage", [b"this is not json", b"[1,2,3]"])
async def test_an_event_that_is_not_a_json_object_ends_the_stream_with_an_error(
        gateway, fetch, fake, garbage):
    fixture = fake.kind
    gw = await start(gateway, fake, fixture)
    content_type, frames = chunk_frames(fixture)
    bad = garbage + b"\n" if fixture == "fake_ollama" else b"data: " + garbage + b"\n\n"
    fake.raw_reply = RawReply(200, content_type, (*frames, bad))
    r = await fetch(gw, "/v1/chat/completions", STREAM)
    assert r.code == 200
    assert garbage not in r.body
    events = events_of(r.body)
    assert "[DONE]" not in events
    assert "not a JSON object" in events[-1]["error"]["message"] and events[-1]["error"]["code"] == "502"


@pytest.mark.parametrize("fake", list(PROVIDERS), indirect=True)
@pytest.mark.parametrize("reply", [b"[1,2,3]", b"{}", b'"text"', b"<html>oops</html>"])
async def test_a_non_stream_reply_that_is_not_a_completion_is_a_502(gateway, fetch, fake, reply):
    fixture = fake.kind
    gw = await start(gateway, fake, fixture)
    fake.raw_reply = RawReply(200, "application/json", (reply,))
    r = await fetch(gw, "/v1/chat/completions", CHAT)
    assert r.code == 502
    assert error_of(r)["type"] == "api_error"


async def test_an_embeddings_reply_without_data_is_a_502(gateway, fetch, fake_openai):
    gw = await start(gateway, fake_openai, "fake_openai")
    fake_openai.raw_reply = RawReply(200, "application/json", (b'{"object": "list", "model": "x"}',))
    r = await fetch(gw, "/v1/embeddings", {"model": "m", "input": "hi"})
    assert r.code == 502 and "'data'" in error_of(r)["message"]


async def test_a_stream_without_content_type_is_relayed(gateway, fetch, fake_openai):
    """No Content-Type at all is not a declared non-stream: the events are parsed and relayed
    (and anything that is not an event would still be refused by the parser)."""
    chunk = orjson.dumps({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                          "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]})
    fake_openai.raw_reply = RawReply(200, None, (b"data: " + chunk + b"\n\n", b"data: [DONE]\n\n"))
    gw = await gateway(provider_yaml(fake_openai, extra="router_settings:\n      num_retries: 0"))
    r = await fetch(gw, "/v1/chat/completions", {"model": "gpt-fake", "stream": True,
                                                 "messages": [{"role": "user", "content": "x"}]})
    assert r.code == 200, r.body
    assert b'"content":"hi"' in r.body and r.body.rstrip().endswith(b"data: [DONE]")
