"""End to end: the official openai SDK against the gateway's ``POST /v1/responses`` and ``GET`` /
``DELETE /v1/responses/{id}``: passed through to ``openai/`` and ``azure/`` deployments (the fake
OpenAI's own Responses API), translated to chat for an OpenAI-compatible chat-only server,
Anthropic, Gemini, Ollama and ``mock/``; plain, streamed, function tools, conversations through
``previous_response_id``, stored in memory and in PostgreSQL."""

from __future__ import annotations

import orjson
import openai
import psycopg2
import psycopg2.extensions
import pytest

from tornado_proxy.db import Database
from tornado_proxy.errors import DatabaseUnavailable
from tornado_proxy.responsestore import ResponseStore, StoredResponse
from tornado_proxy.sse import SseParser

from .conftest import MASTER_KEY, PROVIDER_KEY, admin_sql, error_of, wait_for

WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"location": {"type": "string"}},
                               "required": ["location"]}}
TRANSLATED = ("compat", "claude", "gem", "llama", "demo")
TEXT_ORDER = ["response.created", "response.in_progress", "response.output_item.added",
              "response.content_part.added", "response.output_text.delta", "response.output_text.done",
              "response.content_part.done", "response.output_item.done", "response.completed"]


def config_yaml(openai_fake, compat_fake, anthropic_fake, gemini_fake, ollama_fake, dsn: str | None = None) -> str:
    database = f"""
general_settings:
  store_model_in_db: true
  database_url: "{dsn}"
""" if dsn else ""
    return f"""
model_list:
  - model_name: gpt-native
    litellm_params: {{model: openai/gpt-4o-mini, api_base: "{openai_fake.base}", api_key: {PROVIDER_KEY}}}
  - model_name: azure-native
    litellm_params: {{model: azure/my-resp, api_base: "http://127.0.0.1:{openai_fake.port}", api_key: {PROVIDER_KEY},
                      api_version: "2025-04-01-preview"}}
  - model_name: pair  # two deployments holding their own responses
    litellm_params: {{model: openai/gpt-4o-mini, api_base: "{openai_fake.base}", api_key: {PROVIDER_KEY}}}
    model_info: {{id: pair-a}}
  - model_name: pair
    litellm_params: {{model: openai/gpt-4o-mini, api_base: "{openai_fake.base}", api_key: {PROVIDER_KEY}}}
    model_info: {{id: pair-b}}
  - model_name: compat
    litellm_params: {{model: hosted_vllm/llama-3-8b, api_base: "{compat_fake.base}", api_key: {PROVIDER_KEY}}}
  - model_name: claude
    litellm_params: {{model: anthropic/claude-3-5-haiku-20241022, api_base: "{anthropic_fake.base}",
                      api_key: {PROVIDER_KEY}}}
  - model_name: gem
    litellm_params: {{model: gemini/gemini-2.0-flash, api_base: "{gemini_fake.base}", api_key: {PROVIDER_KEY}}}
  - model_name: llama
    litellm_params: {{model: ollama_chat/llama3.2, api_base: "{ollama_fake.base}"}}
  - model_name: demo
    litellm_params: {{model: mock/demo}}
router_settings:  # these tests check how one upstream error is answered
  num_retries: 0
{database}
"""


@pytest.fixture
def fakes(fake_openai, fake_openai_b, fake_anthropic, fake_gemini, fake_ollama):
    return {"gpt-native": fake_openai, "azure-native": fake_openai, "compat": fake_openai_b,
            "claude": fake_anthropic, "gem": fake_gemini, "llama": fake_ollama, "demo": None}


def yaml_for(fakes, dsn: str | None = None) -> str:
    return config_yaml(fakes["gpt-native"], fakes["compat"], fakes["claude"], fakes["gem"], fakes["llama"], dsn)


@pytest.fixture(params=["memory", "postgres"])
def storage(request):
    """Where the gateway keeps responses: this worker's memory, or PostgreSQL (database storage on)."""
    return request.getfixturevalue("pg_dsn") if request.param == "postgres" else None


@pytest.fixture
async def gw(gateway, fakes):
    return await gateway(yaml_for(fakes))


@pytest.fixture
async def client(gw):
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=MASTER_KEY, max_retries=0) as c:
        yield c


def events_of(body: bytes) -> list[tuple[str | None, dict]]:
    parser = SseParser()
    return [(e.event, orjson.loads(e.data)) for e in parser.feed(body) + parser.close()]


