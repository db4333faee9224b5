"""End to end through the gateway to the fake Gemini API with the official openai SDK: chat
(plain, streaming, tools, JSON mode, limits), legacy completions, embeddings, and Google's
errors mapped to OpenAI's; each test checks what Gemini received and what the client got."""

import logging

import openai
import orjson
import pytest

from contrib.fake_providers.gemini import embedding

from .conftest import MASTER_KEY, PROVIDER_KEY, error_of

USER = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello big world"}]
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"],
                   "additionalProperties": False}}}
GEMINI_TOOLS = [{"functionDeclarations": [{
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}]}]


def config_yaml(fake, key: str = PROVIDER_KEY) -> str:
    return f"""
model_list:
  - model_name: gemini-fake
    litellm_params:
      model: gemini/gemini-2.0-flash
      api_base: {fake.base}
      api_key: {key}
  - model_name: gemini-embed
    litellm_params:
      model: gemini/text-embedding-004
      api_base: {fake.base}
      api_key: {key}
  - model_name: gemini-missing
    litellm_params:
      model: gemini/no-such-model
      api_base: {fake.base}
      api_key: {key}
router_settings:  # these tests check how one upstream error is answered
  num_retries: 0
"""


@pytest.fixture
async def gw(gateway, fake_gemini):
    return await gateway(config_yaml(fake_gemini))


def assert_gemini_auth(sent) -> None:
    """The key went in x-goog-api-key, nowhere else; the client's key never went upstream."""
    assert sent.headers["x-goog-api-key"] == PROVIDER_KEY
    assert "authorization" not in sent.headers
    assert PROVIDER_KEY not in sent.path + sent.query
    assert MASTER_KEY not in orjson.dumps(sent.headers).decode()


# --- chat -----------------------------------------------------------------------------------------

async def test_chat(client, fake_gemini):
    reply = await client.chat.completions.create(model="gemini-fake", messages=USER, temperature=0.2,
                                                 max_tokens=50, stop=["END"], seed=7, top_p=0.9)
    assert reply.choices[0].message.content == "echo: hello big world"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.object == "chat.completion" and reply.model == "gemini-2.0-flash"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (5, 4, 9)
    sent = fake_gemini.received[-1]
    assert sent.path == "/v1beta/models/gemini-2.0-flash:generateContent" and sent.query == ""
    assert sent.body == {
        "contents": [{"role": "user", "parts": [{"text": "hello big world"}]}],
        "systemInstruction": {"parts": [{"text": "be brief"}]},
        "generationConfig": {"temperature": 0.2, "topP": 0.9, "seed": 7, "maxOutputTokens": 50,
                             "stopSequences": ["END"]}}
    assert_gemini_auth(sent)


async def test_chat_stream_with_usage(client, fake_gemini):
    stream = await client.chat.completions.create(model="gemini-fake", messages=USER, stream=True,
                                                  stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: hello big world"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 9
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1
    sent = fake_gemini.received[-1]
    assert sent.path == "/v1beta/models/gemini-2.0-flash:streamGenerateContent" and sent.query == "alt=sse"
    assert "stream" not in sent.body and "stream_options" not in sent.body
    assert_gemini_auth(sent)
    assert fake_gemini.streams_finished == 1


async def test_chat_stream_without_usage(gw, fetch, fake_gemini):
    r = await fetch(gw, "/v1/chat/completions", {"model": "gemini-fake", "messages": USER, "stream": True})
    assert r.code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    assert r.body.endswith(b"data: [DONE]\n\n") and r.body.count(b"[DONE]") == 1
    events = [orjson.loads(line[6:]) for line in r.body.split(b"\n\n") if line.startswith(b"data: {")]
    assert all(e["choices"] and "usage" not in e for e in events)
    assert all(e["object"] == "chat.completion.chunk" for e in events)


async def test_tools_round_trip(client, fake_gemini):
    reply = await client.chat.completions.create(model="gemini-fake", messages=WEATHER, tools=[WEATHER_TOOL],
                                                 tool_choice="auto")
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and orjson.loads(call.function.arguments) == {"location": "Paris"}
    sent = fake_gemini.received[-1].body
    assert sent["tools"] == GEMINI_TOOLS  # additionalProperties left out: Gemini refuses it
    assert sent["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}

    follow = WEATHER + [choice.message.model_dump(exclude_none=True),
                        {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    reply = await client.chat.completions.create(model="gemini-fake", messages=follow, tools=[WEATHER_TOOL])
    assert reply.choices[0].message.content == "echo: sunny"
    assert fake_gemini.received[-1].body["contents"] == [
        {"role": "user", "parts": [{"text": "What is the weather in Paris?"}]},
        {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"location": "Paris"}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"content": "sunny"}}}]},
    ]


