"""Virtual keys, teams and users end to end: LiteLLM's management API on a real PostgreSQL,
keys used through the openai SDK, model access, team inheritance, expiry, blocking, the key
cache (negative caching), and that no key's text shows up after creation."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import openai
import orjson
import pytest

from tornado_proxy.config import Settings
from tornado_proxy.db import Database
from tornado_proxy.keystore import hash_key
from tornado_proxy.tenants import Tenants

from .conftest import error_of, wait_for

MODELS = """
model_list:
  - model_name: cheap
    litellm_params: {model: mock/cheap}
  - model_name: dear
    litellm_params: {model: mock/dear}
  - model_name: other
    litellm_params: {model: mock/other}
"""


def db_yaml(dsn: str) -> str:
    return MODELS + f"""
general_settings:
  store_model_in_db: true
  database_url: "{dsn}"
"""


def body(r) -> dict:
    assert r.code == 200, r.body
    return orjson.loads(r.body)


async def chat(gw, key: str, model: str = "cheap") -> str:
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as c:
        reply = await c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        return reply.choices[0].message.content


@pytest.fixture
async def gw(pg_dsn, gateway):
    return await gateway(db_yaml(pg_dsn))


async def test_without_database_key_endpoints_say_why(gateway, fetch):
    gw = await gateway(MODELS)
    r = await fetch(gw, "/key/generate", body={})
    assert r.code == 400
    assert "database" in error_of(r)["message"]
    r = await fetch(gw, "/v1/models", key="sk-not-a-key")
    assert r.code == 401


async def test_generate_use_and_never_show_the_key(gw, fetch, caplog):
    caplog.set_level(logging.DEBUG)
    created = body(await fetch(gw, "/key/generate", body={"models": ["cheap"], "key_alias": "app-1",
                                                          "max_budget": 10, "metadata": {"team": "x"}}))
    key = created["key"]
    assert key.startswith("sk-") and created["key_name"] == f"sk-...{key[-4:]}"
    assert created["token"] == created["token_id"] and len(created["token"]) == 64
    assert created["models"] == ["cheap"] and created["max_budget"] == 10 and created["key_alias"] == "app-1"
    assert await chat(gw, key) is not None
    for header in ({"x-api-key": key}, {"api-key": key}, {"x-litellm-api-key": f"Bearer {key}"}):
        r = await fetch(gw, "/v1/models", key=None, headers=header)
        assert [m["id"] for m in body(r)["data"]] == ["cheap"]
    answers = [await fetch(gw, "/key/list"), await fetch(gw, "/key/list?return_full_object=true"),
               await fetch(gw, f"/key/info?key={key}"), await fetch(gw, "/key/info", key=key),
               await fetch(gw, "/key/block", body={"key": key}), await fetch(gw, "/key/unblock", body={"key": key}),
               await fetch(gw, "/key/update", body={"key": key, "max_budget": 20}),
               await fetch(gw, "/v1/chat/completions", key=key, body={"model": "dear", "messages": []})]
    for r in answers:
        assert key.encode() not in r.body, r.body
    listed = body(answers[0])
    assert listed == {"keys": [created["token"]], "total_count": 1, "current_page": 1, "total_pages": 1}
    info = body(answers[2])
    assert info["key"] == created["token"] and info["info"]["key_alias"] == "app-1"
    assert body(answers[6])["max_budget"] == 20
    for record in caplog.records:
        assert key not in record.getMessage()


async def test_model_access_is_the_intersection_of_key_and_team(gw, fetch):
    team = body(await fetch(gw, "/team/new", body={"team_alias": "t", "models": ["cheap", "dear"]}))
    key = body(await fetch(gw, "/key/generate", body={"team_id": team["team_id"], "models": ["dear", "other"]}))["key"]
    assert [m["id"] for m in body(await fetch(gw, "/v1/models", key=key))["data"]] == ["dear"]
    assert await chat(gw, key, "dear")
    with pytest.raises(openai.PermissionDeniedError) as denied:
        await chat(gw, key, "cheap")
    assert denied.value.body["type"] == "key_model_access_denied"
    assert "Tried to access cheap" in denied.value.body["message"]
    with pytest.raises(openai.PermissionDeniedError) as denied:
        await chat(gw, key, "other")
    assert denied.value.body["type"] == "team_model_access_denied"
    team_key = body(await fetch(gw, "/key/generate", body={"team_id": team["team_id"]}))["key"]
    assert sorted(m["id"] for m in body(await fetch(gw, "/v1/models", key=team_key))["data"]) == ["cheap", "dear"]
    r = await fetch(gw, "/v1/models/other", key=team_key)
    assert r.code == 404


async def test_limits_are_stored_and_exposed_as_scopes(gw, fetch):
    team = body(await fetch(gw, "/team/new", body={"team_id": "tl", "rpm_limit": 5, "tpm_limit": 500}))
    assert team["rpm_limit"] == 5 and team["tpm_limit"] == 500 and team["max_parallel_requests"] is None
    user = body(await fetch(gw, "/user/new", body={"user_id": "u1", "max_parallel_requests": 2,
                                                    "auto_create_key": False}))
    assert user["key"] is None and user["max_parallel_requests"] == 2
    created = body(await fetch(gw, "/key/generate", body={"team_id": "tl", "user_id": "u1", "rpm_limit": 3,
                                                          "tpm_limit": 100, "max_parallel_requests": 1}))
    assert (created["rpm_limit"], created["tpm_limit"], created["max_parallel_requests"]) == (3, 100, 1)
    bare = body(await fetch(gw, "/key/generate", body={}))
    async with tenants_on(pg_dsn_of(gw)) as tenants:
        principal = await tenants.principal(hash_key(created["key"]))
        assert tuple((s.kind, s.id, s.rpm_limit, s.tpm_limit, s.max_parallel_requests)
                     for s in principal.limit_scopes()) == (("key", created["token"], 3, 100, 1), ("team", "tl", 5, 500, None),
                                            ("user", "u1", None, None, 2))
        assert (await tenants.principal(bare["token"])).limit_scopes() == ()


def pg_dsn_of(gw) -> str:
    return gw.config.settings.database_url.reveal()


@contextlib.asynccontextmanager
async def tenants_on(dsn: str):
    """A worker's key memory on its own, loaded from the database."""
    db = Database(dsn)
    tenants = Tenants(db, Settings())
    await tenants.refresh()
    try:
        yield tenants
    finally:
        await db.close()


