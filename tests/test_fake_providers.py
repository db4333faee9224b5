"""The fake OpenAI-compatible provider, checked against the official openai SDK."""

import asyncio
import json
import pathlib
import sys

import openai
import pytest
from tornado.httpclient import AsyncHTTPClient

from contrib.fake_providers import openai_compat
from contrib.fake_providers.openai_compat import FakeState, embedding

from .conftest import running_fake

ROOT = pathlib.Path(__file__).resolve().parent.parent
KEY = "sk-fake-test-key"
USER = [{"role": "user", "content": "hello big world"}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}}


@pytest.fixture
async def served():
    async with running_fake(openai_compat, FakeState(api_key=KEY)) as state:
        yield state, state.port


@pytest.fixture
def fake(served):
    return served[0]


@pytest.fixture
def port(served):
    return served[1]


@pytest.fixture
async def client(port):
    async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY,
                                  max_retries=0) as c:
        yield c


@pytest.fixture
async def fetch(port):
    """Raw requests with tornado's client: fetch(path, body=None, **kwargs) -> HTTPResponse."""
    http = AsyncHTTPClient(force_instance=True)

    async def fetch(path, body=None, headers=None, **kwargs):
        if isinstance(body, dict):
            body = json.dumps(body)
        return await http.fetch(f"http://127.0.0.1:{port}{path}", raise_error=False,
                                method="GET" if body is None else "POST", body=body,
                                headers=headers or {"authorization": f"Bearer {KEY}"}, **kwargs)

    yield fetch
    http.close()


async def test_chat_completion(fake, client):
    raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=USER)
    assert raw.headers["content-type"] == "application/json"
    assert raw.headers["x-request-id"].startswith("req_")
    reply = raw.parse()
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    assert reply.model == "gpt-4o-mini"
    assert reply.choices[0].message.content == "echo: hello big world"
    assert reply.choices[0].finish_reason == "stop"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (3, 4, 7)
    [got] = fake.received
    assert (got.method, got.path) == ("POST", "/v1/chat/completions")
    assert got.headers["authorization"] == f"Bearer {KEY}"
    assert got.body["messages"] == USER
    assert fake.count("/chat/completions") == 1


async def test_chat_n_choices_and_text_parts(fake, client):
    fake.reply_text = "fixed reply"
    parts = [{"role": "user", "content": [{"type": "text", "text": "a b"}, {"type": "text", "text": "c"}]}]
    reply = await client.chat.completions.create(model="m", messages=parts, n=2)
    assert [c.message.content for c in reply.choices] == ["fixed reply", "fixed reply"]
    assert reply.usage.prompt_tokens == 3 and reply.usage.completion_tokens == 4


async def test_chat_stream_with_usage(fake, client):
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=USER, stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].delta.content for c in chunks[1:5]] == ["echo: ", "hello ", "big ", "world"]
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 7
    assert fake.streams_finished == 1 and not fake.stream_aborted


async def test_raw_sse_framing(fake, fetch):
    fake.stream_chunks = 3
    r = await fetch("/api/v1/chat/completions", {"model": "m", "messages": USER, "stream": True})
    assert r.headers["content-type"] == "text/event-stream"
    text = r.body.decode()
    events = text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert text.count('"content":"tok "') == 3


async def test_tool_call(client):
    reply = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "What is the weather?"}], tools=[WEATHER_TOOL])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert call.function.arguments == '{"location":"Paris"}'


