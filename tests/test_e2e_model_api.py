"""The model API end to end on a real PostgreSQL: /model/new, /model/update, /model/delete and
/model/info in LiteLLM's shapes; new models served at once; secrets encrypted in the table and
masked in every answer; persistence across a restart; the YAML -> database sync at start-up."""

from __future__ import annotations

import psycopg2
import pytest

import orjson

from .conftest import PROVIDER_KEY, error_of

HELLO = [{"role": "user", "content": "hello db"}]


def db_config(dsn: str, models: str = "", extra_settings: str = "") -> str:
    """A config with database storage on; ``models`` is the body of model_list (or empty)."""
    model_list = f"model_list:\n{models}" if models.strip() else "model_list: []"
    return f"""
{model_list}
general_settings:
  store_model_in_db: true
  database_url: "{dsn}"
{extra_settings}
"""


YAML_MODELS = """
  - model_name: yaml-model
    litellm_params: {model: mock/yaml}
    model_info: {id: yaml-1}
"""


def table(dsn: str) -> dict[str, dict]:
    """The proxy_models rows, read with psycopg2 (not through the gateway)."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT id, model_name, litellm_params, model_info, source, created_at, updated_at "
                        "FROM proxy_models")
            cols = [c.name for c in cur.description]
            return {r[0]: dict(zip(cols, r)) for r in cur.fetchall()}
    finally:
        conn.close()


def body_of(response) -> dict:
    assert response.code == 200, response.body
    return orjson.loads(response.body)


async def model_ids(fetch, gw) -> set[str]:
    return {m["id"] for m in body_of(await fetch(gw, "/v1/models"))["data"]}


async def chat(fetch, gw, model: str):
    return await fetch(gw, "/v1/chat/completions", {"model": model, "messages": HELLO})


def fake_model(fake, name: str = "api-fake", api_key: str = PROVIDER_KEY, **info) -> dict:
    body = {"model_name": name,
            "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": fake.base, "api_key": api_key}}
    if info:
        body["model_info"] = info
    return body


# --- /model/new -------------------------------------------------------------------------------------

async def test_new_model_is_answered_masked_and_served_at_once(gateway, fetch, fake_openai, pg_dsn):
    gw = await gateway(db_config(pg_dsn, YAML_MODELS))
    assert "api-fake" not in await model_ids(fetch, gw)

    r = await fetch(gw, "/model/new", fake_model(fake_openai, mode="chat", base_model="gpt-4o-mini"))
    added = body_of(r)
    model_id = added["model_id"]
    assert model_id and added["model_name"] == "api-fake"
    assert added["litellm_params"] == {"model": "openai/gpt-4o-mini", "api_base": fake_openai.base,
                                       "api_key": "***"}
    assert added["model_info"] == {"id": model_id, "db_model": True, "mode": "chat", "base_model": "gpt-4o-mini"}
    assert PROVIDER_KEY not in r.body.decode() and "enc:v1:" not in r.body.decode()

    # served by this gateway without a restart, with the key from the request reaching the provider
    assert {"api-fake", "yaml-model"} <= await model_ids(fetch, gw)
    r = await chat(fetch, gw, "api-fake")
    assert r.code == 200, r.body
    assert orjson.loads(r.body)["choices"][0]["message"]["content"] == "echo: hello db"
    assert fake_openai.received[-1].headers["authorization"] == f"Bearer {PROVIDER_KEY}"


async def test_new_mock_model_answers_chat(gateway, fetch, pg_dsn):
    gw = await gateway(db_config(pg_dsn))
    body_of(await fetch(gw, "/model/new", {"model_name": "api-mock", "litellm_params": {"model": "mock/m"}}))
    r = await chat(fetch, gw, "api-mock")
    assert r.code == 200, r.body
    assert orjson.loads(r.body)["choices"][0]["message"]["content"] == "hello db"


async def test_env_references_are_accepted_and_resolved(gateway, fetch, fake_openai, pg_dsn):
    gw = await gateway(db_config(pg_dsn), env={"FAKE_KEY": PROVIDER_KEY, "FAKE_BASE": fake_openai.base})
    r = await fetch(gw, "/model/new", {"model_name": "env-fake", "litellm_params": {
        "model": "openai/gpt-4o-mini", "api_base": "os.environ/FAKE_BASE", "api_key": "os.environ/FAKE_KEY"}})
    added = body_of(r)
    assert added["litellm_params"]["api_key"] == "***"
    assert PROVIDER_KEY not in r.body.decode()
    r = await chat(fetch, gw, "env-fake")
    assert r.code == 200, r.body
    assert fake_openai.received[-1].headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    # stored as the reference (resolved by each gateway from its own environment), still encrypted
    stored = table(pg_dsn)[added["model_id"]]["litellm_params"]
    assert stored["api_key"].startswith("enc:v1:") and stored["api_base"] == "os.environ/FAKE_BASE"


async def test_secrets_are_encrypted_in_the_table(gateway, fetch, fake_openai, pg_dsn):
    gw = await gateway(db_config(pg_dsn, f"""
  - model_name: yaml-fake
    litellm_params: {{model: openai/gpt-4o-mini, api_base: "{fake_openai.base}", api_key: os.environ/YAML_KEY}}
