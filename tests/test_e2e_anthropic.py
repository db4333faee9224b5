"""End to end: the official openai SDK through the gateway to an ``anthropic/`` deployment (the
fake Anthropic API): plain, streaming, tools, tool results, JSON mode, cache usage, and errors
(Anthropic's bodies and statuses -> OpenAI's, before and after the first streamed byte)."""

import asyncio

import openai
import orjson
import pytest

from tornado_proxy.providers.anthropic import API_VERSION, DEFAULT_MAX_TOKENS

from .conftest import MASTER_KEY, PROVIDER_KEY

USER = [{"role": "user", "content": "hello big world"}]
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}


def config_yaml(fake, extra: str = "") -> str:
    return f"""
model_list:
  - model_name: claude
    litellm_params:
      model: anthropic/claude-3-5-haiku-20241022
      api_base: {fake.base}
      api_key: {PROVIDER_KEY}
    model_info:
      id: dep-claude
{extra}
router_settings:  # these tests check how one upstream error is answered
  num_retries: 0
"""


@pytest.fixture
async def gw(gateway, fake_anthropic):
    return await gateway(config_yaml(fake_anthropic))


def sent(fake) -> dict:
    return fake.received[-1].body


async def test_plain_chat(client, fake_anthropic):
    reply = await client.chat.completions.create(
        model="claude", messages=[{"role": "system", "content": "be brief"}, *USER], temperature=0.2)
    choice = reply.choices[0]
    assert choice.message.content == "echo: hello big world"
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert reply.object == "chat.completion"
    assert reply.model == "claude-3-5-haiku-20241022"
    assert reply.id.startswith("msg_")
    assert reply.usage.prompt_tokens == 5 and reply.usage.completion_tokens == 4 and reply.usage.total_tokens == 9

    (request,) = fake_anthropic.received
    assert request.path == "/v1/messages"
    assert request.headers["x-api-key"] == PROVIDER_KEY
    assert request.headers["anthropic-version"] == API_VERSION
    assert "authorization" not in request.headers
    assert MASTER_KEY not in orjson.dumps(request.headers).decode()
    assert request.body == {"model": "claude-3-5-haiku-20241022", "max_tokens": DEFAULT_MAX_TOKENS,
                            "system": [{"type": "text", "text": "be brief"}], "temperature": 0.2,
                            "messages": [{"role": "user", "content": [{"type": "text", "text": "hello big world"}]}]}


async def test_parameters_are_translated(client, fake_anthropic):
    reply = await client.chat.completions.create(
        model="claude", messages=[{"role": "user", "content": "one two three four five"}],
        max_completion_tokens=3, top_p=0.5, stop="four", user="user-7", extra_body={"top_k": 5})
    assert reply.choices[0].message.content == "echo: one two three "
    assert reply.choices[0].finish_reason == "stop"  # stop_sequence
    body = sent(fake_anthropic)
    assert body["max_tokens"] == 3 and body["top_p"] == 0.5 and body["top_k"] == 5
    assert body["stop_sequences"] == ["four"] and body["metadata"] == {"user_id": "user-7"}
    assert "stop" not in body and "user" not in body and "max_completion_tokens" not in body

    reply = await client.chat.completions.create(model="claude", messages=USER, max_tokens=2)
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content == "echo: hello "


async def test_unsupported_parameter_is_a_400_unless_dropped(client, fake_anthropic):
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="claude", messages=USER, seed=1)
    assert "seed" in info.value.message
    assert fake_anthropic.received == []
    reply = await client.chat.completions.create(model="claude", messages=USER, seed=1,
                                                 extra_body={"drop_params": True})
    assert reply.choices[0].message.content == "echo: hello big world"
    assert "seed" not in sent(fake_anthropic) and "drop_params" not in sent(fake_anthropic)


@pytest.mark.parametrize("setting", ["litellm_settings:\n  drop_params: true",  # global, as in LiteLLM
                                     None])  # per deployment (litellm_params.drop_params)
async def test_drop_params_from_the_config(gateway, fake_anthropic, setting):
    if setting:
        gw = await gateway(config_yaml(fake_anthropic, setting))
    else:
        gw = await gateway(config_yaml(fake_anthropic).replace("      api_key:", "      drop_params: true\n      api_key:"))
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=MASTER_KEY, max_retries=0) as client:
        reply = await client.chat.completions.create(model="claude", messages=USER, seed=1)
    assert reply.choices[0].message.content
    assert "seed" not in sent(fake_anthropic) and "drop_params" not in sent(fake_anthropic)


