"""End to end, streaming: SSE relayed chunk by chunk through the gateway, ``[DONE]``,
``stream_options.include_usage``, streamed tool calls, OpenRouter keep-alive comments,
an upstream failure mid-stream, and a client that leaves mid-stream (the upstream transfer
must be aborted)."""

import asyncio
import uuid

import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import HTTPRequest
from tornado.simple_httpclient import HTTPStreamClosedError

from tornado_proxy.sse import SseParser

from .conftest import MASTER_KEY, PROVIDER_KEY, wait_for

USER = [{"role": "user", "content": "hello big world"}]
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}}


def config_yaml(fake) -> str:
    return f"""
model_list:
  - model_name: gpt-fake
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: {fake.base}
      api_key: {PROVIDER_KEY}
  - model_name: instruct-fake
    litellm_params:
      model: openai/gpt-3.5-turbo-instruct
      api_base: {fake.base}
      api_key: {PROVIDER_KEY}
  - model_name: or-fake
    litellm_params:
      model: openrouter/openai/gpt-3.5-turbo
      api_base: http://127.0.0.1:{fake.port}/api/v1
      api_key: {PROVIDER_KEY}
  - model_name: demo
    litellm_params:
      model: mock/demo
"""


@pytest.fixture
async def gw(gateway, fake_openai):
    return await gateway(config_yaml(fake_openai))


def sse_payloads(body: bytes) -> list[bytes]:
    parser = SseParser()
    return [e.data for e in parser.feed(body) + parser.close()]


def chunk_text(payloads: list[bytes], field: str = "content") -> str:
    out = ""
    for p in payloads:
        if p == b"[DONE]":
            continue
        for choice in orjson.loads(p).get("choices") or ():
            out += (choice["delta"].get(field) or "") if "delta" in choice else (choice.get("text") or "")
    return out


async def stream_fetch(http, gw, body: dict, path: str = "/v1/chat/completions"):
    """POST a streaming request; returns (response, chunks as received)."""
    chunks: list[bytes] = []
    req = HTTPRequest(gw.url + path, method="POST", body=orjson.dumps({**body, "stream": True}),
                      headers={"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"},
                      streaming_callback=chunks.append, request_timeout=15)
    response = await http.fetch(req, raise_error=False)
    return response, chunks


# --- openai SDK ------------------------------------------------------------------------------

