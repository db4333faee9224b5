"""End to end through the gateway to the fake Ollama server with the official openai SDK:
``ollama_chat/`` (``/api/chat``: plain, NDJSON streaming, tools), ``ollama/`` (``/api/generate``
with a prompt built from the messages; legacy completions), embeddings (``/api/embed``) and
Ollama's ``{"error": ...}`` replies mapped to OpenAI's errors."""

import openai
import orjson
import pytest

from contrib.fake_providers.ollama import embedding

from .conftest import MASTER_KEY, error_of

USER = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello big world"}]
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}
PIXEL = "iVBORw0KGgo="


def config_yaml(fake) -> str:
    return f"""
model_list:
  - model_name: llama-chat
    litellm_params:
      model: ollama_chat/llama3.2
      api_base: {fake.base}
  - model_name: llama-gen
    litellm_params:
      model: ollama/llama3.2
      api_base: {fake.base}
  - model_name: llama-embed
    litellm_params:
      model: ollama/nomic-embed-text
      api_base: {fake.base}
  - model_name: llama-missing
    litellm_params:
      model: ollama_chat/not-pulled
      api_base: {fake.base}
router_settings:  # these tests check how one upstream error is answered
  num_retries: 0
"""


@pytest.fixture
async def gw(gateway, fake_ollama):
    return await gateway(config_yaml(fake_ollama))


def assert_no_keys_upstream(sent) -> None:
    assert "authorization" not in sent.headers  # Ollama has no key unless one is configured
    assert MASTER_KEY not in orjson.dumps(sent.headers).decode()


# --- ollama_chat/ (/api/chat) ---------------------------------------------------------------------

async def test_chat(client, fake_ollama):
    reply = await client.chat.completions.create(model="llama-chat", messages=USER, temperature=0.1, top_p=0.5,
                                                 max_tokens=40, stop="END", seed=3,
                                                 response_format={"type": "json_object"})
    assert orjson.loads(reply.choices[0].message.content) == {"echo": "echo: hello big world"}
    assert reply.choices[0].finish_reason == "stop" and reply.model == "llama3.2"
    assert reply.usage.prompt_tokens == 5 and reply.usage.completion_tokens == 4
    sent = fake_ollama.received[-1]
    assert sent.path == "/api/chat"
    assert sent.body == {"model": "llama3.2", "stream": False, "format": "json", "messages": USER,
                         "options": {"temperature": 0.1, "top_p": 0.5, "seed": 3, "num_predict": 40,
                                     "stop": ["END"]}}
    assert_no_keys_upstream(sent)