"""), env={"YAML_KEY": "sk-yaml-secret-1111"})
    model_id = body_of(await fetch(gw, "/model/new", fake_model(fake_openai)))["model_id"]
    rows = table(pg_dsn)
    assert {r["source"] for r in rows.values()} == {"yaml", "api"}
    for row in rows.values():
        api_key = row["litellm_params"]["api_key"]
        assert api_key.startswith("enc:v1:")
        for plain in (PROVIDER_KEY, "sk-yaml-secret-1111"):
            assert plain not in api_key and plain not in orjson.dumps(row, default=str).decode()
    assert rows[model_id]["model_info"]["id"] == model_id


async def test_model_id_from_the_request_and_duplicates(gateway, fetch, pg_dsn):
    gw = await gateway(db_config(pg_dsn, YAML_MODELS))
    first = body_of(await fetch(gw, "/model/new", {"model_name": "one", "litellm_params": {"model": "mock/1"},
                                                    "model_info": {"id": "my-id"}}))
    assert first["model_id"] == "my-id" and first["model_info"]["id"] == "my-id"
    r = await fetch(gw, "/model/new", {"model_name": "two", "litellm_params": {"model": "mock/2"},
                                       "model_info": {"id": "my-id"}})
    assert r.code == 400
    assert error_of(r)["param"] == "model_info.id" and "my-id" in error_of(r)["message"]
    # a YAML model's id is taken too
    r = await fetch(gw, "/model/new", {"model_name": "three", "litellm_params": {"model": "mock/3"},
                                       "model_info": {"id": "yaml-1"}})
    assert r.code == 400
    rows = table(pg_dsn)
    assert rows["my-id"]["model_name"] == "one" and rows["yaml-1"]["model_name"] == "yaml-model"
    ids = await model_ids(fetch, gw)
    assert "one" in ids and "two" not in ids and "three" not in ids


@pytest.mark.parametrize("body, param", [
    ({}, "model_name"),
    ({"litellm_params": {"model": "mock/x"}}, "model_name"),
    ({"model_name": "x"}, "litellm_params"),
    ({"model_name": "x", "litellm_params": {}}, "litellm_params.model"),
    ({"model_name": "x", "litellm_params": {"model": ""}}, "litellm_params.model"),
    ({"model_name": "", "litellm_params": {"model": "mock/x"}}, "model_name"),
    ({"model_name": 7, "litellm_params": {"model": "mock/x"}}, "model_name"),
    ({"model_name": "x", "litellm_params": "mock/x"}, "litellm_params"),
    ({"model_name": "x", "litellm_params": {"model": "mock/x"}, "model_info": "nope"}, "model_info"),
    ({"model_name": "x", "litellm_params": {"model": "nope/x"}}, "litellm_params.model"),
    ({"model_name": "x", "litellm_params": {"model": "mock/x", "rpm": "lots"}}, "litellm_params"),
    ([], "request_body"),
])
async def test_bad_new_bodies_are_400_with_param(gateway, fetch, pg_dsn, body, param):
    gw = await gateway(db_config(pg_dsn))
    r = await fetch(gw, "/model/new", body)
    assert r.code == 400, r.body
    err = error_of(r)
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert "database model" not in err["message"]
    assert table(pg_dsn) == {}


async def test_bad_json_is_400(gateway, fetch, pg_dsn):
    gw = await gateway(db_config(pg_dsn))
    r = await fetch(gw, "/model/new", raw=b"{not json")
    assert r.code == 400 and error_of(r)["param"] == "request_body"


# --- /model/info ----------------------------------------------------------------------------------------

async def test_model_info_lists_db_models_without_secrets(gateway, fetch, fake_openai, pg_dsn):
    gw = await gateway(db_config(pg_dsn, YAML_MODELS + f"""
  - model_name: yaml-fake
    litellm_params: {{model: openai/gpt-4o-mini, api_base: "{fake_openai.base}", api_key: sk-yaml-secret-2222}}