def order(events) -> list[str]:
    """Event names with runs of deltas collapsed."""
    out: list[str] = []
    for name, _ in events:
        if not out or out[-1] != name or not name.endswith(".delta"):
            out.append(name)
    return out


def check_stream(events) -> None:
    """Every event named by its type, numbered 0, 1, 2, ...; one response id throughout."""
    assert all(name == data["type"] for name, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    ids = {data["response"]["id"] for _, data in events if "response" in data}
    assert len(ids) == 1


def query(dsn: str, sql: str, args=()) -> list[tuple]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchall()


# --- pass-through: openai/ and azure/ ----------------------------------------------------------

async def test_passthrough_plain(client, fake_openai, fake_openai_b):
    reply = await client.responses.create(model="gpt-native", input="hello big world", instructions="be brief",
                                          metadata={"team": "a"}, extra_body={"truncation": "auto"})
    assert reply.output_text == "echo: hello big world"
    assert reply.object == "response" and reply.status == "completed" and reply.model == "gpt-4o-mini"
    assert (reply.usage.input_tokens, reply.usage.output_tokens, reply.usage.total_tokens) == (5, 4, 9)
    (sent,) = fake_openai.received
    assert sent.path == "/v1/responses"
    assert sent.body == {"model": "gpt-4o-mini", "input": "hello big world", "instructions": "be brief",
                         "metadata": {"team": "a"}, "truncation": "auto"}
    assert sent.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert fake_openai_b.received == []


async def test_passthrough_stream_relays_every_event(client, gw, fetch, fake_openai):
    async with client.responses.stream(model="gpt-native", input="hello big world") as stream:
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(deltas) == "echo: hello big world" == final.output_text
    assert final.usage.output_tokens == 4

    r = await fetch(gw, "/v1/responses", {"model": "gpt-native", "input": "hello big world", "stream": True})
    assert r.code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = events_of(r.body)
    check_stream(events)
    assert order(events) == TEXT_ORDER
    assert b"[DONE]" not in r.body
    assert fake_openai.received[-1].body == {"model": "gpt-4o-mini", "input": "hello big world", "stream": True}


async def test_passthrough_conversation_get_delete(client, gw, fetch, fake_openai):
    first = await client.responses.create(model="gpt-native", input="my name is Ann")
    second = await client.responses.create(model="gpt-native", input="who am I?", previous_response_id=first.id)
    assert second.output_text == "echo: who am I?"
    assert fake_openai.received[-1].body["previous_response_id"] == first.id  # the provider continues it
    with pytest.raises(openai.BadRequestError) as info:  # a chat-translated model cannot read OpenAI's copy
        await client.responses.create(model="compat", input="and?", previous_response_id=first.id)
    assert info.value.body["param"] == "previous_response_id"

    got = await client.responses.retrieve(first.id)
    assert got.id == first.id and got.output_text == "echo: my name is Ann"
    assert (fake_openai.received[-1].method, fake_openai.received[-1].path) == ("GET", f"/v1/responses/{first.id}")
    deleted = await client.responses.delete(first.id)
    assert deleted is None  # the SDK returns nothing for a 2xx delete
    assert (fake_openai.received[-1].method, fake_openai.received[-1].path) == ("DELETE",
                                                                                f"/v1/responses/{first.id}")
    assert first.id not in fake_openai.responses
    r = await fetch(gw, f"/v1/responses/{first.id}")
    assert r.code == 404 and error_of(r)["param"] == "response_id"


async def test_passthrough_follow_up_goes_to_the_deployment_holding_it(client):
    first = await client.responses.with_raw_response.create(model="pair", input="hi")
    held = first.headers["x-litellm-model-id"]
    previous = first.parse().id
    for _ in range(6):  # unpinned, a shuffle over two would pick the same one 6 times in 1 of 64
        r = await client.responses.with_raw_response.create(model="pair", input="again",
                                                            previous_response_id=previous)
        assert r.headers["x-litellm-model-id"] == held
    got = await client.responses.with_raw_response.retrieve(previous)
    assert got.headers["x-litellm-model-id"] == held


async def test_translated_conversation_continues_on_a_passthrough_model(client, fake_openai):
    first = await client.responses.create(model="compat", input="My name is Ann.")
    second = await client.responses.create(model="gpt-native", input="Who am I?", previous_response_id=first.id)
    assert second.output_text == "echo: Who am I?"
    sent = fake_openai.received[-1].body
    assert "previous_response_id" not in sent  # OpenAI does not hold the translated turn: it is sent
    assert sent["input"] == [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "My name is Ann."}]},
        first.output[0].model_dump(exclude_none=True, exclude={"id", "status"}),
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Who am I?"}]}]


