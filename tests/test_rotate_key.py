"""`proxyctl db rotate-key`: every stored secret re-encrypted from the current key to a new one in
one transaction; refused (changing nothing, naming model ids, never values) when a secret does not
decrypt; gateways started with the new key serve, one started with the old key reports the
secrets it cannot decrypt, and one already running with the old key keeps serving."""

from __future__ import annotations

import asyncio
import textwrap
import uuid

import orjson
import psycopg2
import pytest
from click.testing import CliRunner

from tornado_proxy.cli import cli
from tornado_proxy.config import is_secret_name
from tornado_proxy.crypt import JSON_PREFIX, PREFIX, Cipher, DecryptError, sealed_count
from tornado_proxy.modelstore import ModelRow, RotationError, rotation

from .conftest import MASTER_KEY, PROVIDER_KEY, wait_for
from .test_e2e_model_api import db_config, fake_model, table

OLD, NEW = "salt-one-for-rotation", "salt-two-for-rotation"


# --- pure --------------------------------------------------------------------------------------------------------

def test_reseal_moves_every_encrypted_value_to_the_new_key():
    old, new = Cipher(OLD), Cipher(NEW)
    params = {"model": "openai/x", "api_key": PROVIDER_KEY, "vertex_credentials": {"type": "service_account"},
              "extra_headers": {"Authorization": "Bearer inner-secret", "X-Title": "t"}, "rpm": 5}
    sealed = old.seal(params, is_secret_name)
    assert sealed_count(sealed) == 3
    moved = old.reseal(sealed, new)
    assert moved["model"] == "openai/x" and moved["rpm"] == 5 and moved["extra_headers"]["X-Title"] == "t"
    assert moved["api_key"].startswith(PREFIX) and moved["vertex_credentials"].startswith(JSON_PREFIX)
    assert new.open(moved) == params
    with pytest.raises(DecryptError):
        old.open(moved)
    plain = {"api_key": "sk-written-plain-by-an-old-tool"}
    assert old.reseal(plain, new) == plain  # plain values stay as they are


def test_rotation_refuses_naming_the_rows_that_do_not_decrypt():
    old, other = Cipher(OLD), Cipher("some-other-key")
    good = ModelRow("good", "m", old.seal({"model": "openai/x", "api_key": "k1"}, is_secret_name), {}, "api")
    bad = ModelRow("bad", "m", other.seal({"model": "openai/x", "api_key": "k2"}, is_secret_name), {}, "api")
    free = ModelRow("no-secret", "m", {"model": "mock/x"}, {}, "yaml")
    with pytest.raises(RotationError) as info:
        rotation([good, bad, free], old, Cipher(NEW))
    assert info.value.model_ids == ["bad"] and "k2" not in str(info.value)
    changes = rotation([good, free], old, Cipher(NEW))
    assert set(changes) == {"good"} and Cipher(NEW).open(changes["good"])["api_key"] == "k1"


# --- the command ----------------------------------------------------------------------------------------------

def config_file(tmp_path, dsn: str) -> str:
    path = tmp_path / f"c-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(textwrap.dedent(db_config(dsn)))
    return str(path)


def rotate(tmp_path, dsn: str, args: list[str], env: dict | None = None, input: str | None = None):
    environ = {"LITELLM_MASTER_KEY": MASTER_KEY, "LITELLM_SALT_KEY": OLD, "DATABASE_URL": None,
               "NEW_LITELLM_SALT_KEY": None}
    environ.update(env or {})
    return CliRunner().invoke(cli, ["db", "rotate-key", "-c", config_file(tmp_path, dsn), *args], env=environ,
                              input=input)