"""))
    model_id = body_of(await fetch(gw, "/model/new", fake_model(fake_openai, mode="chat")))["model_id"]
    r = await fetch(gw, "/model/info")
    text = r.body.decode()
    data = body_of(r)["data"]
    by_id = {e["model_info"]["id"]: e for e in data}
    assert set(by_id) >= {model_id, "yaml-1"} and len(data) == 3
    entry = by_id[model_id]
    assert entry["model_name"] == "api-fake"
    assert entry["model_info"]["db_model"] is True and entry["model_info"]["mode"] == "chat"
    assert entry["litellm_params"]["model"] == "openai/gpt-4o-mini"
    assert "api_key" not in entry["litellm_params"] or entry["litellm_params"]["api_key"] == "***"
    assert by_id["yaml-1"]["model_info"]["db_model"] is False
    for secret in (PROVIDER_KEY, "sk-yaml-secret-2222", "enc:v1:"):
        assert secret not in text

    one = body_of(await fetch(gw, f"/model/info?litellm_model_id={model_id}"))["data"]
    assert [e["model_info"]["id"] for e in one] == [model_id]
    assert body_of(await fetch(gw, "/v1/model/info"))["data"] == data


# --- /model/update ----------------------------------------------------------------------------------------

async def test_update_merges_params(gateway, fetch, fake_openai, pg_dsn):
    gw = await gateway(db_config(pg_dsn))
    model_id = body_of(await fetch(gw, "/model/new", fake_model(fake_openai, mode="chat")))["model_id"]
    before = table(pg_dsn)[model_id]

    # LiteLLM's shape: the id in model_info, only the params that change
    r = await fetch(gw, "/model/update", {"model_info": {"id": model_id, "team": "blue"},
                                          "litellm_params": {"rpm": 100, "temperature": 0.2}})
    updated = body_of(r)
    assert updated["model_id"] == model_id and updated["model_name"] == "api-fake"
    assert updated["litellm_params"] == {"model": "openai/gpt-4o-mini", "api_base": fake_openai.base,
                                         "api_key": "***", "rpm": 100, "temperature": 0.2}
    assert updated["model_info"] == {"id": model_id, "db_model": True, "mode": "chat", "team": "blue"}
    assert PROVIDER_KEY not in r.body.decode()
    after = table(pg_dsn)[model_id]
    assert after["updated_at"] > before["updated_at"] and after["created_at"] == before["created_at"]
    assert after["litellm_params"]["api_key"].startswith("enc:v1:")

    # the kept key still works, and the new default reaches the provider
    r = await chat(fetch, gw, "api-fake")
    assert r.code == 200, r.body
    sent = fake_openai.received[-1]
    assert sent.headers["authorization"] == f"Bearer {PROVIDER_KEY}" and sent.body["temperature"] == 0.2

    # rename through `id` and PATCH: the old name goes, the new one is served at once
    r = await fetch(gw, "/model/update", {"id": model_id, "model_name": "renamed"}, method="PATCH")
    assert body_of(r)["model_name"] == "renamed"
    ids = await model_ids(fetch, gw)
    assert "renamed" in ids and "api-fake" not in ids
    assert (await chat(fetch, gw, "renamed")).code == 200
    assert (await chat(fetch, gw, "api-fake")).code == 400


async def test_update_can_replace_the_key(gateway, fetch, fake_openai, pg_dsn):
    gw = await gateway(db_config(pg_dsn))
    model_id = body_of(await fetch(gw, "/model/new", fake_model(fake_openai, api_key="sk-wrong-key")))["model_id"]
    assert (await chat(fetch, gw, "api-fake")).code == 401  # the fake refuses the wrong key
    body_of(await fetch(gw, "/model/update", {"model_id": model_id, "litellm_params": {"api_key": PROVIDER_KEY}}))
    r = await chat(fetch, gw, "api-fake")
    assert r.code == 200, r.body


@pytest.mark.parametrize("body, status, param", [
    ({}, 400, "model_info.id"),
    ({"litellm_params": {"rpm": 1}}, 400, "model_info.id"),
    ({"id": "no-such-id"}, 404, "id"),
    ({"model_info": {"id": "no-such-id"}}, 404, "id"),
    ({"id": "yaml-1", "litellm_params": {"rpm": 1}}, 400, "id"),
    ({"id": ""}, 400, "id"),
    ({"id": "API", "litellm_params": {"model": "nope/x"}}, 400, "litellm_params.model"),
    ({"id": "API", "litellm_params": {"rpm": "lots"}}, 400, "litellm_params"),
    ({"id": "API", "model_name": 5}, 400, "model_name"),
])
async def test_bad_updates(gateway, fetch, pg_dsn, body, status, param):
    gw = await gateway(db_config(pg_dsn, YAML_MODELS))
    api_id = body_of(await fetch(gw, "/model/new", {"model_name": "m", "litellm_params": {"model": "mock/m"}}))[
        "model_id"]
    before = table(pg_dsn)
    body = {k: (api_id if v == "API" else v) for k, v in body.items()}
    r = await fetch(gw, "/model/update", body)
    assert r.code == status, r.body
    assert error_of(r)["param"] == param
    assert table(pg_dsn) == before


# --- /model/delete ----------------------------------------------------------------------------------------

async def test_delete_then_delete_again(gateway, fetch, pg_dsn):
    gw = await gateway(db_config(pg_dsn, YAML_MODELS))
    model_id = body_of(await fetch(gw, "/model/new", {"model_name": "doomed", "litellm_params": {"model": "mock/d"}}))[
        "model_id"]
    assert (await chat(fetch, gw, "doomed")).code == 200
    r = await fetch(gw, "/model/delete", {"id": model_id})
    assert body_of(r) == {"message": f"Model: {model_id} deleted successfully"}
    assert model_id not in table(pg_dsn)
    assert "doomed" not in await model_ids(fetch, gw)
    assert (await chat(fetch, gw, "doomed")).code == 400
    r = await fetch(gw, "/model/delete", {"id": model_id})
    assert r.code == 404 and error_of(r)["param"] == "id"


@pytest.mark.parametrize("body, status, param", [
    ({"id": "no-such-id"}, 404, "id"),
    ({"id": "yaml-1"}, 400, "id"),
    ({}, 400, "id"),
    ({"id": ""}, 400, "id"),
    ({"id": 5}, 400, "id"),
])
async def test_bad_deletes(gateway, fetch, pg_dsn, body, status, param):
    gw = await gateway(db_config(pg_dsn, YAML_MODELS))
    r = await fetch(gw, "/model/delete", body)
    assert r.code == status, r.body
    assert error_of(r)["param"] == param
    assert set(table(pg_dsn)) == {"yaml-1"}
    assert "yaml-model" in await model_ids(fetch, gw)


# --- who may call, and storage off ----------------------------------------------------------------------

@pytest.mark.parametrize("path, body", [
    ("/model/new", {"model_name": "x", "litellm_params": {"model": "mock/x"}}),
    ("/model/update", {"id": "yaml-1", "litellm_params": {"rpm": 1}}),
    ("/model/delete", {"id": "yaml-1"}),
    ("/model/info", None),
])
@pytest.mark.parametrize("key", ["sk-not-the-master-key", None])
async def test_model_routes_need_the_master_key(gateway, fetch, pg_dsn, path, body, key):
    gw = await gateway(db_config(pg_dsn, YAML_MODELS))
    before = table(pg_dsn)
    r = await fetch(gw, path, body, key=key)
    assert r.code == 401, r.body
    assert error_of(r)["type"] == "auth_error"
    assert table(pg_dsn) == before


@pytest.mark.parametrize("settings", [
    "",
    "general_settings:\n  store_model_in_db: false\n",
    "general_settings:\n  store_model_in_db: true\n",  # but no database_url
])
@pytest.mark.parametrize("path, body", [
    ("/model/new", {"model_name": "x", "litellm_params": {"model": "mock/x"}}),
    ("/model/update", {"id": "yaml-1", "litellm_params": {"rpm": 1}}),
    ("/model/delete", {"id": "yaml-1"}),
])
async def test_writes_without_database_storage_say_how_to_enable_it(gateway, fetch, settings, path, body):
    gw = await gateway(f"model_list:\n{YAML_MODELS}\n{settings}")
    r = await fetch(gw, path, body)
    assert r.code == 400, r.body
    message = error_of(r)["message"]
    for hint in ("store_model_in_db", "STORE_MODEL_IN_DB", "database_url", "DATABASE_URL"):
        assert hint in message
    # the config file's models keep working, and /model/info still answers
    assert (await chat(fetch, gw, "yaml-model")).code == 200
    info = body_of(await fetch(gw, "/model/info"))["data"]
    assert [e["model_info"]["db_model"] for e in info] == [False]


# --- restarts and the start-up sync ---------------------------------------------------------------------

async def test_api_models_survive_a_restart(gateway, fetch, fake_openai, pg_dsn):
    first = await gateway(db_config(pg_dsn, YAML_MODELS))
    model_id = body_of(await fetch(first, "/model/new", fake_model(fake_openai)))["model_id"]
    await first.stop()

    second = await gateway(db_config(pg_dsn, YAML_MODELS))
    assert {"api-fake", "yaml-model"} <= await model_ids(fetch, second)
    r = await chat(fetch, second, "api-fake")
    assert r.code == 200, r.body
    assert fake_openai.received[-1].headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    info = {e["model_info"]["id"]: e for e in body_of(await fetch(second, "/model/info"))["data"]}
    assert info[model_id]["model_info"]["db_model"] is True


async def test_api_models_need_the_same_key_after_a_restart(gateway, fetch, fake_openai, pg_dsn):
    first = await gateway(db_config(pg_dsn), env={"LITELLM_SALT_KEY": "salt-one"})
    body_of(await fetch(first, "/model/new", fake_model(fake_openai)))
    await first.stop()
    # another salt: the row cannot be decrypted; the model answers a clear 400, nothing crashes
    second = await gateway(db_config(pg_dsn), env={"LITELLM_SALT_KEY": "salt-two"})
    r = await chat(fetch, second, "api-fake")
    assert r.code == 400, r.body
    assert "LITELLM_SALT_KEY" in error_of(r)["message"]
    assert PROVIDER_KEY not in r.body.decode() and not fake_openai.received
    await second.stop()
    # the right salt again: served
    third = await gateway(db_config(pg_dsn), env={"LITELLM_SALT_KEY": "salt-one"})
    assert (await chat(fetch, third, "api-fake")).code == 200


SYNC_MODELS = """
  - model_name: yaml-a
    litellm_params: {model: mock/a, api_key: sk-yaml-a-secret}
  - model_name: yaml-b
    litellm_params: {model: mock/b}
    model_info: {id: yaml-b-id, mode: chat}
