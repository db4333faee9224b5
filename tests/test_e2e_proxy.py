"""End to end, non-streaming: the official openai SDK (and AzureOpenAI) through the gateway to
the fake OpenAI-compatible provider and to the built-in ``mock/`` provider; parameter
pass-through, the OpenRouter example, response headers, /models, /model/info, /metrics and
readiness."""

import base64
import struct
import uuid

import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from contrib.fake_providers.openai_compat import embedding as fake_embedding
from tornado_proxy.providers.mock import EMBEDDING_DIMENSIONS, MockProvider

from .conftest import MASTER_KEY, PROVIDER_KEY

USER = [{"role": "user", "content": "hello big world"}]
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}
MODEL_NAMES = ["gpt-fake", "embed-fake", "instruct-fake", "demo"]


def config_yaml(fake, extra: str = "") -> str:
    return f"""
model_list:
  - model_name: gpt-fake
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: {fake.base}
      api_key: {PROVIDER_KEY}
    model_info:
      id: dep-gpt-fake
  - model_name: embed-fake
    litellm_params:
      model: openai/text-embedding-3-small
      api_base: {fake.base}
      api_key: {PROVIDER_KEY}
  - model_name: instruct-fake
    litellm_params:
      model: openai/gpt-3.5-turbo-instruct
      api_base: {fake.base}
      api_key: {PROVIDER_KEY}
  - model_name: demo
    litellm_params:
      model: mock/demo
{extra}
"""


@pytest.fixture
async def gw(gateway, fake_openai):
    return await gateway(config_yaml(fake_openai))


def assert_no_client_key_upstream(fake):
    for r in fake.received:
        assert r.headers.get("authorization") == f"Bearer {PROVIDER_KEY}"
        assert MASTER_KEY not in orjson.dumps(r.headers).decode()


# --- chat ----------------------------------------------------------------------------------

async def test_sdk_chat_through_fake(client, fake_openai):
    reply = await client.chat.completions.create(model="gpt-fake", messages=USER)
    assert reply.choices[0].message.content == "echo: hello big world"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.model == "gpt-4o-mini"  # the provider's answer passes through as-is
    assert reply.usage.prompt_tokens == 3 and reply.usage.completion_tokens == 4
    assert len(fake_openai.received) == 1
    sent = fake_openai.received[0]
    assert sent.path == "/v1/chat/completions"
    assert sent.body == {"model": "gpt-4o-mini", "messages": USER}
    assert_no_client_key_upstream(fake_openai)


async def test_sdk_chat_with_mock_provider(client, fake_openai):
    reply = await client.chat.completions.create(model="demo", messages=USER)
    assert reply.choices[0].message.content == "hello big world"
    assert reply.usage.completion_tokens == 3
    again = await client.chat.completions.create(model="demo", messages=USER)
    assert again.choices[0].message.content == reply.choices[0].message.content
    assert fake_openai.received == []


async def test_mock_response_field_never_reaches_the_provider(client, fake_openai):
    reply = await client.chat.completions.create(model="gpt-fake", messages=USER, extra_body={"mock_response": "hi"})
    assert reply.choices[0].message.content == "hi"
    reply = await client.chat.completions.create(model="demo", messages=USER, extra_body={"mock_response": "hi"})
    assert reply.choices[0].message.content == "hi"
    assert fake_openai.received == []


async def test_mock_response_error_name(client, fake_openai):
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(model="gpt-fake", messages=USER,
                                             extra_body={"mock_response": "litellm.RateLimitError"})
    assert info.value.status_code == 429
    assert fake_openai.received == []


