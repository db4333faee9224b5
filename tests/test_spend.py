"""Spend: the cost of a call, the spend log written off the request path (batched, with
increments to keys, teams and users in the same transaction, idempotent on replay), this
worker's memory of spend, the spill file, and the flush at shutdown."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import openai
import orjson
import psycopg2
import pytest

from tornado_proxy.config import Settings
from tornado_proxy.db import Database
from tornado_proxy.keystore import hash_key
from tornado_proxy.providers.base import Deployment
from tornado_proxy.router import load_prices
from tornado_proxy.spend import SpendEvent, SpendWriter, SpillFile, cost_of
from tornado_proxy.spendstore import SpendStore
from tornado_proxy.tenants import Tenants

from .conftest import MASTER_KEY, wait_for

IN, OUT = 0.001, 0.002  # USD per prompt / completion token of the test models
MODELS = f"""
model_list:
  - model_name: cheap
    litellm_params: {{model: mock/cheap, input_cost_per_token: {IN}, output_cost_per_token: {OUT}}}
  - model_name: free
    litellm_params: {{model: mock/free}}
"""


def db_yaml(dsn: str, extra: str = "") -> str:
    return MODELS + f"""
general_settings:
  store_model_in_db: true
  database_url: "{dsn}"
{extra}
"""


def body(r) -> dict:
    assert r.code == 200, r.body
    return orjson.loads(r.body)


def query(dsn: str, sql: str, args=()) -> list[tuple]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchall()


async def chat(gw, key: str, model: str = "cheap", text: str = "hello there", **extra):
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as c:
        return await c.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": text}], **extra)


def expected_cost(usage) -> float:
    return usage.prompt_tokens * IN + usage.completion_tokens * OUT


async def rows_present(dsn: str, n: int, timeout: float = 10.0, where: str = "TRUE") -> None:
    def enough() -> bool:
        return query(dsn, f"SELECT count(*) FROM proxy_spend_logs WHERE {where}")[0][0] >= n
    await wait_for(enough, timeout)


@pytest.fixture
async def gw(pg_dsn, gateway):
    return await gateway(db_yaml(pg_dsn))


# -- cost ---------------------------------------------------------------------------------------

def test_cost_uses_configured_prices_then_the_shipped_table():
    table = load_prices()
    usage = {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}
    own = Deployment(id="a", model_name="m", provider="openai", model="gpt-4o",
                     public_params={"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6})
    assert cost_of(own, usage, table) == pytest.approx(1000 * 1e-6 + 500 * 2e-6)
    info = Deployment(id="b", model_name="m", provider="openai", model="gpt-4o",
                      model_info={"input_cost_per_token": 3e-6})
    assert cost_of(info, usage, table) == pytest.approx(1000 * 3e-6)
    shipped = Deployment(id="c", model_name="m", provider="openai", model="gpt-4o-mini")
    i, o = table["openai"]["gpt-4o-mini"]
    assert cost_of(shipped, usage, table) == pytest.approx(1000 * i + 500 * o)
    unknown = Deployment(id="d", model_name="m", provider="openai", model="no-such-model")
    assert cost_of(unknown, usage, table) == 0.0
    assert cost_of(shipped, None, table) == 0.0


# -- the spend log ------------------------------------------------------------------------------

async def test_every_call_leaves_a_spend_row_and_increments(gw, fetch, pg_dsn, caplog):
    caplog.set_level(logging.DEBUG)
    team = body(await fetch(gw, "/team/new", {"team_alias": "t"}))["team_id"]
    made = body(await fetch(gw, "/key/generate", {"team_id": team, "user_id": "u1", "key_alias": "app"}))
    key = made["key"]
    replies = [await chat(gw, key, user="customer-7", extra_body={"metadata": {"tags": ["job:1"]}})
               for _ in range(3)]
    master = await chat(gw, MASTER_KEY)
    ids = [r.headers["x-litellm-call-id"] for r in replies]
    costs = [expected_cost(r.parse().usage) for r in replies]
    await rows_present(pg_dsn, 4)
    rows = query(pg_dsn, 'SELECT request_id, api_key, team_id, "user", end_user, model, model_group, model_id, '
                 "spend, prompt_tokens, completion_tokens, total_tokens, status, metadata, call_type, cache_hit, "
                 "start_time <= end_time FROM proxy_spend_logs")
    by_id = {r[0]: r for r in rows}
    for call_id, reply, cost in zip(ids, replies, costs):
        row = by_id[call_id]
        usage = reply.parse().usage
        assert row[1:8] == (made["token"], team, "u1", "customer-7", "cheap", "cheap", row[7])
        assert row[8] == pytest.approx(cost)
        assert row[9:13] == (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens, "success")
        assert row[13] == {"tags": ["job:1"]} and row[14] == "acompletion" and row[15] == "False" and row[16]
    master_row = by_id[master.headers["x-litellm-call-id"]]
    assert master_row[1] == hash_key(MASTER_KEY) and master_row[2] is None
    total = sum(costs)

    def increments_in() -> bool:
        return query(pg_dsn, "SELECT spend FROM proxy_keys")[0][0] == pytest.approx(total)
    await wait_for(increments_in, 10)
    assert query(pg_dsn, "SELECT spend, model_spend FROM proxy_teams")[0] == (pytest.approx(total),
                                                                            {"cheap": pytest.approx(total)})
    assert query(pg_dsn, "SELECT spend FROM proxy_users WHERE user_id = 'u1'")[0][0] == pytest.approx(total)
    info = body(await fetch(gw, f"/key/info?key={made['token']}"))["info"]
    assert info["spend"] == pytest.approx(total)
    assert body(await fetch(gw, f"/team/info?team_id={team}"))["team_info"]["spend"] == pytest.approx(total)
    assert body(await fetch(gw, "/user/info?user_id=u1"))["user_info"]["spend"] == pytest.approx(total)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert key not in logged and MASTER_KEY not in logged


async def test_failed_calls_are_logged_as_failures(gw, fetch, pg_dsn):
    key = body(await fetch(gw, "/key/generate", {}))["key"]
    r = await fetch(gw, "/v1/chat/completions", {"model": "cheap", "messages": [{"role": "user", "content": "x"}],
                                                 "mock_response": "litellm.RateLimitError"}, key=key)
    assert r.code == 429
    await rows_present(pg_dsn, 1)
    assert query(pg_dsn, "SELECT status, spend, request_id FROM proxy_spend_logs")[0] == (
        "failure", 0.0, r.headers["x-litellm-call-id"])


def event(request_id: str, token: str, spend: float, origin: str = "other") -> SpendEvent:
    now = time.time()
    return SpendEvent(request_id=request_id, call_type="acompletion", api_key=token, spend=spend, prompt_tokens=1,
                      completion_tokens=1, total_tokens=2, start_time=now, end_time=now, model="m", model_id="x",
                      model_group="cheap", custom_llm_provider="mock", api_base=None, user="u", end_user=None,
                      team_id=None, status="success", origin=origin)


async def test_a_replayed_batch_counts_once(gw, fetch, pg_dsn):
    token = body(await fetch(gw, "/key/generate", {"user_id": "u"}))["token"]
    db = Database(pg_dsn)
    store = SpendStore(db)
    try:
        batch = [event(str(uuid.uuid4()), token, 0.25) for _ in range(3)]
        first = await store.write(batch)
        assert len(first.inserted) == 3 and first.at is not None
        again = await store.write(batch)
        assert again.inserted == [] and again.at is None  # all already there: no spend, no announcement
        assert len((await store.write(batch[:1] + [event(str(uuid.uuid4()), token, 1.0)])).inserted) == 1
    finally:
        await db.close()
    assert query(pg_dsn, "SELECT spend, model_spend FROM proxy_keys")[0] == (1.75, {"cheap": 1.75})
    assert query(pg_dsn, "SELECT spend FROM proxy_users WHERE user_id = 'u'")[0][0] == 1.75
    assert query(pg_dsn, "SELECT count(*) FROM proxy_spend_logs")[0][0] == 4


async def test_spill_file_is_replayed_once(gw, fetch, pg_dsn, tmp_path):
    token = body(await fetch(gw, "/key/generate", {}))["token"]
    db = Database(pg_dsn)
    tenants = Tenants(db, Settings())
    writer = SpendWriter(SpendStore(db), tenants, tmp_path / "spill", queue_size=2)
    try:
        events = [event(str(uuid.uuid4()), token, 0.5) for _ in range(5)]
        for e in events:
            writer.submit(e)  # more than the queue holds: spilled to the file
        assert writer.spilled == 3 and len(writer.queue) == 2
        # another worker's leftovers are replayed too
        SpillFile(tmp_path / "spill", "elsewhere").append([event(str(uuid.uuid4()), token, 1.0)])
        assert await writer.flush()
        assert not list((tmp_path / "spill").iterdir())
        assert writer.written == 6 and writer.dropped == 0
        assert await writer.flush()
    finally:
        await writer.stop()
        await db.close()
    assert query(pg_dsn, "SELECT spend FROM proxy_keys")[0][0] == pytest.approx(3.5)
    assert query(pg_dsn, "SELECT count(*) FROM proxy_spend_logs")[0][0] == 6


async def test_a_spill_that_fails_counts_drops(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    tenants = Tenants(None, Settings())
    writer = SpendWriter(object(), tenants, blocker, queue_size=1)  # a store is set: events are taken
    writer.submit(event("a", "t", 0.1))
    writer.submit(event("b", "t", 0.1))
    assert writer.dropped == 2


async def test_stop_flushes_what_is_queued(pg_dsn, gateway, fetch):
    gw = await gateway(db_yaml(pg_dsn))
    key = body(await fetch(gw, "/key/generate", {}))["key"]
    replies = await asyncio.gather(*(chat(gw, key) for _ in range(20)))
    await gw.stop()  # what SIGTERM does: drain, then Gateway.stop flushes the queue
    ids = {r.headers["x-litellm-call-id"] for r in replies}
    assert {r[0] for r in query(pg_dsn, "SELECT request_id FROM proxy_spend_logs")} == ids
    total = sum(expected_cost(r.parse().usage) for r in replies)
    assert query(pg_dsn, "SELECT spend FROM proxy_keys")[0][0] == pytest.approx(total)


async def test_streams_are_costed_from_usage_the_client_did_not_ask_for(pg_dsn, gateway, fetch, fake_openai):
    from .conftest import PROVIDER_KEY

    gw = await gateway(f"""
