"""End to end: the official anthropic SDK against the gateway's ``POST /v1/messages`` (and
``/v1/messages/count_tokens``): passed through to an ``anthropic/`` deployment (the fake
Anthropic API), translated for an OpenAI-compatible one (the fake OpenAI) and for ``mock/``;
plain, streaming, tools, and errors in Anthropic's shape."""

import anthropic
import orjson
import pytest

from tornado_proxy.providers.anthropic import API_VERSION
from tornado_proxy.sse import SseParser

from .conftest import MASTER_KEY, PROVIDER_KEY

USER = [{"role": "user", "content": "hello big world"}]
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_TOOL = {"name": "get_weather", "description": "Weather for a city",
                "input_schema": {"type": "object", "properties": {"location": {"type": "string"}},
                                 "required": ["location"]}}
EVENT_ORDER = ["message_start", "content_block_start", "content_block_delta", "content_block_stop",
               "message_delta", "message_stop"]


def config_yaml(fake_anthropic, fake_openai) -> str:
    return f"""
model_list:
  - model_name: claude
    litellm_params:
      model: anthropic/claude-3-5-haiku-20241022
      api_base: {fake_anthropic.base}
      api_key: {PROVIDER_KEY}
  - model_name: gpt-fake
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: {fake_openai.base}
      api_key: {PROVIDER_KEY}
  - model_name: demo
    litellm_params:
      model: mock/demo
router_settings:  # these tests check how one upstream error is answered
  num_retries: 0
"""


@pytest.fixture
async def gw(gateway, fake_anthropic, fake_openai):
    return await gateway(config_yaml(fake_anthropic, fake_openai))


@pytest.fixture
async def client(gw):
    async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=MASTER_KEY, max_retries=0) as c:
        yield c


def events_of(body: bytes) -> list[tuple[str | None, dict]]:
    parser = SseParser()
    return [(e.event, orjson.loads(e.data)) for e in parser.feed(body) + parser.close()]


def order(events) -> list[str]:
    """Event names with repeats collapsed (one start/delta.../stop run per block)."""
    out: list[str] = []
    for name, _ in events:
        if name != "ping" and (not out or out[-1] != name or name != "content_block_delta"):
            out.append(name)
    return out


# --- pass-through to an anthropic/ deployment ---------------------------------------------------

async def test_passthrough_plain(client, fake_anthropic, fake_openai):
    message = await client.messages.create(model="claude", max_tokens=100, system="be brief", messages=USER,
                                           metadata={"user_id": "u-1"}, extra_body={"temperature": 0.3, "top_k": 4},
                                           extra_headers={"anthropic-beta": "prompt-caching-2024-07-31"})
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text" and message.content[0].text == "echo: hello big world"
    assert message.stop_reason == "end_turn" and message.model == "claude-3-5-haiku-20241022"
    assert message.usage.input_tokens == 5 and message.usage.output_tokens == 4
    (request,) = fake_anthropic.received
    assert request.path == "/v1/messages"
    assert request.body == {"model": "claude-3-5-haiku-20241022", "max_tokens": 100, "system": "be brief",
                            "messages": USER, "temperature": 0.3, "top_k": 4, "metadata": {"user_id": "u-1"}}
    assert request.headers["x-api-key"] == PROVIDER_KEY
    assert request.headers["anthropic-version"] == client.default_headers["anthropic-version"]
    assert request.headers["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert MASTER_KEY not in orjson.dumps(request.headers).decode()
    assert fake_openai.received == []


async def test_passthrough_stream_relays_every_event(client, gw, fetch, fake_anthropic):
    async with client.messages.stream(model="claude", max_tokens=100, messages=USER) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "echo: hello big world"
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 4 and final.usage.input_tokens == 3
    assert fake_anthropic.received[-1].body["stream"] is True

    r = await fetch(gw, "/v1/messages", {"model": "claude", "max_tokens": 100, "messages": USER, "stream": True})
    assert r.code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert fake_anthropic.received[-1].headers["anthropic-version"] == API_VERSION  # the client sent none
    events = events_of(r.body)
    assert all(name == data["type"] for name, data in events)  # `event:` lines included
    assert [n for n, _ in events][:2] == ["message_start", "ping"]
    assert order(events) == EVENT_ORDER
    assert b"[DONE]" not in r.body


async def test_passthrough_tools(client, fake_anthropic):
    message = await client.messages.create(model="claude", max_tokens=100, messages=WEATHER, tools=[WEATHER_TOOL],
                                           tool_choice={"type": "auto"})
    assert message.stop_reason == "tool_use"
    text, call = message.content
    assert text.text == "Let me check."
    assert call.type == "tool_use" and call.name == "get_weather" and call.input == {"location": "Paris"}
    assert fake_anthropic.received[-1].body["tools"] == [WEATHER_TOOL]
    follow = await client.messages.create(model="claude", max_tokens=100, tools=[WEATHER_TOOL], messages=[
        *WEATHER, {"role": "assistant", "content": [c.model_dump() for c in message.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}]}])
    assert follow.content[0].text == "echo: sunny"