async def test_chat_stream(client, fake_ollama):
    stream = await client.chat.completions.create(model="llama-chat", messages=USER, stream=True,
                                                  stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: hello big world"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (5, 4)
    assert len({c.id for c in chunks}) == 1
    assert fake_ollama.received[-1].body["stream"] is True
    assert fake_ollama.streams_finished == 1


async def test_chat_length_limit_stream(client, fake_ollama):
    stream = await client.chat.completions.create(model="llama-chat", messages=USER, stream=True,
                                                  max_completion_tokens=2)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: hello "
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage is None


async def test_tools_round_trip(client, fake_ollama):
    reply = await client.chat.completions.create(model="llama-chat", messages=WEATHER, tools=[WEATHER_TOOL],
                                                 tool_choice="auto")
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert orjson.loads(call.function.arguments) == {"location": "Paris"}
    sent = fake_ollama.received[-1].body
    assert sent["tools"] == [WEATHER_TOOL] and "tool_choice" not in sent

    follow = WEATHER + [choice.message.model_dump(exclude_none=True),
                        {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    reply = await client.chat.completions.create(model="llama-chat", messages=follow, tools=[WEATHER_TOOL])
    assert reply.choices[0].message.content == "echo: sunny"
    assert fake_ollama.received[-1].body["messages"][1:] == [
        {"role": "assistant", "content": "",
         "tool_calls": [{"function": {"name": "get_weather", "arguments": {"location": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"}]


async def test_tools_streamed(client, fake_ollama):
    stream = await client.chat.completions.create(model="llama-chat", messages=WEATHER, tools=[WEATHER_TOOL],
                                                  stream=True)
    calls, finish = [], None
    async for chunk in stream:
        for choice in chunk.choices:
            calls += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and len(calls) == 1
    assert calls[0].index == 0 and calls[0].function.name == "get_weather"
    assert orjson.loads(calls[0].function.arguments) == {"location": "Paris"}


async def test_images_go_as_base64(client, fake_ollama):
    content = [{"type": "text", "text": "what is this"},
               {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}}]
    await client.chat.completions.create(model="llama-chat", messages=[{"role": "user", "content": content}])
    assert fake_ollama.received[-1].body["messages"] == [{"role": "user", "content": "what is this",
                                                          "images": [PIXEL]}]
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="llama-chat", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.test/cat.png"}}]}])
    assert "data URL" in info.value.message and len(fake_ollama.received) == 1


# --- ollama/ (/api/generate) ----------------------------------------------------------------------

async def test_generate_from_messages(client, fake_ollama):
    reply = await client.chat.completions.create(model="llama-gen", messages=USER, max_tokens=10)
    assert reply.choices[0].message.content == "echo: hello big world"
    assert reply.usage.prompt_tokens == 9  # the prompt's words, headers included
    sent = fake_ollama.received[-1]
    assert sent.path == "/api/generate"
    assert sent.body == {"model": "llama3.2", "stream": False, "options": {"num_predict": 10},
                         "prompt": "### System:\nbe brief\n\n### User:\nhello big world\n\n"}


async def test_generate_stream(client, fake_ollama):
    stream = await client.chat.completions.create(model="llama-gen", messages=USER, stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: hello big world"
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_generate_refuses_tools(client, fake_ollama):
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="llama-gen", messages=WEATHER, tools=[WEATHER_TOOL])
    assert "ollama_chat/" in info.value.message and fake_ollama.received == []


async def test_legacy_completion(client, fake_ollama):
    reply = await client.completions.create(model="llama-gen", prompt="say this", max_tokens=5)
    assert reply.object == "text_completion" and reply.choices[0].text == "echo: say this"
    assert fake_ollama.received[-1].body == {"model": "llama3.2", "stream": False, "prompt": "say this",
                                             "options": {"num_predict": 5}}
    stream = await client.completions.create(model="llama-chat", prompt="say this", stream=True)
    assert "".join([c.choices[0].text async for c in stream if c.choices]) == "echo: say this"
    assert fake_ollama.received[-1].path == "/api/generate"


# --- embeddings -----------------------------------------------------------------------------------

async def test_embeddings(client, fake_ollama):
    reply = await client.embeddings.create(model="llama-embed", input=["one", "two words"])
    assert [d.index for d in reply.data] == [0, 1]
    assert reply.data[1].embedding == pytest.approx(embedding("two words", 8), abs=1e-6)
    assert reply.usage.prompt_tokens == 3
    sent = fake_ollama.received[-1]
    assert sent.path == "/api/embed" and sent.body == {"model": "nomic-embed-text", "input": ["one", "two words"]}


# --- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
async def test_model_not_pulled_is_404(gw, fetch, fake_ollama, stream):
    r = await fetch(gw, "/v1/chat/completions", {"model": "llama-missing", "messages": USER, "stream": stream})
    err = error_of(r)
    assert r.code == 404 and err["type"] == "not_found_error"
    assert 'model "not-pulled" not found, try pulling it first' in err["message"]
    assert "OllamaException - ollama_chat/not-pulled" in err["message"]


@pytest.mark.parametrize("status", [400, 500, 503])
async def test_statuses_are_kept(gw, fetch, fake_ollama, status):
    fake_ollama.fail_times, fake_ollama.fail_status = 1, status
    r = await fetch(gw, "/v1/chat/completions", {"model": "llama-chat", "messages": USER})
    assert r.code == status and error_of(r)["message"]


async def test_error_line_mid_stream_ends_the_stream_with_an_error(gw, fetch, fake_ollama):
    fake_ollama.error_mid_stream_after = 2
    r = await fetch(gw, "/v1/chat/completions", {"model": "llama-chat", "messages": USER, "stream": True})
    assert r.code == 200
    events = [line[6:] for line in r.body.split(b"\n\n") if line.startswith(b"data: ")]
    assert b"[DONE]" not in events
    err = orjson.loads(events[-1])["error"]
    assert "an error was encountered while running the model" in err["message"]
    assert "".join(orjson.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "echo: hello "


async def test_sdk_sees_mid_stream_error(client, fake_ollama):
    fake_ollama.error_mid_stream_after = 1
    stream = await client.chat.completions.create(model="llama-chat", messages=USER, stream=True)
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