async def test_sdk_stream_concatenates_to_the_reply(client, fake_openai):
    stream = await client.chat.completions.create(model="gpt-fake", messages=USER, stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: hello big world"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)
    assert len({c.id for c in chunks}) == 1
    sent = fake_openai.received[-1].body
    # the gateway asks for the usage (exact spend) and keeps its chunk from this client
    assert sent == {"model": "gpt-4o-mini", "messages": USER, "stream": True,
                    "stream_options": {"include_usage": True}}
    assert fake_openai.streams_finished == 1


async def test_sdk_stream_include_usage(client, fake_openai):
    stream = await client.chat.completions.create(model="gpt-fake", messages=USER, stream=True,
                                                  stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.prompt_tokens == 3 and last.usage.completion_tokens == 4 and last.usage.total_tokens == 7
    assert all(c.usage is None for c in chunks[:-1])
    assert fake_openai.received[-1].body["stream_options"] == {"include_usage": True}


async def test_sdk_stream_mock_provider(client, fake_openai):
    stream = await client.chat.completions.create(model="demo", messages=USER, stream=True,
                                                  stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello big world"
    assert chunks[-1].usage.completion_tokens == 3
    assert fake_openai.received == []


async def test_sdk_stream_mock_response_never_reaches_provider(client, fake_openai):
    stream = await client.chat.completions.create(model="gpt-fake", messages=USER, stream=True,
                                                  extra_body={"mock_response": "hi there you"})
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "hi there you"
    assert fake_openai.received == []


async def test_sdk_streamed_tool_calls(client, fake_openai):
    stream = await client.chat.completions.create(model="gpt-fake", messages=WEATHER, tools=[WEATHER_TOOL],
                                                  tool_choice="auto", stream=True)
    name, arguments, finish = None, "", None
    async for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or ():
                name = call.function.name or name
                arguments += call.function.arguments or ""
            finish = choice.finish_reason or finish
    assert name == "get_weather"
    assert orjson.loads(arguments) == {"location": "Paris"}
    assert finish == "tool_calls"
    sent = fake_openai.received[-1].body
    assert sent["tools"] == [WEATHER_TOOL] and sent["tool_choice"] == "auto"


async def test_sdk_legacy_completion_stream(client, fake_openai):
    stream = await client.completions.create(model="instruct-fake", prompt="say this please", stream=True)
    assert "".join([c.choices[0].text async for c in stream if c.choices]) == "echo: say this please"
    assert fake_openai.received[-1].path == "/v1/completions"
    stream = await client.completions.create(model="demo", prompt="say this please", stream=True)
    assert "".join([c.choices[0].text async for c in stream if c.choices]) == "say this please"


async def test_sdk_stream_through_openrouter_skips_comments(client, fake_openai):
    fake_openai.openrouter_comments = True
    stream = await client.chat.completions.create(model="or-fake", messages=USER, stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "echo: hello big world"
    assert fake_openai.received[-1].body["model"] == "openai/gpt-3.5-turbo"


async def test_sdk_stream_mock_provider_accepts_tools(client):
    stream = await client.chat.completions.create(model="demo", messages=WEATHER, tools=[WEATHER_TOOL], stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == WEATHER[0]["content"]  # the mock echoes; it makes no tool calls


async def test_azure_sdk_stream(gw, fake_openai):
    async with openai.AsyncAzureOpenAI(azure_endpoint=gw.url, api_key=MASTER_KEY, api_version="2024-06-01",
                                       max_retries=0) as azure:
        stream = await azure.chat.completions.create(model="gpt-fake", messages=USER, stream=True,
                                                     stream_options={"include_usage": True})
        chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: hello big world"
    assert chunks[-1].usage.total_tokens == 7
    sent = fake_openai.received[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.body["model"] == "gpt-4o-mini" and sent.body["stream"] is True
    assert sent.headers["authorization"] == f"Bearer {PROVIDER_KEY}" and "api-key" not in sent.headers


# --- the wire format --------------------------------------------------------------------------

async def test_raw_stream_format(gw, fetch, fake_openai):
    r = await fetch(gw, "/v1/chat/completions", {"model": "gpt-fake", "messages": USER, "stream": True})
    assert r.code == 200
    assert r.headers["Content-Type"].startswith("text/event-stream")
    assert r.body.endswith(b"data: [DONE]\n\n")
    assert r.body.count(b"[DONE]") == 1
    payloads = sse_payloads(r.body)
    assert payloads[-1] == b"[DONE]"
    for p in payloads[:-1]:
        assert orjson.loads(p)["object"] == "chat.completion.chunk"
    assert chunk_text(payloads) == "echo: hello big world"
    for block in r.body.split(b"\n\n")[:-1]:
        assert block.startswith(b"data: "), block  # every event is a single data: line
    uuid.UUID(r.headers["x-litellm-call-id"])
    assert r.headers["x-litellm-model-group"] == "gpt-fake"
    assert r.headers["x-litellm-model-api-base"] == fake_openai.base
    assert float(r.headers["x-litellm-response-duration-ms"]) >= 0
    assert float(r.headers["x-litellm-overhead-duration-ms"]) >= 0


async def test_raw_mock_stream_format(gw, fetch):
    r = await fetch(gw, "/chat/completions", {"model": "demo", "messages": USER, "stream": True})
    assert r.code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    assert r.body.endswith(b"data: [DONE]\n\n") and r.body.count(b"[DONE]") == 1
    assert chunk_text(sse_payloads(r.body)) == "hello big world"


async def test_openrouter_comments_do_not_reach_the_client(gw, fetch, fake_openai):
    fake_openai.openrouter_comments = True
    r = await fetch(gw, "/v1/chat/completions", {"model": "or-fake", "messages": USER, "stream": True})
    assert r.code == 200
    assert b"OPENROUTER" not in r.body
    assert not any(line.startswith(b":") for line in r.body.split(b"\n"))
    assert chunk_text(sse_payloads(r.body)) == "echo: hello big world"
    assert r.body.endswith(b"data: [DONE]\n\n")


async def test_stream_is_relayed_incrementally(gw, http, fake_openai):
    fake_openai.stream_chunks, fake_openai.chunk_delay = 5, 0.05
    response, chunks = await stream_fetch(http, gw, {"model": "gpt-fake", "messages": USER})
    assert response.code == 200
    # the fake flushes every event after a pause; a gateway that buffered would deliver one piece
    assert len(chunks) >= 5
    assert chunk_text(sse_payloads(b"".join(chunks))) == "tok " * 5


async def test_many_chunks_and_usage_are_counted(gw, fetch, fake_openai):
    fake_openai.stream_chunks = 300
    r = await fetch(gw, "/v1/chat/completions", {"model": "gpt-fake", "messages": USER, "stream": True,
                                                 "stream_options": {"include_usage": True}})
    payloads = sse_payloads(r.body)
    assert chunk_text(payloads) == "tok " * 300
    usage = orjson.loads(payloads[-2])["usage"]
    assert usage["completion_tokens"] == 300
    metrics = (await fetch(gw, "/metrics", key=None)).body.decode()
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for f in text_string_to_metric_families(metrics) for s in f.samples}
    assert values[("litellm_output_tokens_total", (("model", "gpt-fake"),))] == 300
    assert values[("litellm_input_tokens_total", (("model", "gpt-fake"),))] == usage["prompt_tokens"]


# --- upstream failure mid-stream -----------------------------------------------------------------

async def test_upstream_dies_mid_stream_ends_with_an_error_event(gw, http, fake_openai):
    fake_openai.fail_mid_stream_after = 2
    response, chunks = await asyncio.wait_for(
        stream_fetch(http, gw, {"model": "gpt-fake", "messages": USER}), 10)
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    payloads = sse_payloads(b"".join(chunks))
    assert b"[DONE]" not in payloads
    assert chunk_text(payloads[:-1]) == "echo: hello "  # what the provider sent before dying
    error = orjson.loads(payloads[-1])
    assert set(error) == {"error"}
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["message"]
    assert PROVIDER_KEY not in payloads[-1].decode() and MASTER_KEY not in payloads[-1].decode()
    # and the gateway keeps serving
    fake_openai.fail_mid_stream_after = None
    r, chunks = await stream_fetch(http, gw, {"model": "gpt-fake", "messages": USER})
    assert chunk_text(sse_payloads(b"".join(chunks))) == "echo: hello big world"


async def test_deployment_timeout_hit_mid_stream_ends_with_an_error_event(gateway, http, fake_openai):
    gw = await gateway(config_yaml(fake_openai).replace(
        "      api_base: " + fake_openai.base, "      api_base: " + fake_openai.base + "\n      timeout: 0.5", 1))
    fake_openai.stream_chunks, fake_openai.chunk_delay = 100, 0.05
    response, chunks = await asyncio.wait_for(stream_fetch(http, gw, {"model": "gpt-fake", "messages": USER}), 10)
    assert response.code == 200
    payloads = sse_payloads(b"".join(chunks))
    assert chunk_text(payloads[:-1]).startswith("tok tok ")
    error = orjson.loads(payloads[-1])["error"]
    assert error["code"] == "408" and error["type"] == "timeout"
    await wait_for(lambda: fake_openai.stream_aborted)  # the provider was hung up on


async def test_sdk_sees_a_mid_stream_error(client, fake_openai):
    fake_openai.fail_mid_stream_after = 2
    stream = await client.chat.completions.create(model="gpt-fake", messages=USER, stream=True)
    got = ""
    with pytest.raises(openai.APIError):
        async for chunk in stream:
            got += chunk.choices[0].delta.content or ""
    assert got == "echo: hello "


# --- the client leaves ---------------------------------------------------------------------------

async def open_raw_stream(gw, body: dict, until: bytes | None, path: bytes = b"/v1/chat/completions"):
    """A raw HTTP/1.1 streaming request; reads until ``until`` shows up (None: reads nothing)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    data = orjson.dumps({**body, "stream": True})
    writer.write(b"POST " + path + b" HTTP/1.1\r\nHost: gw\r\n"
                 b"Authorization: Bearer " + MASTER_KEY.encode() + b"\r\n"
                 b"Content-Type: application/json\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    await writer.drain()
    seen = b""
    while until is not None and until not in seen:
        more = await asyncio.wait_for(reader.read(65536), 5)
        assert more, seen
        seen += more
    return reader, writer, seen


async def status_count(fetch, gw, status: str) -> float:
    text = (await fetch(gw, "/metrics", key=None)).body.decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "litellm_proxy_total_requests_metric_total" and s.labels.get("status") == status
               and s.labels.get("model") == "gpt-fake")


async def test_client_disconnect_mid_stream_aborts_upstream(gw, fetch, fake_openai):
    fake_openai.stream_chunks, fake_openai.chunk_delay = 500, 0.02
    _, writer, seen = await open_raw_stream(gw, {"model": "gpt-fake", "messages": USER}, b'"content":"tok ')
    assert b"200 OK" in seen.split(b"\r\n", 1)[0]
    assert not fake_openai.stream_aborted
    writer.close()
    await wait_for(lambda: fake_openai.stream_aborted)
    assert fake_openai.streams_finished == 0
    # the gateway keeps serving, and counts the abandoned request as 499
    fake_openai.stream_chunks, fake_openai.chunk_delay = None, 0
    r = await fetch(gw, "/v1/chat/completions", {"model": "gpt-fake", "messages": USER})
    assert r.code == 200
    assert await status_count(fetch, gw, "499") == 1


async def test_client_disconnect_on_the_anthropic_endpoint_aborts_upstream(gw, fetch, fake_openai):
    """/v1/messages translating to an OpenAI upstream relays through the same path: a client that
    hangs up mid-stream stops the upstream transfer too."""
    fake_openai.stream_chunks, fake_openai.chunk_delay = 500, 0.02
    body = {"model": "gpt-fake", "max_tokens": 50, "messages": USER}
    _, writer, seen = await open_raw_stream(gw, body, b"content_block_delta", path=b"/v1/messages")
    assert b"200 OK" in seen.split(b"\r\n", 1)[0]
    writer.close()
    await wait_for(lambda: fake_openai.stream_aborted)
    assert fake_openai.streams_finished == 0


async def test_client_disconnect_before_first_byte_aborts_upstream(gw, fetch, fake_openai):
    fake_openai.latency = 10
    _, writer, _ = await open_raw_stream(gw, {"model": "gpt-fake", "messages": USER}, None)
    await wait_for(lambda: len(fake_openai.received) == 1)
    writer.close()
    await wait_for(lambda: fake_openai.stream_aborted)
    fake_openai.latency = 0
    r = await fetch(gw, "/v1/chat/completions", {"model": "gpt-fake", "messages": USER})
    assert r.code == 200


async def test_tornado_client_giving_up_aborts_upstream(gw, http, fetch, fake_openai):
    fake_openai.stream_chunks, fake_openai.chunk_delay = 500, 0.02
    received = []

    def on_chunk(chunk: bytes) -> None:
        received.append(chunk)
        if b'"content":"tok ' in b"".join(received):
            raise RuntimeError("the client has seen enough")

    req = HTTPRequest(gw.url + "/v1/chat/completions", method="POST",
                      body=orjson.dumps({"model": "gpt-fake", "messages": USER, "stream": True}),
                      headers={"Authorization": f"Bearer {MASTER_KEY}"}, streaming_callback=on_chunk,
                      request_timeout=15)
    with pytest.raises(HTTPStreamClosedError):  # tornado closes the connection when the callback raises
        await http.fetch(req)
    await wait_for(lambda: fake_openai.stream_aborted)
    assert fake_openai.streams_finished == 0
    fake_openai.stream_chunks, fake_openai.chunk_delay = None, 0
    assert (await fetch(gw, "/v1/chat/completions", {"model": "gpt-fake", "messages": USER})).code == 200


async def test_many_disconnects_do_not_exhaust_the_gateway(gateway, fetch, fake_openai):
    yaml = config_yaml(fake_openai) + "general_settings:\n  upstream_max_connections: 2\n"
    gw = await gateway(yaml)
    fake_openai.stream_chunks, fake_openai.chunk_delay = 500, 0.02
    for _ in range(4):  # twice the pool: each abort must give its curl handle back
        fake_openai.stream_aborted = False
        _, writer, _ = await open_raw_stream(gw, {"model": "gpt-fake", "messages": USER}, b'"content":"tok ')
        writer.close()
        await wait_for(lambda: fake_openai.stream_aborted)
    fake_openai.stream_chunks, fake_openai.chunk_delay = None, 0
    r = await asyncio.wait_for(fetch(gw, "/v1/chat/completions", {"model": "gpt-fake", "messages": USER}), 10)
    assert r.code == 200


async def test_a_client_that_stops_reading_is_dropped_not_buffered(gw, fetch, fake_openai, monkeypatch):
    """Curl gets no backpressure from a slow client: past the bound of unflushed bytes the gateway
    drops the client and aborts the upstream instead of buffering the whole stream in memory."""
    import socket

    from tornado_proxy import llm

    monkeypatch.setattr(llm, "MAX_PENDING_STREAM_BYTES", 64 * 1024)
    fake_openai.stream_chunks = 200_000  # ~20 MB of events, as fast as the fake can write them
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and this client reads nothing
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gw.port))
    _, writer = await asyncio.open_connection(sock=sock)
    data = orjson.dumps({"model": "gpt-fake", "messages": USER, "stream": True})
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + MASTER_KEY.encode()
                 + b"\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    await writer.drain()
    try:
        await wait_for(lambda: fake_openai.stream_aborted, timeout=20)
        assert fake_openai.streams_finished == 0
    finally:
        writer.close()
    fake_openai.stream_chunks = None
    assert (await fetch(gw, "/v1/chat/completions", {"model": "gpt-fake", "messages": USER})).code == 200