async def test_drop_params_never_reaches_an_openai_upstream(gateway, fake_openai):
    gw = await gateway(f"""
model_list:
  - model_name: gpt-fake
    litellm_params: {{model: openai/gpt-4o-mini, api_base: "{fake_openai.base}", api_key: {PROVIDER_KEY}}}
litellm_settings:
  drop_params: true
""")
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=MASTER_KEY, max_retries=0) as client:
        await client.chat.completions.create(model="gpt-fake", messages=USER, seed=1,
                                             extra_body={"drop_params": True})
    assert "drop_params" not in fake_openai.received[-1].body
    assert fake_openai.received[-1].body["seed"] == 1  # OpenAI takes seed: nothing to drop


async def test_tools_and_tool_results_round_trip(client, fake_anthropic):
    reply = await client.chat.completions.create(model="claude", messages=WEATHER, tools=[WEATHER_TOOL],
                                                 tool_choice="auto", parallel_tool_calls=False)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("toolu_")
    assert orjson.loads(call.function.arguments) == {"location": "Paris"}
    body = sent(fake_anthropic)
    assert body["tools"] == [{"name": "get_weather", "description": "Weather for a city",
                              "input_schema": WEATHER_TOOL["function"]["parameters"]}]
    assert body["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}

    history = [*WEATHER, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "22 C and sunny"}]
    final = await client.chat.completions.create(model="claude", messages=history, tools=[WEATHER_TOOL])
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.content == "echo: 22 C and sunny"
    body = sent(fake_anthropic)
    assert body["messages"][1] == {"role": "assistant", "content": [
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": call.id, "name": "get_weather", "input": {"location": "Paris"}}]}
    assert body["messages"][2] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": call.id, "content": "22 C and sunny"}]}


async def test_parallel_tool_calls_and_forced_tool(client, fake_anthropic):
    reply = await client.chat.completions.create(
        model="claude", messages=[{"role": "user", "content": "weather in Paris and London?"}],
        tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert sent(fake_anthropic)["tool_choice"] == {"type": "tool", "name": "get_weather"}
    assert [c.function.name for c in reply.choices[0].message.tool_calls] == ["get_weather"]

    reply = await client.chat.completions.create(
        model="claude", messages=[{"role": "user", "content": "weather in Paris and London?"}],
        tools=[WEATHER_TOOL], tool_choice="required")
    assert sent(fake_anthropic)["tool_choice"] == {"type": "any"}
    calls = reply.choices[0].message.tool_calls
    assert [orjson.loads(c.function.arguments)["location"] for c in calls] == ["Paris", "London"]
    assert len({c.id for c in calls}) == 2


async def test_json_mode_answers_in_content(client, fake_anthropic):
    schema = {"type": "object", "properties": {"location": {"type": "string"}}}
    reply = await client.chat.completions.create(
        model="claude", messages=USER,
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}})
    assert orjson.loads(reply.choices[0].message.content) == {"location": "Paris"}
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason == "stop"
    body = sent(fake_anthropic)
    assert body["tool_choice"] == {"type": "tool", "name": "json_tool_call"}
    assert body["tools"] == [{"name": "json_tool_call", "input_schema": schema}]


async def test_image_parts(client, fake_anthropic):
    content = [{"type": "text", "text": "what is this"},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
               {"type": "image_url", "image_url": {"url": "https://example.test/cat.jpg", "detail": "low"}}]
    await client.chat.completions.create(model="claude", messages=[{"role": "user", "content": content}])
    assert sent(fake_anthropic)["messages"][0]["content"] == [
        {"type": "text", "text": "what is this"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.test/cat.jpg"}}]


async def test_cache_tokens_are_kept(client, fake_anthropic):
    fake_anthropic.cache_read_tokens, fake_anthropic.cache_creation_tokens = 100, 20
    reply = await client.chat.completions.create(model="claude", messages=USER)
    usage = reply.usage
    assert usage.prompt_tokens == 3 + 100 + 20 and usage.completion_tokens == 4
    assert usage.prompt_tokens_details.cached_tokens == 100
    assert usage.model_extra["cache_read_input_tokens"] == 100
    assert usage.model_extra["cache_creation_input_tokens"] == 20


# --- streaming -------------------------------------------------------------------------------

async def collect(stream) -> list:
    return [chunk async for chunk in stream]


async def test_stream_text_with_usage(client, fake_anthropic):
    chunks = await collect(await client.chat.completions.create(
        model="claude", messages=USER, stream=True, stream_options={"include_usage": True}))
    assert sent(fake_anthropic)["stream"] is True
    assert "stream_options" not in sent(fake_anthropic)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: hello big world"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 3
    assert chunks[-1].usage.completion_tokens == 4
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert fake_anthropic.streams_finished == 1


async def test_stream_without_usage_has_no_usage_chunk(client, fake_anthropic):
    chunks = await collect(await client.chat.completions.create(model="claude", messages=USER, stream=True))
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_stream_parallel_tool_calls(client, fake_anthropic):
    chunks = await collect(await client.chat.completions.create(
        model="claude", messages=[{"role": "user", "content": "weather in Paris and Tokyo"}],
        tools=[WEATHER_TOOL], stream=True))
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            entry = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            if tc.id:
                assert entry["id"] is None  # the id comes once, with the name
                entry["id"], entry["name"] = tc.id, tc.function.name
            entry["arguments"] += tc.function.arguments or ""
    assert sorted(calls) == [0, 1]
    assert [orjson.loads(calls[i]["arguments"]) for i in (0, 1)] == [{"location": "Paris"}, {"location": "Tokyo"}]
    assert all(c["name"] == "get_weather" and c["id"].startswith("toolu_") for c in calls.values())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Let me check."
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


async def test_stream_json_mode_streams_content(client, fake_anthropic):
    chunks = await collect(await client.chat.completions.create(
        model="claude", messages=USER, stream=True, response_format={"type": "json_object"}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert orjson.loads(text) == {"location": "Paris"}
    assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"


# --- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("status, exc, kind", [
    (400, openai.BadRequestError, "invalid_request_error"),
    (401, openai.AuthenticationError, "authentication_error"),
    (403, openai.PermissionDeniedError, "permission_denied"),
    (404, openai.NotFoundError, "not_found_error"),
    (413, openai.APIStatusError, "invalid_request_error"),
    (500, openai.InternalServerError, "api_error"),
    (529, openai.InternalServerError, "overloaded_error"),
])
async def test_upstream_errors_are_mapped(client, fake_anthropic, status, exc, kind):
    fake_anthropic.fail_times, fake_anthropic.fail_status = 1, status
    with pytest.raises(exc) as info:
        await client.chat.completions.create(model="claude", messages=USER)
    expected = 503 if status == 529 else status
    assert info.value.status_code == expected
    error = info.value.body
    assert error["type"] == kind and error["code"] == str(expected)
    assert error["message"].startswith("AnthropicException - anthropic/claude-3-5-haiku-20241022: ")
    assert PROVIDER_KEY not in error["message"]


async def test_rate_limit_keeps_retry_after(gw, fake_anthropic, fetch):
    fake_anthropic.fail_times, fake_anthropic.fail_status, fake_anthropic.retry_after = 1, 429, "7"
    r = await fetch(gw, "/v1/chat/completions", {"model": "claude", "messages": USER})
    assert r.code == 429 and r.headers["retry-after"] == "7"
    assert orjson.loads(r.body)["error"]["type"] == "rate_limit_error"


async def test_wrong_provider_key_is_401_without_the_key(gateway, fake_anthropic, fetch):
    gw = await gateway(config_yaml(fake_anthropic).replace(PROVIDER_KEY, "sk-ant-wrong-key-123"))
    r = await fetch(gw, "/v1/chat/completions", {"model": "claude", "messages": USER})
    assert r.code == 401
    assert "invalid x-api-key" in r.body.decode() and "sk-ant-wrong-key-123" not in r.body.decode()


async def test_error_event_mid_stream_ends_the_stream_with_an_error(client, fake_anthropic):
    fake_anthropic.error_mid_stream_after = 2
    stream = await client.chat.completions.create(model="claude", messages=USER, stream=True)
    got = []
    with pytest.raises(openai.APIError) as info:
        async for chunk in stream:
            got.append(chunk)
    assert "Overloaded" in str(info.value.message)
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == "echo: hello "


async def test_upstream_closing_mid_stream(gw, fake_anthropic, fetch):
    fake_anthropic.fail_mid_stream_after = 1
    r = await fetch(gw, "/v1/chat/completions", {"model": "claude", "messages": USER, "stream": True})
    assert r.code == 200
    events = [e for e in r.body.split(b"\n\n") if e]
    assert events[-1].startswith(b"data: {\"error\"")
    assert b"[DONE]" not in r.body


async def test_upstream_unreachable_is_503(gateway, fetch):
    gw = await gateway(config_yaml(type("F", (), {"base": "http://127.0.0.1:9"})()))
    r = await fetch(gw, "/v1/chat/completions", {"model": "claude", "messages": USER})
    assert r.code == 503


async def test_embeddings_on_an_anthropic_model_is_400(gw, fetch, fake_anthropic):
    r = await fetch(gw, "/v1/embeddings", {"model": "claude", "input": "x"})
    assert r.code == 400 and fake_anthropic.received == []


async def test_env_defaults(gateway, fake_anthropic, fetch):
    gw = await gateway("""
model_list:
  - model_name: claude
    litellm_params:
      model: anthropic/claude-3-5-haiku-20241022
""", env={"ANTHROPIC_API_KEY": PROVIDER_KEY, "ANTHROPIC_API_BASE": fake_anthropic.base + "/v1"})
    r = await fetch(gw, "/v1/chat/completions", {"model": "claude", "messages": USER})
    assert r.code == 200, r.body
    assert fake_anthropic.received[-1].path == "/v1/messages"
    await asyncio.sleep(0)
