"""Budgets end to end: the key's, team's and user's max_budget and the key's model_max_budget
refuse the next request before any provider call (LiteLLM's budget_exceeded error), the
budget_duration reset (once per deployment, under an advisory lock), soft_budget warnings,
and the bounded overshoot of requests already in flight."""

from __future__ import annotations

import asyncio
import logging
import time

import openai
import orjson
import psycopg2
import pytest

from tornado_proxy.db import Database
from tornado_proxy.spendstore import RESET_LOCK, SpendStore

from .conftest import PROVIDER_KEY, error_of
from .test_e2e_db_faults import until
from .test_e2e_serve import HELLO, serve, wait_for  # noqa: F401 - fixture
from .test_e2e_serve import request as serve_request
from .test_spend import IN, OUT, body, chat, db_yaml, query

COST = 2 * IN + 2 * OUT  # "hello there" -> mock echoes it: 2 prompt and 2 completion tokens


@pytest.fixture
async def gw(pg_dsn, gateway):
    return await gateway(db_yaml(pg_dsn))


async def refused(gw, key: str, model: str = "cheap") -> dict:
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        await chat(gw, key, model)
    error = caught.value.body
    assert error["type"] == "budget_exceeded" and error["code"] == "422"
    return error


async def test_key_budget(gw, fetch):
    made = body(await fetch(gw, "/key/generate", {"max_budget": COST / 2, "key_alias": "small"}))
    await chat(gw, made["key"])
    error = await refused(gw, made["key"])
    assert error["message"] == (f"Budget has been exceeded! Key=small ({made['key_name']}) Current cost: "
                                f"{COST}, Max budget: {COST / 2}")
    assert made["key"] not in orjson.dumps(error).decode()
    r = await fetch(gw, "/v1/chat/completions", {"model": "cheap", "messages": [{"role": "user", "content": "x"}]},
                    key=made["key"])
    assert r.code == 422 and error_of(r)["type"] == "budget_exceeded"


async def test_team_budget_is_shared_by_its_keys(gw, fetch):
    team = body(await fetch(gw, "/team/new", {"max_budget": COST * 1.5}))["team_id"]
    a = body(await fetch(gw, "/key/generate", {"team_id": team}))["key"]
    b = body(await fetch(gw, "/key/generate", {"team_id": team}))["key"]
    await chat(gw, a)
    await chat(gw, b)
    for key in (a, b):
        error = await refused(gw, key)
        assert error["message"].startswith(f"Budget has been exceeded! Team={team} Current cost: ")


async def test_user_budget_covers_all_their_keys(gw, fetch):
    user = body(await fetch(gw, "/user/new", {"user_id": "spender", "max_budget": COST / 2}))
    other = body(await fetch(gw, "/key/generate", {"user_id": "spender"}))["key"]
    await chat(gw, user["key"])
    error = await refused(gw, other)
    assert error["message"] == f"Budget has been exceeded! User=spender Current cost: {COST}, Max budget: {COST / 2}"


async def test_model_max_budget(gw, fetch):
    key = body(await fetch(gw, "/key/generate", {
        "model_max_budget": {"cheap": {"budget_limit": COST / 2, "time_period": "1d"}}}))["key"]
    await chat(gw, key)
    error = await refused(gw, key, "cheap")
    assert "model=cheap" in error["message"]
    await chat(gw, key, "free")  # other models go on


async def test_status_code_setting(pg_dsn, gateway, fetch):
    gw = await gateway(db_yaml(pg_dsn, "  budget_exceeded_status_code: 429"))
    key = body(await fetch(gw, "/key/generate", {"max_budget": 0}))["key"]
    r = await fetch(gw, "/v1/chat/completions", {"model": "cheap", "messages": [{"role": "user", "content": "x"}]},
                    key=key)
    assert r.code == 429 and error_of(r)["type"] == "budget_exceeded"


