"""Rate limits of virtual keys end to end: rpm, tpm and max_parallel_requests of a key and its
team answered as LiteLLM does (429, Retry-After, x-ratelimit-* headers) on a real PostgreSQL,
through the openai SDK and raw HTTP."""

from __future__ import annotations

import asyncio

import openai
import orjson
import pytest

from .conftest import PROVIDER_KEY, error_of

HELLO = [{"role": "user", "content": "hi"}]


def db_yaml(dsn: str, fake=None) -> str:
    slow = ""
    if fake is not None:
        slow = f"""
  - model_name: slow
    litellm_params: {{model: openai/gpt-4o-mini, api_base: "{fake.base}", api_key: {PROVIDER_KEY}}}"""
    return f"""
model_list:
  - model_name: cheap
    litellm_params: {{model: mock/cheap}}{slow}
general_settings:
  store_model_in_db: true
  database_url: "{dsn}"
router_settings:
  num_retries: 0
"""


async def new_key(fetch, gw, **fields) -> str:
    r = await fetch(gw, "/key/generate", body=fields)
    assert r.code == 200, r.body
    return orjson.loads(r.body)["key"]


async def chat(fetch, gw, key: str, model: str = "cheap"):
    return await fetch(gw, "/v1/chat/completions", {"model": model, "messages": HELLO}, key=key)


async def test_rpm_limit_of_a_key(gateway, fetch, pg_dsn):
    gw = await gateway(db_yaml(pg_dsn))
    key = await new_key(fetch, gw, rpm_limit=3)
    first = await chat(fetch, gw, key)
    assert first.code == 200
    assert first.headers["x-ratelimit-api_key-limit-requests"] == "3"
    assert first.headers["x-ratelimit-api_key-remaining-requests"] == "2"
    assert first.headers["x-ratelimit-limit-requests"] == "3"
    for _ in range(2):
        assert (await chat(fetch, gw, key)).code == 200
    refused = await chat(fetch, gw, key)
    assert refused.code == 429
    error = error_of(refused)
    assert error["type"] == "rate_limit_error"
    assert "Limit type: requests" in error["message"] and "Current limit: 3" in error["message"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    other = await new_key(fetch, gw, rpm_limit=3)  # another key has its own minute
    assert (await chat(fetch, gw, other)).code == 200
    assert (await chat(fetch, gw, key)).code == 429  # still refused: the minute is used up


async def test_team_limit_is_shared_by_its_keys(gateway, fetch, pg_dsn):
    gw = await gateway(db_yaml(pg_dsn))
    assert (await fetch(gw, "/team/new", body={"team_id": "t1", "rpm_limit": 2})).code == 200
    a, b = await new_key(fetch, gw, team_id="t1"), await new_key(fetch, gw, team_id="t1")
    assert (await chat(fetch, gw, a)).code == 200
    assert (await chat(fetch, gw, b)).code == 200
    refused = await chat(fetch, gw, a)
    assert refused.code == 429
    assert "team: t1" in error_of(refused)["message"]


async def test_tpm_limit_counts_the_tokens_used(gateway, fetch, pg_dsn):
    gw = await gateway(db_yaml(pg_dsn))
    key = await new_key(fetch, gw, tpm_limit=4)  # the mock bills "hi" as 1 prompt + 1 completion token
    first = await chat(fetch, gw, key)
    assert first.code == 200 and orjson.loads(first.body)["usage"]["total_tokens"] == 2
    assert (await chat(fetch, gw, key)).code == 200  # 2 tokens used: still under 4
    refused = await chat(fetch, gw, key)
    assert refused.code == 429
    assert "Limit type: tokens" in error_of(refused)["message"]


async def test_max_parallel_requests(gateway, fetch, pg_dsn, fake_openai):
    fake_openai.latency = 0.5
    gw = await gateway(db_yaml(pg_dsn, fake_openai))
    key = await new_key(fetch, gw, max_parallel_requests=1)
    first = asyncio.ensure_future(chat(fetch, gw, key, "slow"))
    while not fake_openai.received:
        await asyncio.sleep(0.01)
    second = await chat(fetch, gw, key, "slow")
    assert second.code == 429
    assert "max_parallel_requests" in error_of(second)["message"]
    assert second.headers["Retry-After"] == "1"
    assert (await first).code == 200
    assert (await chat(fetch, gw, key, "slow")).code == 200  # the slot came back


async def test_the_sdk_sees_a_rate_limit_error(gateway, fetch, pg_dsn):
    gw = await gateway(db_yaml(pg_dsn))
    key = await new_key(fetch, gw, rpm_limit=1)
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as client:
        await client.chat.completions.create(model="cheap", messages=HELLO)
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="cheap", messages=HELLO)


async def test_the_master_key_is_not_limited(gateway, fetch, pg_dsn):
    gw = await gateway(db_yaml(pg_dsn))
    for _ in range(5):
        r = await fetch(gw, "/v1/chat/completions", {"model": "cheap", "messages": HELLO})
        assert r.code == 200
        assert "x-ratelimit-limit-requests" not in r.headers