async def test_tool_call_stream(client):
    stream = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "weather in Paris"}], tools=[WEATHER_TOOL],
        stream=True)
    chunks = [c async for c in stream]
    first = chunks[0].choices[0].delta.tool_calls[0]
    assert (first.index, first.type, first.function.name, first.function.arguments) == (
        0, "function", "get_weather", "")
    args = "".join(c.choices[0].delta.tool_calls[0].function.arguments for c in chunks[1:-1])
    assert args == '{"location":"Paris"}'
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_legacy_completions(fake, client):
    reply = await client.completions.create(model="gpt-3.5-turbo-instruct", prompt="say hi")
    assert reply.object == "text_completion" and reply.choices[0].text == "echo: say hi"
    stream = await client.completions.create(model="m", prompt="say hi", stream=True,
                                             stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "echo: say hi"
    assert chunks[-1].usage.completion_tokens == 3
    assert fake.count("/v1/completions") == 2 and fake.count("/chat/completions") == 0


async def test_embeddings_base64_default(fake, client):
    reply = await client.embeddings.create(model="text-embedding-3-small", input=["hi", "there"])
    assert fake.received[0].body["encoding_format"] == "base64"
    assert [d.index for d in reply.data] == [0, 1]
    assert reply.data[0].embedding == embedding("hi") and len(reply.data[1].embedding) == 8
    assert reply.usage.prompt_tokens == 2


async def test_embeddings_float_and_tokens(client):
    reply = await client.embeddings.create(model="e", input=[1, 2, 3], encoding_format="float")
    assert reply.data[0].embedding == embedding([1, 2, 3]) and reply.usage.prompt_tokens == 3
    reply = await client.embeddings.create(model="e", input=[[1, 2], [3]], encoding_format="float")
    assert len(reply.data) == 2


async def test_models(client):
    models = [m async for m in client.models.list()]
    assert "gpt-4o-mini" in {m.id for m in models}
    assert all(m.object == "model" and m.owned_by for m in models)


async def test_wrong_key_is_401_without_echo(fake, port):
    async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-wrong-123",
                                  max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as err:
            await bad.chat.completions.create(model="m", messages=USER)
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    assert err.value.type == "invalid_request_error"
    assert "sk-wrong-123" not in err.value.response.text
    assert fake.count("/chat/completions") == 1


async def test_rate_limit_with_retry_after(fake, client):
    fake.fail_times, fake.fail_status, fake.retry_after = 1, 429, "7"
    with pytest.raises(openai.RateLimitError) as err:
        await client.chat.completions.create(model="m", messages=USER)
    assert err.value.response.headers["retry-after"] == "7"
    assert err.value.code == "rate_limit_exceeded" and err.value.type == "requests"
    reply = await client.chat.completions.create(model="m", messages=USER)  # fail_times used up
    assert reply.choices[0].message.content == "echo: hello big world"
    assert fake.count("/chat/completions") == 2


async def test_server_error(fake, client):
    fake.fail_times = 1
    with pytest.raises(openai.InternalServerError) as err:
        await client.chat.completions.create(model="m", messages=USER)
    assert err.value.type == "server_error"
    assert "retry-after" not in err.value.response.headers


async def test_bad_requests(fake, fetch):
    r = await fetch("/v1/chat/completions", "{not json")
    assert r.code == 400 and json.loads(r.body)["error"]["type"] == "invalid_request_error"
    r = await fetch("/v1/chat/completions", {"messages": USER})
    assert r.code == 400 and json.loads(r.body)["error"]["param"] is None
    r = await fetch("/v1/nope")
    assert r.code == 404 and json.loads(r.body)["error"]["message"] == "Invalid URL (GET /v1/nope)"
    assert len(fake.received) == 3 and fake.received[0].body is None


async def test_azure_path_takes_model_from_deployment(fake, fetch):
    r = await fetch("/openai/deployments/my-gpt/chat/completions?api-version=2024-06-01",
                    {"messages": USER}, headers={"api-key": KEY})
    assert r.code == 200 and json.loads(r.body)["model"] == "my-gpt"
    assert fake.received[0].query == "api-version=2024-06-01"


async def test_mid_stream_failure(fake, client):
    fake.fail_mid_stream_after = 2
    stream = await client.chat.completions.create(model="m", messages=USER, stream=True)
    got = []
    with pytest.raises(openai.APIConnectionError):
        async for chunk in stream:
            got.append(chunk.choices[0].delta.content)
    assert got == ["", "echo: ", "hello "]
    assert fake.streams_finished == 0 and not fake.stream_aborted


async def test_openrouter_comments_are_ignored(fake, client):
    fake.openrouter_comments = True
    stream = await client.chat.completions.create(model="m", messages=USER, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert text == "echo: hello big world" and fake.streams_finished == 1


async def test_client_disconnect_marks_stream_aborted(fake, client):
    fake.chunk_delay = 0.05
    stream = await client.chat.completions.create(model="m", messages=USER, stream=True)
    await stream.__anext__()
    await stream.close()
    for _ in range(100):
        if fake.stream_aborted:
            break
        await asyncio.sleep(0.02)
    assert fake.stream_aborted and fake.streams_finished == 0


async def test_standalone_prints_port_and_serves():
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "contrib.fake_providers.openai_compat", "--port", "0", "--chunks", "5",
        stdout=asyncio.subprocess.PIPE, cwd=ROOT)
    try:
        port = int(await asyncio.wait_for(proc.stdout.readline(), 10))
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="any",
                                      max_retries=0) as c:
            stream = await c.chat.completions.create(model="m", messages=USER, stream=True)
            assert "".join([ch.choices[0].delta.content or "" async for ch in stream]) == "tok " * 5
    finally:
        proc.terminate()
        await proc.wait()