async def test_budget_duration_resets_spend(pg_dsn, gateway, fetch):
    gw = await gateway(db_yaml(pg_dsn, "  proxy_budget_rescheduler_min_time: 0.2"))
    made = body(await fetch(gw, "/key/generate", {"max_budget": COST / 2, "budget_duration": "2s"}))
    await chat(gw, made["key"])
    await refused(gw, made["key"])

    async def served_again() -> bool:
        try:
            await chat(gw, made["key"])
            return True
        except openai.UnprocessableEntityError:
            return False
    await until(served_again, timeout=20, what="the budget to reset")
    info = body(await fetch(gw, f"/key/info?key={made['token']}"))["info"]
    assert info["budget_reset_at"] > made["budget_reset_at"]


async def test_reset_runs_where_the_lock_is_free(gw, fetch, pg_dsn):
    made = body(await fetch(gw, "/key/generate", {"budget_duration": "1s"}))
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("UPDATE proxy_keys SET spend = 5, budget_reset_at = now() - interval '1 second'")
    db = Database(pg_dsn)
    store = SpendStore(db)
    holder = psycopg2.connect(pg_dsn)
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (RESET_LOCK,))
        assert await store.reset_budgets() is None  # another worker is resetting: this one does not
        holder.close()
        reset = None
        for _ in range(100):  # None while the gateway's own reset timer holds the lock for a moment
            reset = await store.reset_budgets()
            if reset is not None:
                break
            await asyncio.sleep(0.05)
        assert reset is not None
        assert made["token"] in reset.get("proxy_keys", ()) or reset == {}  # the gateway's own timer may have won
    finally:
        holder.close()
        await db.close()
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT spend, budget_reset_at > now() FROM proxy_keys")
        assert cur.fetchone() == (0, True)


async def test_soft_budget_only_warns(gw, fetch, caplog):
    caplog.set_level(logging.WARNING, logger="tornado_proxy")
    made = body(await fetch(gw, "/key/generate", {"soft_budget": COST * 1.5, "key_alias": "soft"}))
    await chat(gw, made["key"])
    assert not [r for r in caplog.records if "soft budget" in r.getMessage()]
    await chat(gw, made["key"])
    await chat(gw, made["key"])
    warnings = [r.getMessage() for r in caplog.records if "soft budget" in r.getMessage()]
    assert len(warnings) == 1 and "key soft" in warnings[0]
    metrics = (await fetch(gw, "/metrics")).body.decode()
    assert 'litellm_soft_budget_crossed_total{kind="key"} 1.0' in metrics


async def test_overshoot_is_bounded_by_requests_in_flight(pg_dsn, gateway, fetch, fake_openai):
    """50 requests, started one after another while earlier ones are still running, against a
    key one request away from its budget: those already admitted when the first one finishes
    complete; every request sent after that gets the budget error and never reaches the provider."""
    fake_openai.latency = 0.3
    gw = await gateway(f"""
model_list:
  - model_name: slow
    litellm_params:
      model: openai/slow
      api_base: {fake_openai.base}
      api_key: {PROVIDER_KEY}
      input_cost_per_token: {IN}
      output_cost_per_token: {OUT}
general_settings:
  store_model_in_db: true
  database_url: "{pg_dsn}"
""")
    key = body(await fetch(gw, "/key/generate", {"max_budget": 1e-9}))["key"]
    results: list[tuple[float, float, int]] = []  # (sent, answered, status)

    async def one(c, i: int) -> None:
        await asyncio.sleep(i * 0.02)
        sent = time.monotonic()
        try:
            await c.chat.completions.create(model="slow", messages=[{"role": "user", "content": "hi"}])
            status = 200
        except openai.APIStatusError as exc:
            status = exc.status_code
        results.append((sent, time.monotonic(), status))

    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as c:
        await asyncio.gather(*(one(c, i) for i in range(50)))
    ok = [r for r in results if r[2] == 200]
    refused_ = [r for r in results if r[2] == 422]
    assert len(ok) + len(refused_) == 50
    assert ok and refused_
    first_done = min(r[1] for r in ok)
    assert all(sent < first_done for sent, _, _ in ok)          # only requests in flight got through
    assert all(r[2] == 422 for r in results if r[0] > first_done)  # later ones: the budget error
    assert fake_openai.count("/chat/completions") == len(ok)    # refused before any provider call


