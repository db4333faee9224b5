"""The fake Anthropic API, checked against the official anthropic SDK and raw requests: the
checks and error bodies the gateway's tests rely on must be the real API's."""

import anthropic
import orjson
import pytest
from tornado.httpclient import AsyncHTTPClient

from contrib.fake_providers import anthropic as anthropic_fake
from contrib.fake_providers.anthropic import FakeState
from tornado_proxy.sse import SseParser

from .conftest import running_fake

KEY = "sk-ant-fake-test-key"
USER = [{"role": "user", "content": "hello big world"}]
TOOL = {"name": "get_weather", "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}}}
HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"}


@pytest.fixture
async def served():
    async with running_fake(anthropic_fake, FakeState(api_key=KEY)) as state:
        yield state, state.port


@pytest.fixture
async def client(served):
    async with anthropic.AsyncAnthropic(base_url=f"http://127.0.0.1:{served[1]}", api_key=KEY, max_retries=0) as c:
        yield c


@pytest.fixture
async def post(served):
    http = AsyncHTTPClient(force_instance=True)

    async def do(path, body, headers=HEADERS):
        return await http.fetch(f"http://127.0.0.1:{served[1]}{path}", method="POST", body=orjson.dumps(body),
                                headers=headers, raise_error=False)

    yield do
    http.close()


async def test_sdk_plain_stream_and_count(client, served):
    message = await client.messages.create(model="claude-x", max_tokens=50, system="sys", messages=USER)
    assert message.content[0].text == "echo: hello big world" and message.usage.input_tokens == 4
    async with client.messages.stream(model="claude-x", max_tokens=50, messages=USER, tools=[TOOL]) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "echo: hello big world" and final.stop_reason == "end_turn"
    counted = await client.messages.count_tokens(model="claude-x", messages=USER)
    assert counted.input_tokens == 3
    sent = served[0].received[0].headers
    assert KEY in (sent.get("x-api-key"), sent.get("authorization", "")[7:])
    assert served[0].received[0].headers["anthropic-version"]


async def test_sdk_tool_use_and_limits(client):
    message = await client.messages.create(model="claude-x", max_tokens=50, tools=[TOOL],
                                           messages=[{"role": "user", "content": "weather in Paris and London?"}])
    assert message.stop_reason == "tool_use"
    assert [b.input for b in message.content[1:]] == [{"location": "Paris"}, {"location": "London"}]
    cut = await client.messages.create(model="claude-x", max_tokens=2, messages=USER)
    assert cut.stop_reason == "max_tokens" and cut.content[0].text == "echo: hello "
    stopped = await client.messages.create(model="claude-x", max_tokens=50, messages=USER, stop_sequences=["big"])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "big"


@pytest.mark.parametrize("headers, status, kind, message", [
    ({"anthropic-version": "2023-06-01"}, 401, "authentication_error", "x-api-key header is required"),
    ({"x-api-key": "wrong", "anthropic-version": "2023-06-01"}, 401, "authentication_error", "invalid x-api-key"),
    ({"x-api-key": KEY}, 400, "invalid_request_error", "anthropic-version: header is required"),
])
async def test_header_checks(post, headers, status, kind, message):
    r = await post("/v1/messages", {"model": "m", "max_tokens": 5, "messages": USER}, headers)
    body = orjson.loads(r.body)
    assert r.code == status and body["type"] == "error"
    assert body["error"] == {"type": kind, "message": message}
    assert r.headers["request-id"].startswith("req_")


@pytest.mark.parametrize("body, message", [
    ({"model": "m", "messages": USER}, "max_tokens: Field required"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": ""}]}, "non-empty content"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}]},
     "text content blocks must be non-empty"),
    ({"model": "m", "max_tokens": 5, "messages": [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "nope", "content": "x"}]}]},
     "unexpected `tool_use_id`"),
    ({"model": "m", "max_tokens": 5, "messages": [
        *USER, {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
        {"role": "user", "content": "no result"}]}, "without `tool_result`"),
    ({"model": "m", "max_tokens": 5, "messages": USER, "tools": [{"name": "f"}]}, "input_schema: Field required"),
])
async def test_body_checks(post, body, message):
    r = await post("/v1/messages", body)
    assert r.code == 400 and message in orjson.loads(r.body)["error"]["message"]


async def test_count_tokens_rejects_extra_fields(post):
    r = await post("/v1/messages/count_tokens", {"model": "m", "messages": USER, "max_tokens": 5})
    assert r.code == 400 and orjson.loads(r.body)["error"]["message"] == "max_tokens: Extra inputs are not permitted"


@pytest.mark.parametrize("status, kind, retry_after", [
    (429, "rate_limit_error", "1"), (529, "overloaded_error", None), (500, "api_error", None),
])
async def test_injected_failures(post, served, status, kind, retry_after):
    served[0].fail_times, served[0].fail_status = 1, status
    r = await post("/v1/messages", {"model": "m", "max_tokens": 5, "messages": USER})
    assert r.code == status and orjson.loads(r.body)["error"]["type"] == kind
    assert r.headers.get("retry-after") == retry_after
    assert (await post("/v1/messages", {"model": "m", "max_tokens": 5, "messages": USER})).code == 200


async def test_stream_framing_and_error_event(post, served):
    r = await post("/v1/messages", {"model": "m", "max_tokens": 50, "messages": USER, "stream": True})
    parser = SseParser()
    events = parser.feed(r.body)
    assert all(e.event == orjson.loads(e.data)["type"] for e in events)
    assert [e.event for e in events][:3] == ["message_start", "ping", "content_block_start"]
    assert [e.event for e in events][-2:] == ["message_delta", "message_stop"]
    served[0].error_mid_stream_after = 1
    r = await post("/v1/messages", {"model": "m", "max_tokens": 50, "messages": USER, "stream": True})
    last = SseParser().feed(r.body)[-1]
    assert last.event == "error" and orjson.loads(last.data)["error"]["type"] == "overloaded_error"