async def test_expired_blocked_and_unknown_keys(gw, fetch):
    expired = body(await fetch(gw, "/key/generate", body={"duration": "1s"}))["key"]
    blocked = body(await fetch(gw, "/key/generate", body={"key": "sk-my-own-key-1234"}))["key"]
    assert blocked == "sk-my-own-key-1234"
    assert body(await fetch(gw, "/key/block", body={"key": blocked}))["blocked"] is True
    r = await fetch(gw, "/v1/models", key=blocked)
    assert r.code == 401 and "blocked" in error_of(r)["message"]
    await asyncio.sleep(1.1)
    r = await fetch(gw, "/v1/models", key=expired)
    assert r.code == 401 and "Expired Key" in error_of(r)["message"]
    assert orjson.loads(r.body)["error"]["type"] == "expired_key"
    r = await fetch(gw, "/v1/models", key="sk-never-issued")
    assert r.code == 401 and error_of(r)["type"] == "auth_error"
    assert (await fetch(gw, "/key/unblock", body={"key": blocked})).code == 200
    assert (await fetch(gw, "/v1/models", key=blocked)).code == 200
    r = await fetch(gw, "/key/generate", body={"key": "no-prefix"})
    assert r.code == 400


async def test_unknown_keys_are_looked_up_once_then_remembered(gw, fetch):
    results = await asyncio.gather(*(fetch(gw, "/v1/models", key="sk-flood-of-bad-keys") for _ in range(30)))
    assert {r.code for r in results} == {401}
    async with tenants_on(pg_dsn_of(gw)) as tenants:
        found = await asyncio.gather(*(tenants.principal(hash_key("sk-bad")) for _ in range(30)))
        assert found == [None] * 30 and tenants.db_lookups == 1
        assert await tenants.principal(hash_key("sk-bad")) is None and tenants.db_lookups == 1
        # a key created after the memory was loaded is found by one lookup, then served from memory
        created = body(await fetch(gw, "/key/generate", body={}))
        assert (await tenants.principal(created["token"])).key.token == created["token"]
        assert await tenants.principal(created["token"]) is not None and tenants.db_lookups == 2


