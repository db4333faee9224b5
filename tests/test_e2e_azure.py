"""End to end, the outbound ``azure/<deployment>`` provider: the official openai SDK through the
gateway to the fake Azure OpenAI paths (``/openai/deployments/<name>/...?api-version=...``,
``api-key``), plain, streaming, tools, embeddings, legacy completions, and Azure's errors."""

import orjson
import pytest

from contrib.fake_providers.openai_compat import embedding as fake_embedding

from .conftest import MASTER_KEY, PROVIDER_KEY, error_of

USER = [{"role": "user", "content": "hello big world"}]
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}}


def config_yaml(fake, extra: str = "") -> str:
    return f"""
model_list:
  - model_name: azure-gpt
    litellm_params:
      model: azure/my-gpt4o
      api_base: http://127.0.0.1:{fake.port}
      api_key: {PROVIDER_KEY}
      api_version: "2024-10-21"
  - model_name: azure-embed
    litellm_params:
      model: azure/my-embedding
      api_base: os.environ/AZURE_API_BASE
  - model_name: azure-instruct
    litellm_params:
      model: azure/my-instruct
{extra}
router_settings:  # these tests check how one upstream error is answered
  num_retries: 0
"""


@pytest.fixture
async def gw(gateway, fake_openai):
    env = {"AZURE_API_BASE": f"http://127.0.0.1:{fake_openai.port}/", "AZURE_API_KEY": PROVIDER_KEY,
           "AZURE_API_VERSION": "2025-04-01-preview"}
    return await gateway(config_yaml(fake_openai), env=env)


def assert_azure_auth(sent) -> None:
    assert sent.headers["api-key"] == PROVIDER_KEY
    assert "authorization" not in sent.headers
    assert MASTER_KEY not in orjson.dumps(sent.headers).decode()


async def test_chat(client, fake_openai):
    reply = await client.chat.completions.create(model="azure-gpt", messages=USER, temperature=0, max_tokens=9)
    assert reply.choices[0].message.content == "echo: hello big world"
    assert reply.model == "my-gpt4o" and reply.usage.total_tokens == 7
    sent = fake_openai.received[-1]
    assert sent.path == "/openai/deployments/my-gpt4o/chat/completions"
    assert sent.query == "api-version=2024-10-21"
    assert sent.body == {"model": "my-gpt4o", "messages": USER, "temperature": 0, "max_tokens": 9}
    assert_azure_auth(sent)


async def test_stream_drops_the_prompt_filter_chunk(client, fake_openai):
    stream = await client.chat.completions.create(model="azure-gpt", messages=USER, stream=True,
                                                  stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert all(c.choices for c in chunks[:-1])  # Azure's choice-less first chunk is not relayed
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == "echo: hello big world"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 7
    sent = fake_openai.received[-1]
    assert sent.path == "/openai/deployments/my-gpt4o/chat/completions" and sent.body["stream"] is True
    assert_azure_auth(sent)


async def test_tools(client, fake_openai):
    reply = await client.chat.completions.create(model="azure-gpt", messages=WEATHER, tools=[WEATHER_TOOL],
                                                 tool_choice="required", parallel_tool_calls=True)
    call = reply.choices[0].message.tool_calls[0]
    assert reply.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    sent = fake_openai.received[-1].body
    assert sent["tools"] == [WEATHER_TOOL] and sent["tool_choice"] == "required"
    assert sent["parallel_tool_calls"] is True


async def test_embeddings_and_completions_use_env_defaults(client, fake_openai):
    emb = await client.embeddings.create(model="azure-embed", input="one")
    assert emb.data[0].embedding == pytest.approx(fake_embedding("one"), abs=1e-6)
    sent = fake_openai.received[-1]
    assert sent.path == "/openai/deployments/my-embedding/embeddings"
    assert sent.query == "api-version=2025-04-01-preview"  # AZURE_API_VERSION
    assert_azure_auth(sent)  # AZURE_API_KEY
    reply = await client.completions.create(model="azure-instruct", prompt="say this")
    assert reply.choices[0].text == "echo: say this"
    assert fake_openai.received[-1].path == "/openai/deployments/my-instruct/completions"


async def test_azure_errors(gw, fetch, fake_openai):
    fake_openai.fail_times, fake_openai.fail_status = 1, 429
    r = await fetch(gw, "/v1/chat/completions", {"model": "azure-gpt", "messages": USER})
    err = error_of(r)
    assert r.code == 429 and err["type"] == "rate_limit_error" and r.headers["retry-after"] == "1"
    assert err["message"].startswith("AzureException - azure/my-gpt4o: Requests to the ChatCompletions_Create")


async def test_wrong_key_is_401(gateway, fetch, fake_openai):
    gw = await gateway(config_yaml(fake_openai), env={"AZURE_API_BASE": fake_openai.base[:-3],
                                                      "AZURE_API_KEY": "wrong-azure-key-123"})
    r = await fetch(gw, "/v1/embeddings", {"model": "azure-embed", "input": "x"})
    err = error_of(r)
    assert r.code == 401 and err["type"] == "authentication_error"
    assert "Access denied due to invalid subscription key" in err["message"]
    assert "wrong-azure-key-123" not in r.body.decode()


async def test_without_api_base_is_a_startup_warning_and_400(gateway, fetch, fake_openai, caplog):
    gw = await gateway(config_yaml(fake_openai))  # azure-embed and azure-instruct have no base now
    assert "Provider 'azure' needs an api_base for model 'azure/my-instruct'" in caplog.text
    r = await fetch(gw, "/v1/completions", {"model": "azure-instruct", "prompt": "x"})
    err = error_of(r)
    assert r.code == 400 and err["param"] == "model" and "needs an api_base" in err["message"]
    assert fake_openai.received == []