model_list:
  - model_name: streamed
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: {fake_openai.base}
      api_key: {PROVIDER_KEY}
      input_cost_per_token: {IN}
      output_cost_per_token: {OUT}
general_settings:
  store_model_in_db: true
  database_url: "{pg_dsn}"
""")
    key = body(await fetch(gw, "/key/generate", {}))["key"]
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as c:
        plain = await c.chat.completions.with_raw_response.create(
            model="streamed", messages=[{"role": "user", "content": "four words go here"}], stream=True)
        chunks = [ch async for ch in plain.parse()]
        assert all(ch.usage is None for ch in chunks) and all(ch.choices for ch in chunks)
        asked = await c.chat.completions.create(model="streamed", messages=[{"role": "user", "content": "x y"}],
                                                stream=True, stream_options={"include_usage": True})
        usage = [ch async for ch in asked][-1].usage
    assert usage is not None
    await rows_present(pg_dsn, 2)
    rows = dict(query(pg_dsn, "SELECT request_id, prompt_tokens FROM proxy_spend_logs"))
    row = query(pg_dsn, "SELECT prompt_tokens, completion_tokens, spend FROM proxy_spend_logs "
                "WHERE request_id = %s", (plain.headers["x-litellm-call-id"],))[0]
    assert row[0] > 0 and row[1] > 0 and row[2] == pytest.approx(row[0] * IN + row[1] * OUT)
    assert usage.prompt_tokens in rows.values()


async def test_embeddings_and_messages_are_logged_count_tokens_is_not(gw, fetch, pg_dsn):
    made = body(await fetch(gw, "/key/generate", {}))
    key = made["key"]
    r = await fetch(gw, "/v1/embeddings", {"model": "cheap", "input": "three little words"}, key=key)
    assert r.code == 200, r.body
    m = await fetch(gw, "/v1/messages", {"model": "cheap", "max_tokens": 10,
                                         "messages": [{"role": "user", "content": "hi there"}]}, key=key)
    assert m.code == 200, m.body
    c = await fetch(gw, "/v1/messages/count_tokens", {"model": "cheap",
                                                      "messages": [{"role": "user", "content": "x"}]}, key=key)
    assert c.code == 200, c.body
    await rows_present(pg_dsn, 2)
    rows = dict(query(pg_dsn, "SELECT call_type, spend FROM proxy_spend_logs"))
    assert rows == {"aembedding": pytest.approx(3 * IN), "anthropic_messages": pytest.approx(2 * IN + 2 * OUT)}