async def test_azure_passthrough(client, fake_openai):
    reply = await client.responses.create(model="azure-native", input="hello big world")
    assert reply.output_text == "echo: hello big world"
    sent = fake_openai.received[-1]
    assert (sent.path, sent.query) == ("/openai/responses", "api-version=2025-04-01-preview")
    assert sent.body == {"model": "my-resp", "input": "hello big world"}
    assert sent.headers["api-key"] == PROVIDER_KEY and "authorization" not in sent.headers
    async with client.responses.stream(model="azure-native", input="hello big world") as stream:
        final = await stream.get_final_response()
    assert final.output_text == "echo: hello big world"
    got = await client.responses.retrieve(reply.id)
    assert got.id == reply.id
    assert (fake_openai.received[-1].path, fake_openai.received[-1].query) == (
        f"/openai/responses/{reply.id}", "api-version=2025-04-01-preview")


async def test_passthrough_errors_and_mid_stream_failure(client, gw, fetch, fake_openai):
    fake_openai.fail_times, fake_openai.fail_status = 1, 429
    with pytest.raises(openai.RateLimitError) as info:
        await client.responses.create(model="gpt-native", input="hi")
    assert info.value.response.headers["retry-after"] == "1"

    r = await fetch(gw, "/v1/responses", {"model": "gpt-native", "input": "hi", "previous_response_id": "resp_nope"})
    assert r.code == 400 and "resp_nope" in error_of(r)["message"]  # the provider's own answer

    fake_openai.fail_mid_stream_after = 2
    r = await fetch(gw, "/v1/responses", {"model": "gpt-native", "input": "hello big world", "stream": True})
    events = events_of(r.body)
    assert events[0][0] == "response.created"
    name, data = events[-1]
    assert name == "error" and data["code"] == "server_error"
    assert data["sequence_number"] == events[-2][1]["sequence_number"] + 1


async def test_builtin_tools_pass_through_to_openai(client, fake_openai):
    await client.responses.create(model="gpt-native", input="news?", tools=[{"type": "web_search_preview"}])
    assert fake_openai.received[-1].body["tools"] == [{"type": "web_search_preview"}]


# --- translated: every other provider ----------------------------------------------------------

@pytest.mark.parametrize("model", TRANSLATED)
async def test_translated_plain_and_stream(client, gw, fetch, fakes, model):
    reply = await client.responses.create(model=model, input="hello big world", instructions="be brief")
    assert reply.id.startswith("resp_") and reply.object == "response" and reply.status == "completed"
    assert reply.instructions == "be brief" and reply.incomplete_details is None
    (item,) = reply.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert item.content[0].type == "output_text" and item.content[0].annotations == []
    text = reply.output_text
    assert text == ("hello big world" if model == "demo" else "echo: hello big world")
    usage = reply.usage
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens

    async with client.responses.stream(model=model, input="hello big world") as stream:
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(deltas) == text == final.output_text
    assert final.usage.output_tokens == usage.output_tokens  # the chat stream's usage was asked for

    stream = await client.responses.create(model=model, input="hello big world", stream=True)
    kinds = [event.type async for event in stream]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"

    r = await fetch(gw, "/responses", {"model": model, "input": "hello big world", "stream": True})
    events = events_of(r.body)
    check_stream(events)
    assert order(events) == TEXT_ORDER
    done = events[-1][1]["response"]
    assert done["status"] == "completed" and done["usage"]["output_tokens"] == usage.output_tokens
    fake = fakes[model]
    assert fake is None or all(not r.path.endswith("/responses") for r in fake.received)


async def test_translated_request_is_exact(client, fake_openai_b):
    await client.responses.create(
        model="compat", instructions="be brief", max_output_tokens=50, temperature=0.2, top_p=0.9, user="u-1",
        metadata={"k": "v"}, reasoning={"effort": "low"}, parallel_tool_calls=False, tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "name": "get_weather"},
        text={"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": True}},
        input=[{"role": "user", "content": [{"type": "input_text", "text": "look"},
                                            {"type": "input_image", "image_url": "https://x/y.png"}]}])
    sent = fake_openai_b.received[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.body == {
        "model": "llama-3-8b", "max_tokens": 50, "temperature": 0.2, "top_p": 0.9, "user": "u-1",
        "reasoning_effort": "low", "parallel_tool_calls": False,
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "look"},
                                                  {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                                    "parameters": WEATHER_TOOL["parameters"]}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"},
                                                                   "strict": True}}}