async def test_a_budget_used_up_on_one_instance_is_refused_on_another(pg_dsn, gateway, fetch, caplog):
    """Two gateways on one database stand in for two workers. Both know the key (spend 0); it
    spends its budget through A; B refuses it within a bounded wait, long before the full re-read
    (user_api_key_cache_ttl 300 s), by re-reading spend alone: no full or row re-read."""
    caplog.set_level(logging.DEBUG, logger="tornado_proxy.tenants")
    config = db_yaml(pg_dsn, "  user_api_key_cache_ttl: 300")
    a, b = await gateway(config), await gateway(config)
    key = body(await fetch(a, "/key/generate", {"max_budget": COST / 2}))["key"]
    for g in (a, b):
        await until(lambda g=g: served_free(g, key), timeout=15, what="the key on both instances")  # costs 0
    start = len(caplog.records)
    await chat(a, key)
    await refused(a, key)

    async def refused_on_b() -> bool:
        return not await served_free(b, key)
    await until(refused_on_b, timeout=15, what="instance B to refuse the spent key")
    error = await refused(b, key, "free")
    assert f"Current cost: {COST}," in error["message"]
    messages = [r.getMessage() for r in caplog.records[start:] if r.name == "tornado_proxy.tenants"]
    assert any(m.startswith("key store: spend re-read") for m in messages)
    assert not [m for m in messages if m.startswith(("key store: full re-read", "key store: re-read"))]


async def served_free(gw, key: str) -> bool:
    """A call to the model without a price: served (True) or refused for the budget (False)."""
    try:
        await chat(gw, key, "free")
        return True
    except openai.UnprocessableEntityError as exc:
        assert exc.body["type"] == "budget_exceeded"
        return False
    except openai.AuthenticationError:
        return True  # not known here yet: try again


def test_served_workers_refuse_a_spent_key(serve, pg_dsn):
    """``proxyctl serve --num-workers 4``: once a call has used the key's budget up and a short
    bounded wait has passed, every request, whichever worker takes it, is refused."""
    served = serve(f"""
    model_list:
      - model_name: priced
        litellm_params: {{model: mock/priced, input_cost_per_token: {IN}, output_cost_per_token: {OUT}}}
      - model_name: free
        litellm_params: {{model: mock/free}}
    general_settings:
      store_model_in_db: true
      database_url: "{pg_dsn}"
      user_api_key_cache_ttl: 300
    """, 4)
    status, _, made = serve_request(served.port, "POST", "/key/generate", {"max_budget": COST / 2})
    assert status == 200, made
    key = orjson.loads(made)["key"]
    for _ in range(24):  # fresh connections: the workers learn the key while it is under budget
        status, _, reply = serve_request(served.port, "POST", "/v1/chat/completions",
                                         {"model": "free", "messages": HELLO}, key=key)
        assert status == 200, reply
    status, _, reply = serve_request(served.port, "POST", "/v1/chat/completions",
                                     {"model": "priced", "messages": HELLO}, key=key)
    assert status == 200, reply
    wait_for(lambda: query(pg_dsn, "SELECT spend FROM proxy_keys")[0][0] > 0, timeout=15, what="the spend written")
    time.sleep(1.0)  # the announcement and the re-reads take milliseconds; 300 s would be the full re-read
    for _ in range(24):
        status, _, reply = serve_request(served.port, "POST", "/v1/chat/completions",
                                         {"model": "free", "messages": HELLO}, key=key)
        assert status == 422 and orjson.loads(reply)["error"]["type"] == "budget_exceeded", reply