"""


async def test_startup_sync_is_idempotent(gateway, fetch, pg_dsn):
    first = await gateway(db_config(pg_dsn, SYNC_MODELS))
    rows = table(pg_dsn)
    assert len(rows) == 2 and {r["source"] for r in rows.values()} == {"yaml"}
    assert "yaml-b-id" in rows
    await first.stop()

    second = await gateway(db_config(pg_dsn, SYNC_MODELS))
    again = table(pg_dsn)
    assert set(again) == set(rows)
    for model_id, row in rows.items():
        assert again[model_id]["updated_at"] == row["updated_at"]
        assert again[model_id]["litellm_params"] == row["litellm_params"]  # not even re-encrypted
    assert {"yaml-a", "yaml-b"} <= await model_ids(fetch, second)

    # a third gateway while the second runs: still nothing rewritten
    await gateway(db_config(pg_dsn, SYNC_MODELS))
    assert {k: r["updated_at"] for k, r in table(pg_dsn).items()} == {k: r["updated_at"] for k, r in rows.items()}


async def test_startup_sync_updates_and_removes_yaml_rows_only(gateway, fetch, pg_dsn):
    first = await gateway(db_config(pg_dsn, SYNC_MODELS))
    api_id = body_of(await fetch(first, "/model/new", {"model_name": "api-m", "litellm_params": {
        "model": "mock/api", "api_key": "sk-api-secret"}}))["model_id"]
    before = table(pg_dsn)
    await first.stop()

    changed = """
  - model_name: yaml-b
    litellm_params: {model: mock/b, rpm: 7}
    model_info: {id: yaml-b-id, mode: chat}
