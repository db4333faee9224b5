"""``upstream.py`` against the fake provider over loopback: buffered fetches, streaming,
transport errors, timeouts, and aborting a transfer (which must free the curl handle)."""

import asyncio
import logging
import time

import orjson
import pytest
from tornado.netutil import bind_sockets

from tornado_proxy.errors import ProxyError, UpstreamConnectionError, UpstreamError, UpstreamTimeoutError
from tornado_proxy.providers.base import UpstreamRequest
from tornado_proxy.sse import SseParser
from tornado_proxy.upstream import HeaderLines, Transfer, Upstream

from .conftest import PROVIDER_KEY, wait_for

USER = [{"role": "user", "content": "hello big world"}]


@pytest.fixture
async def upstream():
    u = Upstream(max_clients=1, connect_timeout=5)
    yield u
    u.close()


def chat(fake, stream: bool = False, key: str = PROVIDER_KEY, **extra) -> UpstreamRequest:
    body = {"model": "gpt-4o-mini", "messages": USER, **extra}
    if stream:
        body["stream"] = True
    return UpstreamRequest(fake.base + "/chat/completions", "POST",
                           {"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
                           orjson.dumps(body))


class Collector:
    """on_head / on_chunk callbacks that record what they saw."""

    def __init__(self):
        self.heads: list[int] = []
        self.data = bytearray()
        self.parser = SseParser()
        self.events = []

    def on_head(self, t: Transfer) -> None:
        self.heads.append(t.status)

    def on_chunk(self, chunk: bytes) -> None:
        assert self.heads, "a body chunk arrived before on_head"
        self.data += chunk
        self.events += self.parser.feed(chunk)

    def contents(self) -> str:
        out = ""
        for e in self.events:
            if e.data != b"[DONE]":
                out += orjson.loads(e.data)["choices"][0]["delta"].get("content") or ""
        return out


async def test_fetch_ok(upstream, fake_openai):
    reply = await upstream.fetch(chat(fake_openai, temperature=0.5), timeout=10)
    assert reply.status == 200
    body = orjson.loads(reply.body)
    assert body["choices"][0]["message"]["content"] == "echo: hello big world"
    assert reply.headers["Content-Type"].startswith("application/json")
    sent = fake_openai.received[-1]
    assert sent.body["temperature"] == 0.5
    assert sent.headers["authorization"] == f"Bearer {PROVIDER_KEY}"


async def test_fetch_returns_non_2xx_replies(upstream, fake_openai):
    reply = await upstream.fetch(chat(fake_openai, key="wrong"), timeout=10)
    assert reply.status == 401
    assert orjson.loads(reply.body)["error"]["code"] == "invalid_api_key"
    fake_openai.fail_times, fake_openai.fail_status = 1, 429
    reply = await upstream.fetch(chat(fake_openai), timeout=10)
    assert reply.status == 429 and reply.headers["retry-after"] == "1"


async def test_fetch_connection_refused_is_503():
    [sock] = bind_sockets(0, "127.0.0.1")
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    u = Upstream(max_clients=1)
    try:
        req = UpstreamRequest(f"http://127.0.0.1:{port}/v1/chat/completions", "POST", {}, b"{}")
        with pytest.raises(UpstreamConnectionError) as info:
            await u.fetch(req, timeout=5)
        assert info.value.status == 503
    finally:
        u.close()


async def test_fetch_timeout_is_408(upstream, fake_openai):
    fake_openai.latency = 5
    with pytest.raises(UpstreamTimeoutError) as info:
        await upstream.fetch(chat(fake_openai), timeout=0.3)
    assert info.value.status == 408
    fake_openai.latency = 0
    assert (await upstream.fetch(chat(fake_openai), timeout=10)).status == 200  # handle was freed


async def test_stream_delivers_head_then_every_chunk(upstream, fake_openai):
    c, t = Collector(), Transfer()
    result = await upstream.stream(chat(fake_openai, stream=True), 10, None, c.on_head, c.on_chunk, t)
    assert result is t and t.ok and t.status == 200
    assert c.heads == [200]
    assert t.headers["Content-Type"] == "text/event-stream"
    assert c.events[-1].data == b"[DONE]"
    assert c.contents() == "echo: hello big world"
    assert t.error_body == b""
    assert t.first_byte_at is not None and t.abort_reason is None


async def test_stream_many_small_chunks_all_arrive(upstream, fake_openai):
    fake_openai.stream_chunks = 200
    c, t = Collector(), Transfer()
    await upstream.stream(chat(fake_openai, stream=True), 10, 5, c.on_head, c.on_chunk, t)
    assert c.contents() == "tok " * 200


async def test_stream_slow_chunks_arrive_one_by_one(upstream, fake_openai):
    fake_openai.stream_chunks, fake_openai.chunk_delay = 3, 0.02
    c, t = Collector(), Transfer()
    await upstream.stream(chat(fake_openai, stream=True), 10, 5, c.on_head, c.on_chunk, t)
    assert c.contents() == "tok tok tok "


async def test_stream_error_body_is_collected_not_streamed(upstream, fake_openai):
    fake_openai.fail_times, fake_openai.fail_status = 1, 503
    c, t = Collector(), Transfer()
    await upstream.stream(chat(fake_openai, stream=True), 10, None, c.on_head, c.on_chunk, t)
    assert not t.ok and t.status == 503
    assert c.data == b""
    assert "overloaded" in orjson.loads(bytes(t.error_body))["error"]["message"]


async def test_stream_first_byte_timeout_is_408(upstream, fake_openai):
    fake_openai.latency = 5
    c, t = Collector(), Transfer()
    with pytest.raises(UpstreamTimeoutError) as info:
        await upstream.stream(chat(fake_openai, stream=True), 30, 0.2, c.on_head, c.on_chunk, t)
    assert info.value.status == 408
    assert t.abort_reason == "timeout" and c.heads == []
    fake_openai.latency = 0
    assert (await upstream.fetch(chat(fake_openai), timeout=10)).status == 200


async def test_stream_total_timeout_is_408(upstream, fake_openai):
    fake_openai.stream_chunks, fake_openai.chunk_delay = 50, 0.1
    c, t = Collector(), Transfer()
    with pytest.raises(UpstreamTimeoutError):
        await upstream.stream(chat(fake_openai, stream=True), 0.4, None, c.on_head, c.on_chunk, t)
    assert c.heads == [200]  # it had started: the caller reports this mid-stream


async def test_stream_upstream_dies_mid_stream(upstream, fake_openai):
    fake_openai.fail_mid_stream_after = 2
    c, t = Collector(), Transfer()
    with pytest.raises(UpstreamError) as info:
        await upstream.stream(chat(fake_openai, stream=True), 10, None, c.on_head, c.on_chunk, t)
    assert info.value.status == 503
    assert c.contents() == "echo: hello "  # the role chunk and two content chunks got through
    fake_openai.fail_mid_stream_after = None
    assert (await upstream.fetch(chat(fake_openai), timeout=10)).status == 200


async def test_stream_connection_refused():
    [sock] = bind_sockets(0, "127.0.0.1")
    port = sock.getsockname()[1]
    sock.close()
    u = Upstream(max_clients=1)
    try:
        req = UpstreamRequest(f"http://127.0.0.1:{port}/v1/chat/completions", "POST", {}, b"{}")
        with pytest.raises(UpstreamConnectionError):
            await u.stream(req, 5, 5, lambda t: None, lambda b: None, Transfer())
    finally:
        u.close()


async def test_abort_mid_transfer_closes_upstream_and_frees_the_handle(upstream, fake_openai):
    fake_openai.stream_chunks, fake_openai.chunk_delay = 1000, 0.02
    c, t = Collector(), Transfer()

    def on_chunk(chunk: bytes) -> None:
        c.on_chunk(chunk)
        if len(c.events) >= 3:
            upstream.abort(t, "client")

    result = await asyncio.wait_for(
        upstream.stream(chat(fake_openai, stream=True), 60, None, c.on_head, on_chunk, t), 10)
    assert result.abort_reason == "client"
    seen = len(c.events)
    assert 3 <= seen < 50
    await wait_for(lambda: fake_openai.stream_aborted)
    assert fake_openai.streams_finished == 0
    # max_clients=1: this only works if the aborted transfer gave its handle back.
    fake_openai.stream_chunks, fake_openai.chunk_delay = None, 0
    reply = await asyncio.wait_for(upstream.fetch(chat(fake_openai), timeout=10), 10)
    assert reply.status == 200
    assert len(c.events) == seen  # nothing more was delivered after the abort


async def test_abort_of_a_queued_transfer(upstream, fake_openai):
    fake_openai.stream_chunks, fake_openai.chunk_delay = 1000, 0.02
    first, second = Transfer(), Transfer()
    c1, c2 = Collector(), Collector()
    task1 = asyncio.ensure_future(upstream.stream(chat(fake_openai, stream=True), 60, None,
                                                  c1.on_head, c1.on_chunk, first))
    await wait_for(lambda: c1.heads)
    task2 = asyncio.ensure_future(upstream.stream(chat(fake_openai, stream=True), 60, None,
                                                  c2.on_head, c2.on_chunk, second))
    await asyncio.sleep(0.05)
    assert c2.heads == []  # max_clients=1: still queued behind the first
    upstream.abort(second, "client")
    assert (await asyncio.wait_for(task2, 5)).abort_reason == "client"
    upstream.abort(first, "client")
    assert (await asyncio.wait_for(task1, 5)).abort_reason == "client"
    assert c2.heads == [] and len(fake_openai.received) == 1


async def test_abort_is_idempotent_and_safe_after_completion(upstream, fake_openai):
    c, t = Collector(), Transfer()
    await upstream.stream(chat(fake_openai, stream=True), 10, None, c.on_head, c.on_chunk, t)
    upstream.abort(t, "client")  # finished already: a no-op
    upstream.abort(t, "client")
    assert (await upstream.fetch(chat(fake_openai), timeout=10)).status == 200



async def test_debug_logging_never_traces_headers_or_bodies(upstream, fake_openai, caplog):
    # tornado's curl client turns on libcurl's VERBOSE trace when DEBUG logging is on
    caplog.set_level(logging.DEBUG)
    assert (await upstream.fetch(chat(fake_openai), timeout=10)).status == 200
    c, t = Collector(), Transfer()
    await upstream.stream(chat(fake_openai, stream=True), 10, None, c.on_head, c.on_chunk, t)
    assert PROVIDER_KEY not in caplog.text
    assert "hello big world" not in caplog.text


def pending_connections(listener) -> int:
    """Connections the kernel has completed on ``listener`` that nobody accepted yet."""
    count = 0
    listener.setblocking(False)
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


@pytest.fixture
def listener():
    sock = bind_sockets(0, "127.0.0.1")[0]
    yield sock
    sock.close()


def request_to(sock) -> UpstreamRequest:
    return UpstreamRequest(f"http://127.0.0.1:{sock.getsockname()[1]}/v1/chat/completions", "POST",
                           {"Content-Type": "application/json"}, b"{}")


async def test_requests_of_one_loop_iteration_start_together(listener):
    u = Upstream(max_clients=4, connect_timeout=5, start_within=60)
    await asyncio.sleep(0.01)  # the client's own start-up timer has run
    tasks = [asyncio.ensure_future(u.fetch(request_to(listener), timeout=0.5)) for _ in range(3)]
    await asyncio.sleep(0)  # the tasks submit their requests; nothing has been started yet
    assert pending_connections(listener) == 0
    await asyncio.sleep(0.05)  # the next iteration's zero-delay timer starts all three
    assert pending_connections(listener) == 3
    for t in tasks:
        t.cancel()
    u.close()


async def test_a_request_waiting_past_start_within_starts_the_batch_at_once(listener):
    u = Upstream(max_clients=4, connect_timeout=5, start_within=0.002)
    await asyncio.sleep(0.01)  # the client's own start-up timer has run
    first = asyncio.ensure_future(u.fetch(request_to(listener), timeout=0.5))
    await asyncio.sleep(0)  # first is submitted, due to start with the next iteration
    time.sleep(0.01)  # this iteration runs long
    second = asyncio.ensure_future(u.fetch(request_to(listener), timeout=0.5))
    await asyncio.sleep(0)  # second's submission starts both before the zero-delay timer runs
    assert pending_connections(listener) == 2
    first.cancel()
    second.cancel()
    u.close()


async def test_curl_handles_are_made_as_concurrency_needs_them_and_reused(fake_openai):
    u = Upstream(max_clients=1000, connect_timeout=5)
    assert u._client._curls == []
    for _ in range(3):  # one at a time: one handle, reused
        assert (await u.fetch(chat(fake_openai), timeout=10)).status == 200
    assert len(u._client._curls) == 1
    fake_openai.chunk_delay = 0.2  # held open so all four overlap
    replies = await asyncio.gather(*[u.fetch(chat(fake_openai, stream=True), timeout=10) for _ in range(4)])
    assert [r.status for r in replies] == [200] * 4
    assert len(u._client._curls) == 4
    u.close()


async def test_libcurl_timer_is_kept_when_it_fires_no_later_than_asked():
    u = Upstream(max_clients=4, connect_timeout=5)
    client = u._client
    await asyncio.sleep(0.01)
    client._set_timeout(1000)
    timer = client._timeout
    client._set_timeout(5000)  # later: the pending timer serves (an early call is harmless)
    assert client._timeout is timer
    client._set_timeout(0)  # earlier: replaced
    assert client._timeout is not timer
    await asyncio.sleep(0.01)
    assert client._timeout is None or client._timeout_at > client.io_loop.time()  # fired and re-read libcurl
    u.close()


def test_header_lines_keep_only_the_final_head_and_parse_when_read():
    head = HeaderLines()
    for line in (b"HTTP/1.1 100 Continue\r\n", b"X-Interim: 1\r\n", b"\r\n"):
        head.add(line)
    assert (head.status, head.complete) == (100, False)  # an interim head is not the reply's
    for line in (b"HTTP/1.1 429 Too Many Requests\r\n", b"Retry-After: 7\r\n", b"X-Long: a\r\n",
                 b" b\r\n", b"Set-Cookie: x=1\r\n", b"Set-Cookie: y=2\r\n"):
        head.add(line)
    assert (head.status, head.complete) == (429, False)
    head.add(b"\r\n")
    assert head.complete
    assert head["retry-after"] == "7"
    assert "X-Interim" not in head
    assert head["X-Long"] == "a"  # an obsolete folded line is dropped, the rest still parse
    assert head.parsed.get_list("Set-Cookie") == ["x=1", "y=2"]
    assert dict(head.items())["Retry-After"] == "7"


async def test_fetch_reply_headers_are_the_providers(upstream, fake_openai):
    reply = await upstream.fetch(chat(fake_openai), timeout=10)
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("application/json")
    bad = await upstream.fetch(chat(fake_openai, key="sk-wrong"), timeout=10)
    assert bad.status == 401 and bad.headers["Content-Type"].startswith("application/json")


async def test_fetch_sends_the_body_exactly_and_no_expect_or_pragma(upstream, fake_openai):
    text = "héllo 🌍 " + "x" * (2 * 1024 * 1024)  # past libcurl's buffers, non-ASCII
    reply = await upstream.fetch(chat(fake_openai, user=text), timeout=10)
    assert reply.status == 200
    sent = fake_openai.received[-1]
    assert sent.body["user"] == text and sent.body["messages"] == USER
    assert sent.headers["content-length"] == str(len(orjson.dumps({"model": "gpt-4o-mini", "messages": USER,
                                                                   "user": text})))
    assert "expect" not in sent.headers and "pragma" not in sent.headers
    assert sent.headers["content-type"] == "application/json"


async def test_fetch_refuses_a_header_with_a_line_break(upstream, fake_openai):
    request = chat(fake_openai)
    request = UpstreamRequest(request.url, "POST", {**request.headers, "X-Bad": "sk-secret\r\nInjected: 1"},
                              request.body)
    for call in (upstream.fetch(request, timeout=10),
                 upstream.stream(request, 10, None, lambda t: None, lambda c: None, Transfer())):
        with pytest.raises(ProxyError) as caught:
            await call
        assert caught.value.status == 500 and "sk-secret" not in caught.value.message
    assert fake_openai.received == []