async def test_tools_pass_through(client, fake_openai):
    reply = await client.chat.completions.create(model="gpt-fake", messages=WEATHER, tools=[WEATHER_TOOL],
                                                 tool_choice="auto")
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert orjson.loads(call.function.arguments) == {"location": "Paris"}
    sent = fake_openai.received[-1].body
    assert sent["tools"] == [WEATHER_TOOL] and sent["tool_choice"] == "auto"
    # the tool result goes back the same way
    follow = WEATHER + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                        {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    reply = await client.chat.completions.create(model="gpt-fake", messages=follow, tools=[WEATHER_TOOL])
    assert fake_openai.received[-1].body["messages"][-1] == {"role": "tool", "tool_call_id": call.id,
                                                             "content": "sunny"}
    assert reply.choices[0].message.tool_calls[0].function.name == "get_weather"


async def test_mock_provider_accepts_tools(client):
    reply = await client.chat.completions.create(model="demo", messages=WEATHER, tools=[WEATHER_TOOL],
                                                 tool_choice="auto")
    assert reply.choices[0].message.content == WEATHER[0]["content"]  # the mock echoes; no tool calls


async def test_every_parameter_passes_through_untouched(gw, fetch, fake_openai):
    body = {"model": "gpt-fake", "messages": USER, "temperature": 0.25, "top_p": 0.5, "max_tokens": 33,
            "tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
            "seed": 1234, "stop": ["\n\n", "END"], "n": 2, "logprobs": True, "top_logprobs": 3,
            "user": "user-42", "stream_options": {"include_usage": True}, "presence_penalty": 0.1,
            "frequency_penalty": 0.2, "logit_bias": {"50256": -100}, "parallel_tool_calls": False,
            "metadata": {"k": "v"}, "service_tier": "auto", "a_param_from_the_future": [1, {"x": None}]}
    r = await fetch(gw, "/v1/chat/completions", body)
    assert r.code == 200, r.body
    assert len(orjson.loads(r.body)["choices"]) == 2
    sent = fake_openai.received[-1]
    assert sent.body == {**body, "model": "gpt-4o-mini"}
    assert_no_client_key_upstream(fake_openai)


@pytest.mark.parametrize("header", [{"x-api-key": MASTER_KEY}, {"api-key": MASTER_KEY},
                                    {"x-litellm-api-key": f"Bearer {MASTER_KEY}"}])
async def test_other_client_auth_headers_never_go_upstream(gw, fetch, fake_openai, header):
    r = await fetch(gw, "/chat/completions", {"model": "gpt-fake", "messages": USER}, key=None, headers=header)
    assert r.code == 200, r.body
    sent = fake_openai.received[-1]
    assert sent.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert MASTER_KEY not in orjson.dumps(sent.headers).decode()
    assert "x-api-key" not in sent.headers and "api-key" not in sent.headers
    assert "x-litellm-api-key" not in sent.headers


# --- embeddings -------------------------------------------------------------------------------

async def test_sdk_embeddings_default_base64(client, fake_openai):
    reply = await client.embeddings.create(model="embed-fake", input=["one", "two words"])
    assert [d.index for d in reply.data] == [0, 1]
    assert reply.data[0].embedding == pytest.approx(fake_embedding("one"), abs=1e-6)
    assert reply.data[1].embedding == pytest.approx(fake_embedding("two words"), abs=1e-6)
    sent = fake_openai.received[-1]
    assert sent.path == "/v1/embeddings"
    assert sent.body["encoding_format"] == "base64"  # what the SDK asks for by default
    assert sent.body["model"] == "text-embedding-3-small"
    assert reply.usage.prompt_tokens == 3


async def test_sdk_embeddings_float(client, fake_openai):
    reply = await client.embeddings.create(model="embed-fake", input="one", encoding_format="float")
    assert reply.data[0].embedding == fake_embedding("one")
    assert fake_openai.received[-1].body == {"model": "text-embedding-3-small", "input": "one",
                                             "encoding_format": "float"}


async def test_sdk_embeddings_with_mock_provider(client, fake_openai):
    expected = MockProvider.vector("one", EMBEDDING_DIMENSIONS)
    as_b64 = await client.embeddings.create(model="demo", input="one")
    as_float = await client.embeddings.create(model="demo", input="one", encoding_format="float")
    assert as_float.data[0].embedding == pytest.approx(expected, abs=1e-6)
    assert as_b64.data[0].embedding == pytest.approx(expected, abs=1e-6)
    assert fake_openai.received == []


async def test_raw_base64_embedding_decodes(gw, fetch, fake_openai):
    r = await fetch(gw, "/embeddings", {"model": "embed-fake", "input": "one", "encoding_format": "base64"})
    raw = base64.b64decode(orjson.loads(r.body)["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == fake_embedding("one")


# --- legacy completions ----------------------------------------------------------------------

async def test_sdk_legacy_completion(client, fake_openai):
    reply = await client.completions.create(model="instruct-fake", prompt="say this", max_tokens=5)
    assert reply.choices[0].text == "echo: say this"
    assert fake_openai.received[-1].path == "/v1/completions"
    assert fake_openai.received[-1].body == {"model": "gpt-3.5-turbo-instruct", "prompt": "say this",
                                             "max_tokens": 5}


async def test_sdk_legacy_completion_mock(client, fake_openai):
    reply = await client.completions.create(model="demo", prompt="say this")
    assert reply.choices[0].text == "say this"
    assert fake_openai.received == []


# --- models ----------------------------------------------------------------------------------

async def test_sdk_models_list_and_retrieve(client):
    listed = [m.id async for m in client.models.list()]
    assert listed == MODEL_NAMES
    model = await client.models.retrieve("embed-fake")
    assert model.id == "embed-fake" and model.object == "model"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("no-such-model")


async def test_unknown_model_via_sdk(client, fake_openai):
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="gpt-nope", messages=USER)
    assert "gpt-nope" in info.value.message
    assert fake_openai.received == []


# --- Azure -----------------------------------------------------------------------------------

async def test_azure_sdk_chat_and_embeddings(gw, fake_openai):
    async with openai.AsyncAzureOpenAI(azure_endpoint=gw.url, api_key=MASTER_KEY, api_version="2024-06-01",
                                       max_retries=0) as azure:
        reply = await azure.chat.completions.create(model="gpt-fake", messages=USER, temperature=0)
        assert reply.choices[0].message.content == "echo: hello big world"
        sent = fake_openai.received[-1]
        assert sent.path == "/v1/chat/completions" and sent.query == ""
        assert sent.body == {"model": "gpt-4o-mini", "messages": USER, "temperature": 0}
        assert "api-key" not in sent.headers
        assert_no_client_key_upstream(fake_openai)

        emb = await azure.embeddings.create(model="embed-fake", input="one")
        assert emb.data[0].embedding == pytest.approx(fake_embedding("one"), abs=1e-6)
        assert fake_openai.received[-1].path == "/v1/embeddings"
        assert fake_openai.received[-1].body["model"] == "text-embedding-3-small"

        mock = await azure.chat.completions.create(model="demo", messages=USER)
        assert mock.choices[0].message.content == "hello big world"


async def test_azure_path_model_overrides_body(gw, fetch, fake_openai):
    r = await fetch(gw, "/openai/deployments/gpt-fake/chat/completions?api-version=2024-06-01",
                    {"model": "something-else", "messages": USER}, key=None, headers={"api-key": MASTER_KEY})
    assert r.code == 200, r.body
    assert r.headers["x-litellm-model-group"] == "gpt-fake"
    assert fake_openai.received[-1].body["model"] == "gpt-4o-mini"


# --- OpenRouter --------------------------------------------------------------------------------

def openrouter_yaml(fake) -> str:
    return f"""
model_list:
  - model_name: gpt-3.5-turbo
    litellm_params:
      model: openrouter/openai/gpt-3.5-turbo
      api_base: http://127.0.0.1:{fake.port}/api/v1
      api_key: os.environ/OPENROUTER_API_KEY
"""


async def test_openrouter_example(gateway, fake_openai):
    env = {"OPENROUTER_API_KEY": PROVIDER_KEY, "OR_SITE_URL": "https://example.test/app",
           "OR_APP_NAME": "Example App"}
    gw = await gateway(openrouter_yaml(fake_openai), env=env)
    async with openai.AsyncOpenAI(base_url=gw.url, api_key=MASTER_KEY, max_retries=0) as client:
        reply = await client.chat.completions.create(model="gpt-3.5-turbo", messages=USER)
    assert reply.choices[0].message.content == "echo: hello big world"
    sent = fake_openai.received[-1]
    assert sent.path == "/api/v1/chat/completions"
    assert sent.body["model"] == "openai/gpt-3.5-turbo"
    assert sent.headers["http-referer"] == "https://example.test/app"
    assert sent.headers["x-title"] == "Example App"
    assert sent.headers["authorization"] == f"Bearer {PROVIDER_KEY}"


async def test_openrouter_default_attribution_headers(gateway, fake_openai):
    gw = await gateway(openrouter_yaml(fake_openai), env={"OPENROUTER_API_KEY": PROVIDER_KEY})
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=MASTER_KEY, max_retries=0) as client:
        await client.chat.completions.create(model="gpt-3.5-turbo", messages=USER)
    sent = fake_openai.received[-1]
    assert sent.headers["http-referer"] == "https://litellm.ai" and sent.headers["x-title"] == "liteLLM"


# --- response headers --------------------------------------------------------------------------

def duration_headers(r) -> tuple[float, float]:
    total = float(r.headers["x-litellm-response-duration-ms"])
    overhead = float(r.headers["x-litellm-overhead-duration-ms"])
    return total, overhead


async def test_response_headers(gw, fetch, fake_openai):
    first = await fetch(gw, "/v1/chat/completions", {"model": "gpt-fake", "messages": USER})
    second = await fetch(gw, "/v1/chat/completions", {"model": "gpt-fake", "messages": USER})
    for r in (first, second):
        assert r.code == 200
        uuid.UUID(r.headers["x-litellm-call-id"])
        assert r.headers["x-litellm-model-id"] == "dep-gpt-fake"
        assert r.headers["x-litellm-model-group"] == "gpt-fake"
        assert r.headers["x-litellm-model-api-base"] == fake_openai.base
        total, overhead = duration_headers(r)
        assert 0 <= overhead <= total
    assert first.headers["x-litellm-call-id"] != second.headers["x-litellm-call-id"]


async def test_response_headers_on_mock_and_embeddings(gw, fetch):
    r = await fetch(gw, "/v1/chat/completions", {"model": "demo", "messages": USER})
    assert r.headers["x-litellm-model-group"] == "demo"
    assert r.headers["x-litellm-model-id"]
    duration_headers(r)
    e = await fetch(gw, "/v1/embeddings", {"model": "embed-fake", "input": "x"})
    assert e.headers["x-litellm-model-group"] == "embed-fake"
    uuid.UUID(e.headers["x-litellm-call-id"])
    duration_headers(e)


async def test_derived_model_id_is_stable_and_listed(gateway, fetch, fake_openai):
    yaml = config_yaml(fake_openai)
    one, two = await gateway(yaml), await gateway(yaml)
    ids = []
    for gw in (one, two):
        r = await fetch(gw, "/v1/embeddings", {"model": "embed-fake", "input": "x"})
        ids.append(r.headers["x-litellm-model-id"])
    assert ids[0] == ids[1] and ids[0] and ids[0] != "dep-gpt-fake"
    info = orjson.loads((await fetch(one, "/model/info")).body)["data"]
    by_name = {d["model_name"]: d["model_info"]["id"] for d in info}
    assert by_name["embed-fake"] == ids[0]
    assert by_name["gpt-fake"] == "dep-gpt-fake"
    assert len(set(by_name.values())) == len(by_name)


async def test_derived_id_changes_with_the_config(gateway, fetch, fake_openai):
    a = await gateway(config_yaml(fake_openai))
    b = await gateway(config_yaml(fake_openai).replace("gpt-3.5-turbo-instruct", "davinci-002"))
    ids = []
    for gw in (a, b):
        r = await fetch(gw, "/v1/completions", {"model": "instruct-fake", "prompt": "x"})
        ids.append(r.headers["x-litellm-model-id"])
    assert ids[0] != ids[1]


# --- admin: /model/info, readiness, metrics ------------------------------------------------------

async def test_model_info_lists_deployments_without_secrets(gw, fetch, fake_openai):
    r = await fetch(gw, "/model/info")
    assert r.code == 200
    text = r.body.decode()
    assert PROVIDER_KEY not in text and MASTER_KEY not in text
    assert "api_key" not in text
    data = orjson.loads(r.body)["data"]
    assert [d["model_name"] for d in data] == MODEL_NAMES
    assert data[0]["litellm_params"]["model"] == "openai/gpt-4o-mini"
    assert data[0]["litellm_params"]["api_base"] == fake_openai.base
    assert data[0]["model_info"]["id"] == "dep-gpt-fake"
    one = orjson.loads((await fetch(gw, "/v1/model/info?litellm_model_id=dep-gpt-fake")).body)["data"]
    assert [d["model_name"] for d in one] == ["gpt-fake"]


async def test_model_info_hides_env_keys_too(gateway, fetch, fake_openai):
    gw = await gateway(openrouter_yaml(fake_openai), env={"OPENROUTER_API_KEY": PROVIDER_KEY})
    text = (await fetch(gw, "/model/info")).body.decode()
    assert PROVIDER_KEY not in text and "api_key" not in text and "OPENROUTER_API_KEY" not in text


async def test_readiness(gw, fetch):
    r = await fetch(gw, "/health/readiness", key=None)
    assert r.code == 200
    body = orjson.loads(r.body)
    assert body["status"] == "healthy"
    assert isinstance(body["config_generation"], int) and body["config_generation"] >= 1
    live = await fetch(gw, "/health/liveliness", key=None)
    assert orjson.loads(live.body) == "I'm alive!"


def metric_samples(text: str) -> dict:
    """{(sample name, frozenset(labels)): value}"""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def sample(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_after_traffic(gw, fetch, client):
    tokens_in = tokens_out = 0
    for _ in range(3):
        reply = await client.chat.completions.create(model="gpt-fake", messages=USER)
        tokens_in += reply.usage.prompt_tokens
        tokens_out += reply.usage.completion_tokens
    mock = await client.chat.completions.create(model="demo", messages=USER)
    await fetch(gw, "/v1/chat/completions", {"model": "gpt-nope", "messages": USER})
    await fetch(gw, "/v1/chat/completions", {"model": "gpt-fake", "messages": USER}, key="sk-wrong")

    r = await fetch(gw, "/metrics", key=None)
    assert r.code == 200
    assert r.headers["Content-Type"].startswith("text/plain")
    s = metric_samples(r.body.decode())
    route = "/chat/completions"
    assert sample(s, "litellm_proxy_total_requests_metric_total", route=route, model="gpt-fake", status="200") == 3
    assert sample(s, "litellm_proxy_total_requests_metric_total", route=route, model="demo", status="200") == 1
    # an unknown model is counted without its name: clients cannot mint label values
    assert sample(s, "litellm_proxy_total_requests_metric_total", route=route, model="gpt-nope", status="400") == 0
    assert sample(s, "litellm_proxy_total_requests_metric_total", route=route, model="", status="400") == 1
    assert sample(s, "litellm_proxy_total_requests_metric_total", route=route, model="", status="401") == 1
    assert sample(s, "litellm_request_total_latency_metric_count", route=route, model="gpt-fake") == 3
    assert sample(s, "litellm_request_total_latency_metric_bucket", route=route, model="gpt-fake", le="+Inf") == 3
    assert sample(s, "litellm_llm_api_latency_metric_count", model="gpt-fake", provider="openai") == 3
    assert sample(s, "litellm_llm_api_latency_metric_count", model="demo", provider="mock") == 0
    assert sample(s, "litellm_input_tokens_total", model="gpt-fake") == tokens_in
    assert sample(s, "litellm_output_tokens_total", model="gpt-fake") == tokens_out
    assert sample(s, "litellm_output_tokens_total", model="demo") == mock.usage.completion_tokens
    assert sample(s, "litellm_in_flight_requests") == 1  # this /metrics request itself


async def test_made_up_model_names_do_not_create_metric_series(gw, fetch):
    for i in range(50):
        r = await fetch(gw, "/v1/chat/completions", {"model": f"no-such-model-{i}", "messages": USER})
        assert r.code == 400
    text = (await fetch(gw, "/metrics", key=None)).body.decode()
    assert "no-such-model" not in text


async def test_metrics_route_label_is_the_canonical_path(gw, fetch):
    await fetch(gw, "/v1/embeddings", {"model": "embed-fake", "input": "x"})
    await fetch(gw, "/embeddings", {"model": "embed-fake", "input": "x"})
    await fetch(gw, "/openai/deployments/embed-fake/embeddings", {"input": "x"})
    text = (await fetch(gw, "/metrics", key=None)).body.decode()
    s = metric_samples(text)
    assert sample(s, "litellm_proxy_total_requests_metric_total", route="/embeddings", model="embed-fake",
                  status="200") == 3
    assert not any("/v1/" in dict(labels).get("route", "") for _, labels in s)
    assert PROVIDER_KEY not in text and MASTER_KEY not in text