@pytest.mark.parametrize("model", ("compat", "claude", "gem", "llama"))
async def test_translated_function_tool_round_trip(client, fakes, model):
    fake = fakes[model]
    reply = await client.responses.create(model=model, input="What is the weather in Paris?", tools=[WEATHER_TOOL])
    calls = [o for o in reply.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and orjson.loads(calls[0].arguments)["location"] == "Paris"
    assert calls[0].call_id and calls[0].status == "completed"

    async with client.responses.stream(model=model, input="What is the weather in Paris?",
                                       tools=[WEATHER_TOOL]) as stream:
        arg_deltas = [e.delta async for e in stream if e.type == "response.function_call_arguments.delta"]
        final = await stream.get_final_response()
    streamed = [o for o in final.output if o.type == "function_call"]
    assert streamed and orjson.loads(streamed[0].arguments) == orjson.loads(calls[0].arguments)
    assert "".join(arg_deltas) == streamed[0].arguments

    follow = await client.responses.create(model=model, previous_response_id=reply.id, input=[
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}])
    assert follow.status == "completed" and follow.previous_response_id == reply.id
    sent = orjson.dumps(fake.received[-1].body).decode()
    assert "sunny" in sent and "What is the weather in Paris?" in sent and "get_weather" in sent
    if model == "compat":
        assert fake.received[-1].body["messages"] == [
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": calls[0].call_id, "type": "function",
                                                                   "function": {"name": "get_weather",
                                                                                "arguments": calls[0].arguments}}]},
            {"role": "tool", "tool_call_id": calls[0].call_id, "content": "sunny"}]


async def test_translated_errors(client, gw, fetch, fake_openai_b):
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(model="compat", input="news?", tools=[{"type": "web_search_preview"}])
    assert "web_search_preview" in info.value.body["message"] and info.value.body["param"] == "tools[0].type"
    for tool in ({"type": "file_search", "vector_store_ids": ["vs_1"]}, {"type": "code_interpreter"},
                 {"type": "mcp", "server_label": "x"}):
        r = await fetch(gw, "/v1/responses", {"model": "claude", "input": "x", "tools": [tool]})
        assert r.code == 400 and tool["type"] in error_of(r)["message"]
    assert fake_openai_b.received == []

    with pytest.raises(openai.NotFoundError) as info:
        await client.responses.create(model="compat", input="hi", previous_response_id="resp_unknown")
    assert info.value.body["param"] == "previous_response_id" and "resp_unknown" in info.value.body["message"]
    r = await fetch(gw, "/v1/responses", {"model": "compat", "input": 5})
    assert r.code == 400 and error_of(r)["param"] == "input"

    fake_openai_b.fail_times, fake_openai_b.fail_status = 1, 429
    with pytest.raises(openai.RateLimitError):
        await client.responses.create(model="compat", input="hi")

    fake_openai_b.fail_mid_stream_after = 2
    r = await fetch(gw, "/v1/responses", {"model": "compat", "input": "hello big world", "stream": True})
    events = events_of(r.body)
    assert [n for n, _ in events][:2] == ["response.created", "response.in_progress"]
    assert [n for n, _ in events[-2:]] == ["error", "response.failed"]
    failed = events[-1][1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))