async def test_passthrough_stream_tool_use(client, fake_anthropic):
    async with client.messages.stream(model="claude", max_tokens=100, messages=WEATHER, tools=[WEATHER_TOOL]) as s:
        final = await s.get_final_message()
    assert final.stop_reason == "tool_use"
    assert final.content[1].type == "tool_use" and final.content[1].input == {"location": "Paris"}


async def test_passthrough_errors_keep_anthropic_meaning(client, gw, fetch, fake_anthropic):
    fake_anthropic.fail_times, fake_anthropic.fail_status, fake_anthropic.retry_after = 1, 429, "3"
    with pytest.raises(anthropic.RateLimitError) as info:
        await client.messages.create(model="claude", max_tokens=10, messages=USER)
    assert info.value.response.headers["retry-after"] == "3"
    assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "rate_limit_error"

    fake_anthropic.fail_times, fake_anthropic.fail_status = 1, 529
    r = await fetch(gw, "/v1/messages", {"model": "claude", "max_tokens": 10, "messages": USER})
    assert r.code == 503
    assert orjson.loads(r.body)["error"]["type"] == "overloaded_error"

    r = await fetch(gw, "/v1/messages", {"model": "claude", "max_tokens": 10,
                                         "messages": [{"role": "user", "content": ""}]})
    assert r.code == 400  # Anthropic's own validation, passed on
    body = orjson.loads(r.body)
    assert body["type"] == "error" and "non-empty content" in body["error"]["message"]


async def test_passthrough_error_event_mid_stream_is_relayed(client, fake_anthropic):
    fake_anthropic.error_mid_stream_after = 1
    with pytest.raises(anthropic.APIStatusError) as info:
        async with client.messages.stream(model="claude", max_tokens=100, messages=USER) as stream:
            async for _ in stream:
                pass
    assert info.value.body["error"]["type"] == "overloaded_error"


# --- translated for an OpenAI-compatible deployment -----------------------------------------------

async def test_translated_plain(client, fake_openai):
    message = await client.messages.create(model="gpt-fake", max_tokens=100, system="be brief", messages=USER,
                                           stop_sequences=["END"], metadata={"user_id": "u-9"},
                                           extra_body={"temperature": 0.5, "top_k": 3})
    assert message.content[0].text == "echo: hello big world"
    assert message.stop_reason == "end_turn" and message.model == "gpt-4o-mini"
    assert message.usage.input_tokens == 5 and message.usage.output_tokens == 4
    assert fake_openai.received[-1].body == {
        "model": "gpt-4o-mini", "max_tokens": 100, "temperature": 0.5, "stop": ["END"], "user": "u-9",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello big world"}]}


async def test_translated_stream(client, gw, fetch, fake_openai):
    async with client.messages.stream(model="gpt-fake", max_tokens=100, messages=USER) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "echo: hello big world"
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == 3 and final.usage.output_tokens == 4
    sent = fake_openai.received[-1].body
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}

    r = await fetch(gw, "/v1/messages", {"model": "gpt-fake", "max_tokens": 100, "messages": USER, "stream": True})
    events = events_of(r.body)
    assert all(name == data["type"] for name, data in events)
    assert order(events) == EVENT_ORDER
    assert b"[DONE]" not in r.body