async def chat(fetch, gw, model: str):
    return await fetch(gw, "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}]})


def stored_keys(dsn: str) -> dict[str, str]:
    return {model_id: row["litellm_params"]["api_key"] for model_id, row in table(dsn).items()}


async def test_rotate_then_restart_with_the_new_key(gateway, fetch, fake_openai, pg_dsn, tmp_path, caplog):
    config = db_config(pg_dsn)
    running = await gateway(config, env={"LITELLM_SALT_KEY": OLD})
    ids = []
    for name in ("stored-a", "stored-b"):
        r = await fetch(running, "/model/new", fake_model(fake_openai, name=name))
        assert r.code == 200, r.body
        ids.append(orjson.loads(r.body)["model_id"])
    assert (await chat(fetch, running, "stored-a")).code == 200
    before = table(pg_dsn)

    caplog.clear()
    result = await asyncio.to_thread(rotate, tmp_path, pg_dsn, ["--new-key-env", "NEW_LITELLM_SALT_KEY"],
                                     {"NEW_LITELLM_SALT_KEY": NEW})
    assert result.exit_code == 0, result.output
    assert result.output.startswith("re-encrypted 2 secret(s) of 2 model(s)")
    assert NEW not in result.output and OLD not in result.output and PROVIDER_KEY not in result.output
    after = table(pg_dsn)
    for model_id in ids:
        assert Cipher(NEW).decrypt(after[model_id]["litellm_params"]["api_key"]) == PROVIDER_KEY
        with pytest.raises(DecryptError):
            Cipher(OLD).decrypt(after[model_id]["litellm_params"]["api_key"])
        assert after[model_id]["updated_at"] == before[model_id]["updated_at"]  # the model itself did not change

    # the instance still running with the old key hears of the change and keeps what it loaded
    await wait_for(lambda: "keep being served" in caplog.text, 15)
    assert (await chat(fetch, running, "stored-b")).code == 200

    restarted = await gateway(config, env={"LITELLM_SALT_KEY": NEW})
    reply = await chat(fetch, restarted, "stored-a")
    assert reply.code == 200, reply.body
    assert orjson.loads(reply.body)["choices"][0]["message"]["content"] == "echo: hi"

    caplog.clear()
    stale = await gateway(config, env={"LITELLM_SALT_KEY": OLD})
    await wait_for(lambda: any(r.getMessage().startswith("2 stored model(s) cannot be decrypted")
                               and "keep being served" not in r.getMessage() for r in caplog.records), 15)
    assert all(model_id in caplog.text for model_id in ids) and PROVIDER_KEY not in caplog.text
    refused = await chat(fetch, stale, "stored-a")
    assert refused.code == 400 and "cannot be decrypted" in orjson.loads(refused.body)["error"]["message"]


def test_rotation_is_refused_when_a_secret_does_not_decrypt(pg_dsn, tmp_path):
    from tornado_proxy.db import Database
    from tornado_proxy.modelstore import ModelStore

    async def add(model_id: str, key: str, secret: str):
        db = Database(pg_dsn)
        try:
            store = ModelStore(db, Cipher(key), {})
            await db.insert_model(store.checked_row({"model_name": model_id, "litellm_params": {
                "model": "openai/gpt-4o", "api_key": secret}}, model_id))
        finally:
            await db.close()
    asyncio.run(add("fine", OLD, "sk-fine-secret"))
    asyncio.run(add("foreign", "a-key-nobody-has", "sk-foreign-secret"))
    before = table(pg_dsn)
    result = rotate(tmp_path, pg_dsn, ["--new-key", NEW])
    assert result.exit_code == 1
    assert "1 model(s) have secrets that do not decrypt with the current key (LITELLM_SALT_KEY): foreign" \
        in result.output and "Nothing was changed" in result.output
    for secret in ("sk-fine-secret", "sk-foreign-secret", OLD, NEW, "enc:v1:"):
        assert secret not in result.output
    assert table(pg_dsn) == before


def test_the_new_key_from_a_prompt_and_the_master_key_as_the_current_one(pg_dsn, tmp_path):
    from tornado_proxy.db import Database
    from tornado_proxy.modelstore import ModelStore

    async def add():
        db = Database(pg_dsn)
        try:
            store = ModelStore(db, Cipher(MASTER_KEY), {})
            await db.insert_model(store.checked_row({"model_name": "m", "litellm_params": {
                "model": "openai/gpt-4o", "api_key": PROVIDER_KEY}}, "by-master"))
        finally:
            await db.close()
    asyncio.run(add())
    mismatch = rotate(tmp_path, pg_dsn, [], env={"LITELLM_SALT_KEY": None}, input=f"{NEW}\nsomething-else\n")
    assert mismatch.exit_code != 0 and table(pg_dsn)["by-master"]["litellm_params"]["api_key"].startswith(PREFIX)
    result = rotate(tmp_path, pg_dsn, [], env={"LITELLM_SALT_KEY": None}, input=f"{NEW}\n{NEW}\n")
    assert result.exit_code == 0, result.output
    assert NEW not in result.output.replace("New key", "")
    assert Cipher(NEW).decrypt(stored_keys(pg_dsn)["by-master"]) == PROVIDER_KEY


@pytest.mark.parametrize("args, env, message", [
    (["--new-key", OLD], {}, "the new key is the current key"),
    (["--new-key-env", "NEW_LITELLM_SALT_KEY"], {}, "NEW_LITELLM_SALT_KEY is not set"),
    (["--new-key-env", "NEW_LITELLM_SALT_KEY", "--new-key", NEW], {"NEW_LITELLM_SALT_KEY": NEW}, "not both"),
    (["--new-key", NEW], {"LITELLM_SALT_KEY": None, "LITELLM_MASTER_KEY": None}, "LITELLM_SALT_KEY"),
])
def test_rotation_refusals(pg_dsn, tmp_path, args, env, message):
    result = rotate(tmp_path, pg_dsn, args, env=env)
    assert result.exit_code != 0 and message in result.output, result.output


def test_rotation_against_an_unreachable_database(tmp_path):
    dsn = "host=127.0.0.1 port=1 user=postgres password=hunter2-not-shown dbname=x connect_timeout=2"
    result = rotate(tmp_path, dsn, ["--new-key", NEW])
    assert result.exit_code == 1 and "database unavailable" in result.output and "hunter2" not in result.output


def test_no_stored_model_rotates_nothing(pg_dsn, tmp_path):
    result = rotate(tmp_path, pg_dsn, ["--new-key", NEW])
    assert result.exit_code == 0 and result.output.startswith("re-encrypted 0 secret(s) of 0 model(s)")
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM proxy_models")
        assert cur.fetchone() == (0,)
