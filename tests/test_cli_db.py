"""`proxyctl db migrate` and `proxyctl sync [--dry-run]` through click's CliRunner, against a real
PostgreSQL; exit status non-zero on any error."""

from __future__ import annotations

import asyncio
import textwrap

import psycopg2
import pytest
from click.testing import CliRunner

from tornado_proxy.cli import cli
from tornado_proxy.config import resource_dir
from tornado_proxy.crypt import Cipher
from tornado_proxy.db import Database, migrations
from tornado_proxy.modelstore import ModelStore

from .conftest import MASTER_KEY
from .test_e2e_model_api import db_config, table

OLD_KEY = "sk-cli-old-secret-1111"
NEW_KEY = "sk-cli-new-secret-2222"
ADDED_KEY = "sk-cli-added-secret-3333"
UNREACHABLE = "host=127.0.0.1 port=1 user=postgres password=hunter2-not-shown dbname=x connect_timeout=2"

BEFORE = f"""
  - model_name: kept
    litellm_params: {{model: mock/kept}}
    model_info: {{id: kept-id}}
  - model_name: rotated
    litellm_params: {{model: openai/gpt-4o, api_key: {OLD_KEY}}}
    model_info: {{id: rotated-id}}
  - model_name: dropped
    litellm_params: {{model: mock/dropped}}
    model_info: {{id: dropped-id}}
"""

AFTER = f"""
  - model_name: kept
    litellm_params: {{model: mock/kept}}
    model_info: {{id: kept-id}}
  - model_name: rotated
    litellm_params: {{model: openai/gpt-4o, api_key: {NEW_KEY}}}
    model_info: {{id: rotated-id}}
  - model_name: fresh
    litellm_params: {{model: openai/gpt-4o-mini, api_key: os.environ/FRESH_KEY}}
    model_info: {{id: fresh-id}}
"""


@pytest.fixture
def proxyctl(tmp_path, monkeypatch):
    """``proxyctl(args, config_text)`` -> click Result; the environment holds only what a test gives."""
    for name in ("DATABASE_URL", "STORE_MODEL_IN_DB", "LITELLM_SALT_KEY", "LITELLM_MASTER_KEY", "CONFIG_FILE_PATH",
                 "FRESH_KEY"):
        monkeypatch.delenv(name, raising=False)
    runner = CliRunner()
    count = 0

    def run(args: list[str], config: str | None = None, env: dict | None = None):
        nonlocal count
        if config is not None:
            count += 1
            path = tmp_path / f"config{count}.yaml"
            path.write_text(textwrap.dedent(config))
            args = [*args, "--config", str(path)]
        environ = {"LITELLM_MASTER_KEY": MASTER_KEY, "FRESH_KEY": ADDED_KEY}
        environ.update(env or {})
        return runner.invoke(cli, args, env=environ)
    return run


def tables(dsn: str) -> set[str]:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            return {r[0] for r in cur.fetchall()}
    finally:
        conn.close()


def add_api_model(dsn: str) -> None:
    async def add():
        db = Database(dsn)
        try:
            store = ModelStore(db, Cipher(MASTER_KEY), {})
            await db.insert_model(store.checked_row({"model_name": "api-model", "litellm_params": {
                "model": "mock/api", "api_key": "sk-api-secret"}}, "api-id"))
        finally:
            await db.close()
    asyncio.run(add())


# --- db migrate -----------------------------------------------------------------------------------------

def test_db_migrate_from_empty_then_up_to_date(proxyctl, empty_pg_dsn):
    names = [p.name for _, p in migrations(resource_dir("sql"))]
    first = proxyctl(["db", "migrate"], db_config(empty_pg_dsn))
    assert first.exit_code == 0, first.output
    assert first.output.splitlines() == [f"applied {n}" for n in names] + [
        f"schema up to date ({len(names)} migrations)"]
    assert {"schema_migrations", "proxy_models"} <= tables(empty_pg_dsn)

    again = proxyctl(["db", "migrate"], db_config(empty_pg_dsn))
    assert again.exit_code == 0, again.output
    assert again.output.splitlines() == [f"schema up to date ({len(names)} migrations)"]


def test_db_migrate_needs_no_master_key(proxyctl, empty_pg_dsn):
    result = proxyctl(["db", "migrate"], db_config(empty_pg_dsn), env={"LITELLM_MASTER_KEY": None})
    assert result.exit_code == 0, result.output
    assert "proxy_models" in tables(empty_pg_dsn)