async def test_translated_tools_round_trip(client, fake_openai):
    message = await client.messages.create(model="gpt-fake", max_tokens=100, messages=WEATHER,
                                           tools=[WEATHER_TOOL], tool_choice={"type": "any"})
    assert message.stop_reason == "tool_use"
    (call,) = message.content
    assert call.type == "tool_use" and call.name == "get_weather" and call.input == {"location": "Paris"}
    sent = fake_openai.received[-1].body
    assert sent["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city", "parameters": WEATHER_TOOL["input_schema"]}}]
    assert sent["tool_choice"] == "required"

    follow = await client.messages.create(model="gpt-fake", max_tokens=100, tools=[WEATHER_TOOL], messages=[
        *WEATHER, {"role": "assistant", "content": [call.model_dump()]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"},
                                     {"type": "text", "text": "and tomorrow?"}]}])
    assert follow.content[0].text == "echo: and tomorrow?"
    assert fake_openai.received[-1].body["messages"][1:] == [
        {"role": "assistant", "content": None, "tool_calls": [{"id": call.id, "type": "function", "function": {
            "name": "get_weather", "arguments": '{"location":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
        {"role": "user", "content": "and tomorrow?"}]


async def test_translated_stream_tool_use(client, gw, fetch, fake_openai):
    async with client.messages.stream(model="gpt-fake", max_tokens=100, messages=WEATHER,
                                      tools=[WEATHER_TOOL]) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use"
    (call,) = final.content
    assert call.type == "tool_use" and call.name == "get_weather" and call.input == {"location": "Paris"}
    r = await fetch(gw, "/v1/messages", {"model": "gpt-fake", "max_tokens": 100, "messages": WEATHER,
                                         "tools": [WEATHER_TOOL], "stream": True})
    deltas = [d["delta"] for n, d in events_of(r.body) if n == "content_block_delta"]
    assert deltas and all(d["type"] == "input_json_delta" for d in deltas)
    assert len(deltas) > 1  # the arguments arrive in fragments, as they did upstream


async def test_translated_mock_plain_and_stream(client, fake_openai):
    message = await client.messages.create(model="demo", max_tokens=100, messages=USER)
    assert message.content[0].text == "hello big world"
    assert message.usage.input_tokens == 3 and message.usage.output_tokens == 3
    async with client.messages.stream(model="demo", max_tokens=100, messages=USER) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "hello big world" and final.usage.output_tokens == 3 and final.stop_reason == "end_turn"
    assert fake_openai.received == []


async def test_translated_errors_are_anthropic_shaped(client, gw, fetch, fake_openai):
    fake_openai.fail_times, fake_openai.fail_status = 1, 429
    with pytest.raises(anthropic.RateLimitError) as info:
        await client.messages.create(model="gpt-fake", max_tokens=10, messages=USER)
    assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "rate_limit_error"
    assert info.value.response.headers["retry-after"] == "1"

    with pytest.raises(anthropic.BadRequestError) as info:
        await client.messages.create(model="nope", max_tokens=10, messages=USER)
    assert "Invalid model name passed in model=nope" in info.value.body["error"]["message"]

    r = await fetch(gw, "/v1/messages", {"model": "gpt-fake", "messages": USER})
    assert r.code == 400
    assert orjson.loads(r.body) == {"type": "error", "error": {"type": "invalid_request_error", "message": (
        orjson.loads(r.body)["error"]["message"])}}
    assert "max_tokens" in orjson.loads(r.body)["error"]["message"]

    r = await fetch(gw, "/v1/messages", {"model": "gpt-fake", "max_tokens": 10, "messages": USER,
                                         "tools": [{"type": "web_search_20250305", "name": "web_search"}]})
    assert r.code == 400 and "only available on anthropic/" in orjson.loads(r.body)["error"]["message"]


async def test_auth_errors_are_anthropic_shaped(gw):
    async with anthropic.AsyncAnthropic(base_url=gw.url, api_key="sk-wrong", max_retries=0) as c:
        with pytest.raises(anthropic.AuthenticationError) as info:
            await c.messages.create(model="demo", max_tokens=10, messages=USER)
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["type"] == "authentication_error"


async def test_translated_failure_mid_stream_is_an_error_event(gw, fetch, fake_openai):
    fake_openai.fail_mid_stream_after = 2
    r = await fetch(gw, "/v1/messages", {"model": "gpt-fake", "max_tokens": 10, "messages": USER, "stream": True})
    events = events_of(r.body)
    assert events[0][0] == "message_start"
    name, data = events[-1]
    assert name == "error" and data["type"] == "error"
    assert data["error"]["type"] in ("api_error", "api_connection_error")


# --- count_tokens ---------------------------------------------------------------------------------

async def test_count_tokens(client, fake_anthropic, fake_openai):
    counted = await client.messages.count_tokens(model="claude", system="be brief", messages=USER)
    assert counted.input_tokens == 5
    request = fake_anthropic.received[-1]
    assert request.path == "/v1/messages/count_tokens"
    assert request.body == {"model": "claude-3-5-haiku-20241022", "system": "be brief", "messages": USER}

    counted = await client.messages.count_tokens(model="demo", messages=USER)
    assert counted.input_tokens == 3  # what the mock will bill as input

    with pytest.raises(anthropic.BadRequestError) as info:
        await client.messages.count_tokens(model="gpt-fake", messages=USER)
    assert "count_tokens is not available" in info.value.body["error"]["message"]
    assert fake_openai.received == []


async def test_x_api_key_auth(gw, fetch):
    r = await fetch(gw, "/v1/messages", {"model": "demo", "max_tokens": 5, "messages": USER}, key=None,
                    headers={"x-api-key": MASTER_KEY, "anthropic-version": "2023-06-01"})
    assert r.code == 200 and orjson.loads(r.body)["content"][0]["text"] == "hello big world"
    r = await fetch(gw, "/v1/messages", {"model": "demo", "max_tokens": 5, "messages": USER}, key=None)
    assert r.code == 401 and orjson.loads(r.body)["error"]["type"] == "authentication_error"
    r = await fetch(gw, "/v1/messages", method="GET")
    assert r.code == 405 and orjson.loads(r.body)["type"] == "error"


# --- every other provider behind /v1/messages ------------------------------------------------------

NATIVE = {  # provider -> (deployment model, the upstream path a stream goes to)
    "gemini": ("gemini/gemini-2.0-flash", "/v1beta/models/gemini-2.0-flash:streamGenerateContent"),
    "ollama_chat": ("ollama_chat/llama3.2", "/api/chat"),
}


@pytest.fixture(params=sorted(NATIVE))
async def native(request, gateway, fake_gemini, fake_ollama):
    """A gateway with one model named "other" on a natively translated provider (fake upstream)."""
    fake = fake_gemini if request.param == "gemini" else fake_ollama
    model, fake.stream_path = NATIVE[request.param]
    gw = await gateway(f"""
model_list:
  - model_name: other
    litellm_params:
      model: {model}
      api_base: {fake.base}
      api_key: {PROVIDER_KEY}
""")
    async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=MASTER_KEY, max_retries=0) as c:
        yield c, fake


async def test_other_providers_exact_translation(native):
    """The fakes' echo, token counts and tool call come back exactly, in Anthropic's shapes."""
    client, fake = native
    reply = await client.messages.create(model="other", max_tokens=100, system="be brief", messages=USER)
    assert reply.content[0].text == "echo: hello big world" and reply.stop_reason == "end_turn"
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (5, 4)
    async with client.messages.stream(model="other", max_tokens=100, messages=USER) as stream:
        assert "".join([t async for t in stream.text_stream]) == "echo: hello big world"
    async with client.messages.stream(model="other", max_tokens=100, tools=[WEATHER_TOOL],
                                      messages=[{"role": "user", "content": "weather in Paris?"}]) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert (final.content[-1].name, final.content[-1].input) == ("get_weather", {"location": "Paris"})
    assert fake.received[-1].path == fake.stream_path


async def test_other_providers_plain_stream_and_tools(native):
    client, fake = native
    message = await client.messages.create(model="other", max_tokens=100, system="be brief", messages=USER)
    assert "hello big world" in message.content[0].text
    assert message.stop_reason == "end_turn" and message.usage.output_tokens > 0
    async with client.messages.stream(model="other", max_tokens=100, messages=USER) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == message.content[0].text and final.stop_reason == "end_turn"
    tool = await client.messages.create(model="other", max_tokens=100, messages=WEATHER, tools=[WEATHER_TOOL])
    calls = [b for b in tool.content if b.type == "tool_use"]
    assert tool.stop_reason == "tool_use" and calls and calls[0].name == "get_weather"
    assert calls[0].input.get("location")
    async with client.messages.stream(model="other", max_tokens=100, messages=WEATHER, tools=[WEATHER_TOOL]) as s:
        streamed = await s.get_final_message()
    assert [b.input for b in streamed.content if b.type == "tool_use"] == [c.input for c in calls]
    assert fake.received