async def test_non_admin_keys_read_only_their_own_info(gw, fetch):
    mine = body(await fetch(gw, "/key/generate", body={}))
    other = body(await fetch(gw, "/key/generate", body={}))
    assert body(await fetch(gw, "/key/info", key=mine["key"]))["key"] == mine["token"]
    assert body(await fetch(gw, f"/key/info?key={mine['token']}", key=mine["key"]))["key"] == mine["token"]
    r = await fetch(gw, f"/key/info?key={other['token']}", key=mine["key"])
    assert r.code == 403 and error_of(r)
    for path, payload in (("/key/generate", {}), ("/key/list", None), ("/team/list", None),
                          ("/user/list", None), ("/key/delete", {"keys": [other["token"]]}), ("/model/info", None)):
        r = await fetch(gw, path, body=payload, key=mine["key"])
        assert r.code == 403 and error_of(r), path


async def test_regenerate_and_delete(gw, fetch):
    created = body(await fetch(gw, "/key/generate", body={"key_alias": "rotating", "max_budget": 3}))
    old = created["key"]
    assert (await fetch(gw, "/v1/models", key=old)).code == 200
    fresh = body(await fetch(gw, f"/key/{created['token']}/regenerate", body={}))
    assert fresh["key"] != old and fresh["key_alias"] == "rotating" and fresh["max_budget"] == 3
    assert (await fetch(gw, "/v1/models", key=old)).code == 401
    assert (await fetch(gw, "/v1/models", key=fresh["key"])).code == 200
    again = body(await fetch(gw, "/key/regenerate", body={"key": fresh["key"]}))
    assert (await fetch(gw, "/v1/models", key=fresh["key"])).code == 401
    deleted = body(await fetch(gw, "/key/delete", body={"key_aliases": ["rotating"]}))
    assert deleted == {"deleted_keys": [again["token"]]}
    assert (await fetch(gw, "/v1/models", key=again["key"])).code == 401
    assert (await fetch(gw, "/key/delete", body={"keys": [again["key"]]})).code == 404


async def test_teams_and_members(gw, fetch):
    team = body(await fetch(gw, "/team/new", body={
        "team_id": "eng", "team_alias": "Engineering", "max_budget": 100, "budget_duration": "30d",
        "members_with_roles": [{"role": "admin", "user_id": "alice"}]}))
    assert team["members_with_roles"] == [{"role": "admin", "user_id": "alice", "user_email": None}]
    assert team["budget_reset_at"] is not None
    assert (await fetch(gw, "/team/new", body={"team_id": "eng"})).code == 400
    added = body(await fetch(gw, "/team/member_add", body={"team_id": "eng", "member": {"role": "user",
                                                                                          "user_email": "b@x.io"}}))
    assert len(added["members_with_roles"]) == 2 and added["updated_users"][0]["user_email"] == "b@x.io"
    updated = body(await fetch(gw, "/team/update", body={"team_id": "eng", "max_budget": 50, "models": ["cheap"]}))
    assert updated["team_id"] == "eng" and updated["data"]["max_budget"] == 50
    key = body(await fetch(gw, "/key/generate", body={"team_id": "eng"}))
    info = body(await fetch(gw, "/team/info?team_id=eng"))
    assert info["team_info"]["models"] == ["cheap"] and [k["token"] for k in info["keys"]] == [key["token"]]
    assert {m["user_id"] for m in info["team_memberships"]} >= {"alice"}
    assert [t["team_id"] for t in body(await fetch(gw, "/team/list?user_id=alice"))] == ["eng"]
    assert body(await fetch(gw, "/team/member_delete", body={"team_id": "eng", "user_id": "alice"}))
    assert [t["team_id"] for t in body(await fetch(gw, "/team/list?user_id=alice"))] == []
    assert (await fetch(gw, "/key/generate", body={"team_id": "nope"})).code == 400
    deleted = body(await fetch(gw, "/team/delete", body={"team_ids": ["eng"]}))
    assert deleted["deleted_teams"] == ["eng"] and deleted["deleted_keys"] == [key["token"]]
    assert (await fetch(gw, "/v1/models", key=key["key"])).code == 401
    assert (await fetch(gw, "/team/info?team_id=eng")).code == 404