def test_db_migrate_reads_database_url_from_the_environment(proxyctl, empty_pg_dsn):
    result = proxyctl(["db", "migrate"], "model_list: []\n", env={"DATABASE_URL": empty_pg_dsn})
    assert result.exit_code == 0, result.output
    assert "proxy_models" in tables(empty_pg_dsn)


# --- sync --------------------------------------------------------------------------------------------------

def test_sync_dry_run_prints_the_diff_and_changes_nothing(proxyctl, pg_dsn):
    assert proxyctl(["sync"], db_config(pg_dsn, BEFORE)).exit_code == 0
    add_api_model(pg_dsn)
    before = table(pg_dsn)

    result = proxyctl(["sync", "--dry-run"], db_config(pg_dsn, AFTER))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[-1] == "3 model(s) would change"
    diff = sorted(lines[:-1])
    assert [line[:2] for line in diff] == ["+ ", "- ", "~ "]
    assert "fresh (fresh-id)" in diff[0] and "dropped (dropped-id)" in diff[1] and "rotated (rotated-id)" in diff[2]
    assert "***" in diff[0] and "***" in diff[2]
    for secret in (OLD_KEY, NEW_KEY, ADDED_KEY, "sk-api-secret", "enc:v1:", MASTER_KEY):
        assert secret not in result.output
    assert "api-id" not in result.output and "kept" not in result.output
    assert table(pg_dsn) == before  # nothing written, not even updated_at


def test_sync_applies_the_diff_then_is_in_sync(proxyctl, pg_dsn):
    assert proxyctl(["sync"], db_config(pg_dsn, BEFORE)).exit_code == 0
    add_api_model(pg_dsn)
    before = table(pg_dsn)

    result = proxyctl(["sync"], db_config(pg_dsn, AFTER))
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == "3 model(s) changed"
    for secret in (OLD_KEY, NEW_KEY, ADDED_KEY, "enc:v1:"):
        assert secret not in result.output

    after = table(pg_dsn)
    assert set(after) == {"kept-id", "rotated-id", "fresh-id", "api-id"}
    assert after["kept-id"] == before["kept-id"] and after["api-id"] == before["api-id"]
    cipher = Cipher(MASTER_KEY)
    for model_id, key in (("rotated-id", NEW_KEY), ("fresh-id", ADDED_KEY)):
        stored = after[model_id]["litellm_params"]["api_key"]
        assert stored.startswith("enc:v1:") and key not in stored
        assert cipher.decrypt(stored) == key  # the gateway (same master key) can read it
    assert after["rotated-id"]["updated_at"] > before["rotated-id"]["updated_at"]
    assert {r["source"] for k, r in after.items() if k != "api-id"} == {"yaml"}

    again = proxyctl(["sync"], db_config(pg_dsn, AFTER))
    assert again.exit_code == 0, again.output
    assert again.output.splitlines() == ["database already in sync"]
    assert table(pg_dsn) == after
    dry = proxyctl(["sync", "--dry-run"], db_config(pg_dsn, AFTER))
    assert dry.exit_code == 0 and dry.output.splitlines() == ["database already in sync"]


def test_sync_with_the_salt_key(proxyctl, pg_dsn):
    result = proxyctl(["sync"], db_config(pg_dsn, AFTER), env={"LITELLM_SALT_KEY": "the-salt"})
    assert result.exit_code == 0, result.output
    stored = table(pg_dsn)["fresh-id"]["litellm_params"]["api_key"]
    assert Cipher("the-salt").decrypt(stored) == ADDED_KEY


def test_sync_migrates_an_empty_database(proxyctl, empty_pg_dsn):
    result = proxyctl(["sync"], db_config(empty_pg_dsn, BEFORE))
    assert result.exit_code == 0, result.output
    assert set(table(empty_pg_dsn)) == {"kept-id", "rotated-id", "dropped-id"}


def test_dry_run_on_an_unmigrated_database_creates_nothing(proxyctl, empty_pg_dsn):
    proxyctl(["sync", "--dry-run"], db_config(empty_pg_dsn, BEFORE))
    assert tables(empty_pg_dsn) == set()


# --- failures: non-zero exit, a clear reason, no secrets ---------------------------------------------------

@pytest.mark.parametrize("args", [["sync"], ["sync", "--dry-run"], ["db", "migrate"]])
def test_unreachable_database_exits_non_zero(proxyctl, args):
    result = proxyctl(args, db_config(UNREACHABLE, BEFORE))
    assert result.exit_code != 0
    assert "database unavailable" in result.output
    assert "hunter2" not in result.output and OLD_KEY not in result.output