async def test_tools_forced_and_streamed(client, fake_gemini):
    stream = await client.chat.completions.create(
        model="gemini-fake", messages=WEATHER, tools=[WEATHER_TOOL], stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls, finish = [], None
    async for chunk in stream:
        for choice in chunk.choices:
            calls += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and len(calls) == 1
    assert calls[0].index == 0 and calls[0].id and calls[0].function.name == "get_weather"
    assert orjson.loads(calls[0].function.arguments) == {"location": "Paris"}
    assert fake_gemini.received[-1].body["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}}


async def test_json_mode_and_length_limit(client, fake_gemini):
    reply = await client.chat.completions.create(model="gemini-fake", messages=USER,
                                                 response_format={"type": "json_object"})
    assert orjson.loads(reply.choices[0].message.content) == {"echo": "echo: hello big world"}
    assert fake_gemini.received[-1].body["generationConfig"] == {"responseMimeType": "application/json"}
    reply = await client.chat.completions.create(model="gemini-fake", messages=USER, max_completion_tokens=2)
    assert reply.choices[0].message.content == "echo: hello "
    assert reply.choices[0].finish_reason == "length"


async def test_n_candidates(client, fake_gemini):
    reply = await client.chat.completions.create(model="gemini-fake", messages=USER, n=2)
    assert [c.index for c in reply.choices] == [0, 1]
    assert {c.message.content for c in reply.choices} == {"echo: hello big world"}
    assert fake_gemini.received[-1].body["generationConfig"] == {"candidateCount": 2}


async def test_safety_finish_is_content_filter(client, fake_gemini):
    fake_gemini.finish_reason = "SAFETY"
    reply = await client.chat.completions.create(model="gemini-fake", messages=USER)
    assert reply.choices[0].finish_reason == "content_filter"


async def test_legacy_completion(client, fake_gemini):
    reply = await client.completions.create(model="gemini-fake", prompt="say this")
    assert reply.object == "text_completion" and reply.choices[0].text == "echo: say this"
    assert fake_gemini.received[-1].body == {"contents": [{"role": "user", "parts": [{"text": "say this"}]}]}
    stream = await client.completions.create(model="gemini-fake", prompt="say this", stream=True)
    assert "".join([c.choices[0].text async for c in stream if c.choices]) == "echo: say this"


# --- embeddings -----------------------------------------------------------------------------------

async def test_embeddings_single_and_batch(client, fake_gemini):
    one = await client.embeddings.create(model="gemini-embed", input="one", encoding_format="float")
    assert one.data[0].embedding == pytest.approx(embedding("one", 8), abs=1e-6)
    sent = fake_gemini.received[-1]
    assert sent.path == "/v1beta/models/text-embedding-004:embedContent"
    assert sent.body == {"content": {"parts": [{"text": "one"}]}}
    assert_gemini_auth(sent)

    many = await client.embeddings.create(model="gemini-embed", input=["one", "two words"], dimensions=4)
    assert [d.index for d in many.data] == [0, 1]
    assert many.data[1].embedding == pytest.approx(embedding("two words", 4), abs=1e-6)
    sent = fake_gemini.received[-1]
    assert sent.path == "/v1beta/models/text-embedding-004:batchEmbedContents"
    assert sent.body == {"requests": [
        {"model": "models/text-embedding-004", "content": {"parts": [{"text": "one"}]}, "outputDimensionality": 4},
        {"model": "models/text-embedding-004", "content": {"parts": [{"text": "two words"}]},
         "outputDimensionality": 4}]}


# --- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
async def test_rate_limit_is_429_with_retry_after(gw, fetch, fake_gemini, stream):
    fake_gemini.fail_times, fake_gemini.fail_status, fake_gemini.retry_delay = 1, 429, "36.5s"
    r = await fetch(gw, "/v1/chat/completions", {"model": "gemini-fake", "messages": USER, "stream": stream})
    err = error_of(r)
    assert r.code == 429 and err["type"] == "rate_limit_error"
    assert r.headers["retry-after"] == "37"
    assert "You exceeded your current quota" in err["message"] and "gemini-2.0-flash" in err["message"]


@pytest.mark.parametrize("status,type_", [(500, "api_error"), (503, "service_unavailable"),
                                          (400, "invalid_request_error"), (403, "permission_denied")])
async def test_statuses_are_kept(gw, fetch, fake_gemini, status, type_):
    fake_gemini.fail_times, fake_gemini.fail_status = 1, status
    r = await fetch(gw, "/v1/chat/completions", {"model": "gemini-fake", "messages": USER})
    assert r.code == status and error_of(r)["type"] == type_


async def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="gemini-missing", messages=USER)
    assert "models/no-such-model is not found" in info.value.message


async def test_bad_key_is_401_and_never_echoed(gateway, fetch, fake_gemini, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "AIza-wrong-key-0000000000"
    gw = await gateway(config_yaml(fake_gemini, key=wrong))
    for stream in (False, True):
        r = await fetch(gw, "/v1/chat/completions", {"model": "gemini-fake", "messages": USER, "stream": stream})
        err = error_of(r)
        assert r.code == 401 and err["type"] == "authentication_error"
        assert "API key not valid" in err["message"]
        assert wrong not in r.body.decode()
    assert fake_gemini.received[-1].headers["x-goog-api-key"] == wrong
    for secret in (wrong, MASTER_KEY):
        assert secret not in caplog.text


async def test_empty_conversation_is_400_before_gemini(client, fake_gemini):
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="gemini-fake", messages=[{"role": "system", "content": "x"}])
    assert "at least one user or assistant message" in info.value.message
    assert fake_gemini.received == []
