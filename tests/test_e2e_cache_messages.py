"""Response caching of ``POST /v1/messages`` end to end, with the official anthropic SDK: an
``anthropic/`` deployment (pass-through, the fake Anthropic API) and a translated one (the fake
OpenAI); plain and streamed answers, tool_use blocks, stream/plain crossover, entries kept apart
from chat's, and what is not stored. The fakes' request counts prove hits never reached them."""

import anthropic
import orjson
import pytest

from contrib.fake_providers.common import RawReply
from tornado_proxy.sse import SseParser

from .conftest import MASTER_KEY, PROVIDER_KEY
from .test_e2e_messages import EVENT_ORDER, WEATHER, WEATHER_TOOL, order

USER = [{"role": "user", "content": "hello cached world"}]
MESSAGES = "/v1/messages"


def config_yaml(fake_anthropic, fake_openai, params: str = "type: local") -> str:
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
router_settings:
  num_retries: 0
litellm_settings:
  cache: true
  cache_params:
    {params}
"""


@pytest.fixture
async def gw(gateway, fake_anthropic, fake_openai):
    return await gateway(config_yaml(fake_anthropic, fake_openai))


@pytest.fixture
async def client(gw):
    async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=MASTER_KEY, max_retries=0) as c:
        yield c


def upstream_calls(fake_anthropic, fake_openai) -> int:
    return fake_anthropic.count("/v1/messages") + fake_openai.count("/chat/completions")


async def create(client, **kwargs):
    """(message, whether it was a cache hit)"""
    raw = await client.messages.with_raw_response.create(**kwargs)
    return await raw.parse(), raw.headers.get("x-litellm-cache-hit") == "True"


async def streamed(client, **kwargs):
    """(final message, whether it was a cache hit) through ``messages.stream``"""
    async with client.messages.stream(**kwargs) as stream:
        message = await stream.get_final_message()
        return message, stream.response.headers.get("x-litellm-cache-hit") == "True"


def blocks(message) -> list[dict]:
    """Content blocks without the ids (a tool_use id is the provider's; a hit keeps it)."""
    return [{k: v for k, v in b.model_dump().items() if k != "id" and v is not None} for b in message.content]


def events_of(body: bytes) -> list[tuple[str | None, dict]]:
    parser = SseParser()
    return [(e.event, orjson.loads(e.data)) for e in parser.feed(body) + parser.close()]


@pytest.mark.parametrize("model", ["claude", "gpt-fake"])
async def test_plain_hit_then_streamed_hit(client, model, fake_anthropic, fake_openai):
    first, hit = await create(client, model=model, max_tokens=100, messages=USER)
    assert not hit and first.content[0].text == "echo: hello cached world"
    again, hit = await create(client, model=model, max_tokens=100, messages=USER, metadata={"user_id": "u-2"})
    assert hit and again.id != first.id and again.id.startswith("msg_")
    assert blocks(again) == blocks(first) and again.stop_reason == first.stop_reason == "end_turn"
    assert again.usage.output_tokens == first.usage.output_tokens
    replayed, hit = await streamed(client, model=model, max_tokens=100, messages=USER)
    assert hit and blocks(replayed) == blocks(first) and replayed.stop_reason == "end_turn"
    assert replayed.usage.input_tokens == first.usage.input_tokens
    assert upstream_calls(fake_anthropic, fake_openai) == 1


@pytest.mark.parametrize("model", ["claude", "gpt-fake"])
async def test_streamed_tool_use_then_plain_and_streamed_hits(client, model, fake_anthropic, fake_openai):
    ask = dict(model=model, max_tokens=200, messages=WEATHER, tools=[WEATHER_TOOL])
    first, hit = await streamed(client, **ask)
    assert not hit and first.stop_reason == "tool_use"
    tools = [b for b in first.content if b.type == "tool_use"]
    assert tools and tools[0].name == "get_weather" and tools[0].input == {"location": "Paris"}
    plain, hit = await create(client, **ask)
    assert hit and blocks(plain) == blocks(first) and plain.stop_reason == "tool_use"
    assert [b.id for b in plain.content if b.type == "tool_use"] == [b.id for b in tools]
    again, hit = await streamed(client, **ask)
    assert hit and blocks(again) == blocks(first)
    assert upstream_calls(fake_anthropic, fake_openai) == 1


async def test_replayed_stream_is_well_formed(gw, fetch, fake_anthropic):
    ask = {"model": "claude", "max_tokens": 200, "messages": WEATHER, "tools": [WEATHER_TOOL]}
    await fetch(gw, MESSAGES, ask)
    response = await fetch(gw, MESSAGES, {**ask, "stream": True})
    assert response.headers["x-litellm-cache-hit"] == "True"
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = events_of(response.body)
    assert all(name == data["type"] for name, data in events)
    # a text block then a tool_use block, each a start/delta/stop run
    assert order(events) == EVENT_ORDER[:4] + EVENT_ORDER[1:4] + EVENT_ORDER[4:]
    starts = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert [b["type"] for b in starts] == ["text", "tool_use"] and starts[1]["input"] == {}
    deltas = [d["delta"] for n, d in events if n == "content_block_delta"]
    assert deltas[1]["type"] == "input_json_delta" and orjson.loads(deltas[1]["partial_json"]) == {"location": "Paris"}
    start = events[0][1]["message"]
    assert start["id"].startswith("msg_") and start["content"] == [] and start["stop_reason"] is None
    delta = next(d for n, d in events if n == "message_delta")
    assert delta["delta"]["stop_reason"] == "tool_use" and delta["usage"]["output_tokens"] > 0
    assert fake_anthropic.count("/v1/messages") == 1


async def test_messages_and_chat_entries_are_apart(gw, fetch, fake_openai):
    body = {"model": "gpt-fake", "max_tokens": 50, "messages": [{"role": "user", "content": "same body"}]}
    assert "x-litellm-cache-hit" not in (await fetch(gw, MESSAGES, body)).headers
    chat = await fetch(gw, "/v1/chat/completions", body)
    assert chat.code == 200 and "x-litellm-cache-hit" not in chat.headers
    assert orjson.loads(chat.body)["object"] == "chat.completion"
    hit = await fetch(gw, MESSAGES, body)
    assert hit.headers["x-litellm-cache-hit"] == "True" and orjson.loads(hit.body)["type"] == "message"
    chat_hit = await fetch(gw, "/v1/chat/completions", body)
    assert chat_hit.headers["x-litellm-cache-hit"] == "True" and "choices" in orjson.loads(chat_hit.body)
    assert hit.headers["x-litellm-cache-key"] != chat_hit.headers["x-litellm-cache-key"]
    assert fake_openai.count("/chat/completions") == 2


async def test_stop_reasons_kept_and_failures_not(client, gw, fetch, fake_anthropic):
    cut, _ = await create(client, model="claude", max_tokens=2, messages=USER)
    assert cut.stop_reason == "max_tokens"
    assert (await create(client, model="claude", max_tokens=2, messages=USER))[1]
    stopped, _ = await create(client, model="claude", max_tokens=50, messages=USER, stop_sequences=["cached"])
    assert stopped.stop_reason == "stop_sequence"
    assert (await create(client, model="claude", max_tokens=50, messages=USER, stop_sequences=["cached"]))[1]
    assert fake_anthropic.count("/v1/messages") == 2
    # an error event mid-stream, a stream cut short: nothing stored
    for knob in ("error_mid_stream_after", "fail_mid_stream_after"):
        ask = {"model": "claude", "max_tokens": 100, "messages": [{"role": "user", "content": knob}], "stream": True}
        setattr(fake_anthropic, knob, 1)
        await fetch(gw, MESSAGES, ask)
        setattr(fake_anthropic, knob, None)
        assert "x-litellm-cache-hit" not in (await fetch(gw, MESSAGES, ask)).headers
    assert fake_anthropic.count("/v1/messages") == 6
    # a refusal is a complete message, but not an answer to keep
    refusal = {"id": "msg_refused", "type": "message", "role": "assistant", "model": "claude-3-5-haiku-20241022",
               "content": [], "stop_reason": "refusal", "stop_sequence": None,
               "usage": {"input_tokens": 3, "output_tokens": 0}}
    fake_anthropic.raw_reply = RawReply(content_type="application/json", frames=(orjson.dumps(refusal),))
    for _ in range(2):
        response = await fetch(gw, MESSAGES, {"model": "claude", "max_tokens": 100, "messages": WEATHER})
        assert response.code == 200 and "x-litellm-cache-hit" not in response.headers
    assert fake_anthropic.count("/v1/messages") == 8


async def test_cache_controls_and_errors_in_anthropic_shape(gw, fetch, fake_anthropic):
    ask = {"model": "claude", "max_tokens": 100, "messages": USER}
    await fetch(gw, MESSAGES, {**ask, "cache": {"no-store": True}})
    assert "x-litellm-cache-hit" not in (await fetch(gw, MESSAGES, ask)).headers
    assert (await fetch(gw, MESSAGES, ask)).headers["x-litellm-cache-hit"] == "True"
    assert "x-litellm-cache-hit" not in (await fetch(gw, MESSAGES, {**ask, "cache": {"no-cache": True}})).headers
    assert all("cache" not in r.body for r in fake_anthropic.received)
    bad = await fetch(gw, MESSAGES, {**ask, "cache": {"ttl": "soon"}})
    assert bad.code == 400 and orjson.loads(bad.body)["type"] == "error"
    assert fake_anthropic.count("/v1/messages") == 3


async def test_call_type_not_listed_is_not_cached(gateway, fetch, fake_anthropic, fake_openai):
    gw = await gateway(config_yaml(fake_anthropic, fake_openai, "supported_call_types: [acompletion]"))
    ask = {"model": "claude", "max_tokens": 100, "messages": USER}
    for _ in range(2):
        response = await fetch(gw, MESSAGES, ask)
        assert response.code == 200 and "x-litellm-cache-key" not in response.headers
    assert fake_anthropic.count("/v1/messages") == 2