async def test_translated_max_output_tokens_is_incomplete(client, gw, fetch, fake_anthropic):
    reply = await client.responses.create(model="claude", input="hello big world", max_output_tokens=1)
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"
    assert reply.output_text == "echo: " and fake_anthropic.received[-1].body["max_tokens"] == 1
    r = await fetch(gw, "/v1/responses", {"model": "claude", "input": "hello big world", "max_output_tokens": 1,
                                          "stream": True})
    name, data = events_of(r.body)[-1]
    assert name == "response.incomplete" and data["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


# --- stored responses: previous_response_id, GET, DELETE -------------------------------------

async def test_conversation_get_delete(gateway, fakes, storage, fetch):
    gw = await gateway(yaml_for(fakes, storage))
    compat = fakes["compat"]
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=MASTER_KEY, max_retries=0) as client:
        first = await client.responses.create(model="compat", input="My name is Ann.", instructions="be kind")
        async with client.responses.stream(model="compat", input="What is my name?",
                                           previous_response_id=first.id, instructions="be brief") as stream:
            second = await stream.get_final_response()
        assert second.previous_response_id == first.id
        assert compat.received[-1].body["messages"] == [  # the first turn, then the new input
            {"role": "system", "content": "be brief"}, {"role": "user", "content": "My name is Ann."},
            {"role": "assistant", "content": "echo: My name is Ann."}, {"role": "user", "content": "What is my name?"}]
        third = await client.responses.create(model="compat", input="And again?", previous_response_id=second.id)
        assert [m["content"] for m in compat.received[-1].body["messages"]] == [
            "My name is Ann.", "echo: My name is Ann.", "What is my name?", "echo: What is my name?", "And again?"]

        got = await client.responses.retrieve(third.id)
        assert got.model_dump() == third.model_dump()
        r = await fetch(gw, f"/v1/responses/{first.id}", method="DELETE")
        assert r.code == 200 and orjson.loads(r.body) == {"id": first.id, "object": "response", "deleted": True}
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(first.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.create(model="compat", input="x", previous_response_id=first.id)
        r = await fetch(gw, f"/v1/responses/{first.id}", method="DELETE")
        assert r.code == 404 and error_of(r)["param"] == "response_id"

        unstored = await client.responses.create(model="demo", input="forget me", store=False)
        assert unstored.store is False
        r = await fetch(gw, f"/responses/{unstored.id}")
        assert r.code == 404
    if storage is not None:
        await wait_for(lambda: query(storage, "SELECT count(*) FROM proxy_responses")[0][0] == 2)
        rows = dict(query(storage, "SELECT id, response->>'status' FROM proxy_responses"))
        assert rows == {second.id: "completed", third.id: "completed"}


async def test_postgres_shares_responses_between_instances(gateway, fakes, pg_dsn, fetch):
    """Two gateways on one database: a response made on one continues and reads on the other."""
    one = await gateway(yaml_for(fakes, pg_dsn))
    two = await gateway(yaml_for(fakes, pg_dsn))
    r = await fetch(one, "/v1/responses", {"model": "compat", "input": "My name is Ann."})
    first = orjson.loads(r.body)
    await wait_for(lambda: query(pg_dsn, "SELECT count(*) FROM proxy_responses WHERE id = %s",
                                 (first["id"],))[0][0] == 1)
    r = await fetch(two, "/v1/responses", {"model": "compat", "input": "Who?", "previous_response_id": first["id"]})
    assert r.code == 200
    assert [m["content"] for m in fakes["compat"].received[-1].body["messages"]] == [
        "My name is Ann.", "echo: My name is Ann.", "Who?"]
    r = await fetch(two, f"/v1/responses/{first['id']}")
    assert r.code == 200 and orjson.loads(r.body) == first
    r = await fetch(two, "/v1/responses", {"model": "gpt-native", "input": "hello big world", "stream": True})
    assert r.code == 200  # a pass-through stream: its usage comes from response.completed
    await wait_for(lambda: len(query(pg_dsn, "SELECT 1 FROM proxy_spend_logs")) == 3)
    rows = query(pg_dsn, "SELECT call_type, prompt_tokens, completion_tokens, custom_llm_provider "
                         "FROM proxy_spend_logs ORDER BY start_time")
    assert rows == [("aresponses", 4, 5, "hosted_vllm"), ("aresponses", 10, 2, "hosted_vllm"),
                    ("aresponses", 3, 4, "openai")]


async def test_virtual_key_sees_only_its_responses(gateway, fakes, pg_dsn, fetch):
    gw = await gateway(yaml_for(fakes, pg_dsn))
    keys = [orjson.loads((await fetch(gw, "/key/generate", {})).body)["key"] for _ in range(2)]
    r = await fetch(gw, "/v1/responses", {"model": "demo", "input": "mine"}, key=keys[0])
    made = orjson.loads(r.body)
    assert (await fetch(gw, f"/v1/responses/{made['id']}", key=keys[0])).code == 200
    assert (await fetch(gw, f"/v1/responses/{made['id']}")).code == 200  # the master key sees all
    r = await fetch(gw, f"/v1/responses/{made['id']}", key=keys[1])
    assert r.code == 404 and error_of(r)["param"] == "response_id"
    r = await fetch(gw, "/v1/responses", {"model": "demo", "input": "x", "previous_response_id": made["id"]},
                    key=keys[1])
    assert r.code == 404 and error_of(r)["param"] == "previous_response_id"
    assert (await fetch(gw, f"/v1/responses/{made['id']}", method="DELETE", key=keys[1])).code == 404
    assert (await fetch(gw, f"/v1/responses/{made['id']}", key=keys[0])).code == 200


async def test_store_keeps_serving_when_postgres_is_unreachable(caplog):
    """A write that cannot reach PostgreSQL is logged, never raised; the response stays in memory."""
    store = ResponseStore(Database("host=127.0.0.1 port=1 user=postgres dbname=x", connect_timeout=1.0))
    record = StoredResponse(id="resp_1", owner="", model="demo", response={"id": "resp_1", "output": []})
    store.save(record)
    await store.stop()
    assert store.write_failures == 1
    assert "memory only" in caplog.text
    assert await store.get("resp_1") is record
    with pytest.raises(DatabaseUnavailable):  # an id not in memory: only the database could say
        await store.get("resp_other")


async def test_postgres_outage_keeps_answering(gateway, fakes, pg_dsn, pg_server, fetch, caplog):
    """PostgreSQL refusing connections: answers still go out, the response is kept in memory (and
    continues from there); an id only the database could know is a 503, not a guessed 404."""
    gw = await gateway(yaml_for(fakes, pg_dsn))
    name = psycopg2.extensions.parse_dsn(pg_dsn)["dbname"]
    admin_sql(pg_server, f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS false")
    admin_sql(pg_server, f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
    try:
        r = await fetch(gw, "/v1/responses", {"model": "compat", "input": "during the outage"})
        assert r.code == 200
        made = orjson.loads(r.body)
        await wait_for(lambda: "kept in this worker's memory only" in caplog.text, 10)
        r = await fetch(gw, f"/v1/responses/{made['id']}")
        assert r.code == 200 and orjson.loads(r.body) == made
        r = await fetch(gw, "/v1/responses", {"model": "compat", "input": "next", "previous_response_id": made["id"]})
        assert r.code == 200
        assert [m["content"] for m in fakes["compat"].received[-1].body["messages"]] == [
            "during the outage", "echo: during the outage", "next"]
        r = await fetch(gw, "/v1/responses/resp_elsewhere")
        assert r.code == 503 and error_of(r)["param"] == "response_id"
    finally:
        admin_sql(pg_server, f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS true")
    assert query(pg_dsn, "SELECT count(*) FROM proxy_responses")[0][0] == 0


async def test_input_items_of_a_translated_response(client, gw, fetch, fake_openai_b):
    first = await client.responses.create(model="compat", input="My name is Ann.")
    second = await client.responses.create(
        model="compat", previous_response_id=first.id,
        input=[{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Who am I?"}]}])
    page = await client.responses.input_items.list(second.id)  # newest first, as OpenAI
    texts = [item.content[0].text for item in page.data]
    assert texts == ["Who am I?", "echo: My name is Ann.", "My name is Ann."]
    assert page.data[1].role == "assistant" and page.data[0].role == "user"
    ids = [item.id for item in page.data]
    assert len(set(ids)) == 3
    asc = await client.responses.input_items.list(second.id, order="asc", limit=2)
    assert [item.id for item in asc.data] == ids[::-1][:2] and asc.has_more
    rest = await client.responses.input_items.list(second.id, order="asc", after=asc.data[-1].id)
    assert [item.id for item in rest.data] == ids[:1] and not rest.has_more
    all_pages = [item.id async for item in client.responses.input_items.list(second.id, limit=1)]
    assert all_pages == ids  # the SDK's paging through `after` reaches every item once
    for bad in ("limit=0", "limit=x", "order=up", "after=nope"):
        r = await fetch(gw, f"/v1/responses/{second.id}/input_items?{bad}")
        assert r.code == 400 and error_of(r)["param"] == bad.split("=")[0]
    r = await fetch(gw, "/v1/responses/resp_unknown/input_items")
    assert r.code == 404 and error_of(r)["param"] == "response_id"


async def test_input_items_of_a_passthrough_response_are_asked_of_its_deployment(client, fake_openai):
    made = await client.responses.create(model="gpt-native", input="hello")
    page = await client.responses.input_items.list(made.id, limit=5, order="asc")
    assert [item.content[0].text for item in page.data] == ["hello"]
    last = fake_openai.received[-1]
    assert (last.method, last.path) == ("GET", f"/v1/responses/{made.id}/input_items")
    assert "limit=5" in last.query and "order=asc" in last.query