async def test_users(gw, fetch):
    await fetch(gw, "/team/new", body={"team_id": "ops"})
    user = body(await fetch(gw, "/user/new", body={"user_id": "carol", "user_email": "c@x.io", "teams": ["ops"],
                                                    "max_budget": 5, "models": ["cheap"]}))
    assert user["key"].startswith("sk-") and user["user_id"] == "carol" and user["teams"] == ["ops"]
    assert await chat(gw, user["key"])
    info = body(await fetch(gw, "/user/info?user_id=carol"))
    assert info["user_info"]["max_budget"] == 5 and [t["team_id"] for t in info["teams"]] == ["ops"]
    assert [k["token"] for k in info["keys"]] == [user["token"]] and user["key"].encode() not in orjson.dumps(info)
    assert body(await fetch(gw, "/user/update", body={"user_id": "carol", "max_budget": 7}))["data"]["max_budget"] == 7
    assert (await fetch(gw, "/user/update", body={"user_id": "carol", "user_role": "king"})).code == 400
    listed = body(await fetch(gw, "/user/list"))
    assert listed["total"] == 1 and listed["users"][0]["user_id"] == "carol"
    admin = body(await fetch(gw, "/user/new", body={"user_id": "root", "user_role": "proxy_admin"}))
    assert (await fetch(gw, "/key/list", key=admin["key"])).code == 200
    deleted = body(await fetch(gw, "/user/delete", body={"user_ids": ["carol"]}))
    assert deleted["deleted_users"] == ["carol"] and deleted["deleted_keys"] == [user["token"]]
    assert (await fetch(gw, "/v1/models", key=user["key"])).code == 401
    assert (await fetch(gw, "/user/info?user_id=carol")).code == 404


async def test_block_propagates_to_another_instance(pg_dsn, gateway, fetch):
    one = await gateway(db_yaml(pg_dsn))
    two = await gateway(db_yaml(pg_dsn))
    key = body(await fetch(one, "/key/generate", body={}))["key"]
    assert (await fetch(two, "/v1/models", key=key)).code == 200
    assert (await fetch(one, "/key/block", body={"key": key})).code == 200

    async def refused():
        return (await fetch(two, "/v1/models", key=key)).code == 401
    await until(refused, 2.0)
    assert (await fetch(two, "/key/unblock", body={"key": key})).code == 200

    async def accepted():
        return (await fetch(one, "/v1/models", key=key)).code == 200
    await until(accepted, 2.0)


async def until(check, limit: float) -> None:
    async def poll():
        while not await check():
            await asyncio.sleep(0.02)
    await asyncio.wait_for(poll(), limit)


async def test_spend_columns_do_not_reload_the_key_cache(gw, fetch, pg_dsn):
    import psycopg2
    created = body(await fetch(gw, "/key/generate", body={}))
    conn = psycopg2.connect(pg_dsn)
    conn.autocommit = True
    listener = psycopg2.connect(pg_dsn)
    listener.autocommit = True
    try:
        listener.cursor().execute("LISTEN proxy_tenants_changed")
        conn.cursor().execute("UPDATE proxy_keys SET spend = spend + 1, spend_updated_at = now() WHERE token = %s",
                              (created["token"],))
        conn.cursor().execute("UPDATE proxy_keys SET max_budget = 9 WHERE token = %s", (created["token"],))
        await wait_for(lambda: listener.poll() or listener.notifies, 2)
        listener.poll()
        assert [n.payload for n in listener.notifies] == [f"key:{created['token']}"]
    finally:
        conn.close()
        listener.close()