@pytest.mark.parametrize("args", [["sync"], ["db", "migrate"]])
def test_missing_database_exits_non_zero(proxyctl, pg_server, args):
    import psycopg2.extensions
    dsn = psycopg2.extensions.make_dsn(pg_server, dbname="tp_no_such_database_here")
    result = proxyctl(args, db_config(dsn, BEFORE))
    assert result.exit_code != 0
    assert "database unavailable" in result.output


@pytest.mark.parametrize("args", [["sync"], ["sync", "--dry-run"], ["db", "migrate"]])
def test_no_database_url_exits_non_zero(proxyctl, args):
    result = proxyctl(args, f"model_list:\n{BEFORE}")
    assert result.exit_code != 0
    assert "database_url" in result.output and "DATABASE_URL" in result.output


def test_sync_without_a_key_to_encrypt_with_exits_non_zero(proxyctl, pg_dsn):
    result = proxyctl(["sync"], db_config(pg_dsn, BEFORE), env={"LITELLM_MASTER_KEY": None})
    assert result.exit_code != 0
    assert "LITELLM_SALT_KEY" in result.output
    assert table(pg_dsn) == {}


@pytest.mark.parametrize("config", [
    "model_list: [{model_name: x}]\n",  # no litellm_params
    "model_list:\n  - model_name: x\n    litellm_params: {model: mock/x, rpm: lots}\n",
    "model_list: [\n",
])
def test_sync_with_a_broken_file_exits_non_zero_and_writes_nothing(proxyctl, pg_dsn, config):
    result = proxyctl(["sync"], config + f'general_settings:\n  database_url: "{pg_dsn}"\n')
    assert result.exit_code != 0
    assert table(pg_dsn) == {}


def test_sync_with_a_missing_file_exits_non_zero(proxyctl, tmp_path):
    result = proxyctl(["sync", "--config", str(tmp_path / "nope.yaml")])
    assert result.exit_code != 0 and "no such file" in result.output


def test_sync_while_another_instance_holds_the_startup_lock(proxyctl, pg_dsn):
    """Waiting for the lock is bounded by the statement timeout: a clean non-zero exit, not a hang
    or a traceback; once the lock is free, sync works."""
    from tornado_proxy.db import LOCK_ID

    holder = psycopg2.connect(pg_dsn)
    try:
        holder.cursor().execute("SELECT pg_advisory_lock(%s)", (LOCK_ID,))
        config = db_config(pg_dsn, BEFORE, "  database_connection_timeout: 0.5")
        result = proxyctl(["sync"], config)
        assert result.exit_code == 1, result.output
        assert result.output.startswith("Error: database unavailable:") and "timed out" in result.output
        assert table(pg_dsn) == {}
    finally:
        holder.close()
    result = proxyctl(["sync"], config)
    assert result.exit_code == 0, result.output
    assert set(table(pg_dsn)) == {"kept-id", "rotated-id", "dropped-id"}


# --- keys --------------------------------------------------------------------------------------------------

def test_keys_create_list_block_delete(proxyctl, pg_dsn, caplog):
    created = proxyctl(["keys", "create", "--alias", "ops", "--model", "a", "--model", "b", "--max-budget", "3"],
                       db_config(pg_dsn))
    assert created.exit_code == 0, created.output
    key = created.output.strip()
    assert key.startswith("sk-")
    listed = proxyctl(["keys", "list"], db_config(pg_dsn))
    assert listed.exit_code == 0 and key not in listed.output
    assert "alias=ops" in listed.output and f"sk-...{key[-4:]}" in listed.output and "active" in listed.output
    assert proxyctl(["keys", "block", key], db_config(pg_dsn)).output.strip() == "blocked"
    assert "BLOCKED" in proxyctl(["keys", "list"], db_config(pg_dsn)).output
    assert proxyctl(["keys", "block", "--unblock", key], db_config(pg_dsn)).output.strip() == "unblocked"
    assert proxyctl(["keys", "delete", key], db_config(pg_dsn)).output.strip() == "deleted"
    gone = proxyctl(["keys", "delete", key], db_config(pg_dsn))
    assert gone.exit_code != 0 and "no such key" in gone.output
    assert proxyctl(["keys", "list"], db_config(pg_dsn)).output == ""
    assert all(key not in r.getMessage() for r in caplog.records)