"""
    second = await gateway(db_config(pg_dsn, changed))
    after = table(pg_dsn)
    assert set(after) == {"yaml-b-id", api_id}  # yaml-a is gone from the file, so from the table
    assert after["yaml-b-id"]["litellm_params"] == {"model": "mock/b", "rpm": 7}
    assert after["yaml-b-id"]["updated_at"] > before["yaml-b-id"]["updated_at"]
    assert after[api_id] == before[api_id]  # the API model is untouched
    ids = await model_ids(fetch, second)
    assert "yaml-a" not in ids and {"yaml-b", "api-m"} <= ids
    assert (await chat(fetch, second, "yaml-a")).code == 400
    assert (await chat(fetch, second, "api-m")).code == 200

    # an empty model_list removes every YAML row and still leaves the API model alone
    await second.stop()
    await gateway(db_config(pg_dsn))
    assert set(table(pg_dsn)) == {api_id}


async def test_a_model_stored_with_another_key_can_be_fixed_by_update(gateway, fetch, fake_openai, pg_dsn):
    first = await gateway(db_config(pg_dsn), env={"LITELLM_SALT_KEY": "salt-one"})
    model_id = body_of(await fetch(first, "/model/new", fake_model(fake_openai, api_key="sk-lost-key")))["model_id"]
    await first.stop()
    gw = await gateway(db_config(pg_dsn), env={"LITELLM_SALT_KEY": "salt-two"})
    # merging other params into a secret that cannot be read is refused, clearly, naming it
    r = await fetch(gw, "/model/update", {"id": model_id, "litellm_params": {"rpm": 5}})
    assert r.code == 400, r.body
    err = error_of(r)
    assert err["param"] == "litellm_params.api_key" and "LITELLM_SALT_KEY" in err["message"]
    # sending the secret again re-encrypts it with the current key: served again
    r = await fetch(gw, "/model/update", {"id": model_id, "litellm_params": {"api_key": PROVIDER_KEY}})
    assert r.code == 200, r.body
    assert (await chat(fetch, gw, "api-fake")).code == 200
    assert fake_openai.received[-1].headers["authorization"] == f"Bearer {PROVIDER_KEY}"


async def test_a_pool_of_one_connection_is_enough(gateway, fetch, pg_dsn):
    """The start-up lock must not hold the pool's only connection while migrating and syncing."""
    gw = await gateway(db_config(pg_dsn, YAML_MODELS, "  database_connection_pool_limit: 1"))
    assert set(table(pg_dsn)) == {"yaml-1"}
    body_of(await fetch(gw, "/model/new", {"model_name": "pool-one", "litellm_params": {"model": "mock/p"}}))
    assert (await chat(fetch, gw, "pool-one")).code == 200
    r = await fetch(gw, "/health/readiness", key=None)
    assert orjson.loads(r.body)["db"] == "connected"
