"""`proxyctl db dump` / `db restore` against the real PostgreSQL: every table of the schema is
covered, a database filled through the gateway round-trips row for row (and its restored model
still decrypts and serves), values of every type come back exactly, and restore refuses what it
must (a database holding data, a newer format or schema, a damaged file) without writing."""

from __future__ import annotations

import asyncio
import gzip
import os
import stat
import textwrap
import uuid
from decimal import Decimal
from pathlib import Path

import orjson
import psycopg2
import psycopg2.extras
import pytest
from click.testing import CliRunner

from tornado_proxy import backup
from tornado_proxy.cli import cli
from tornado_proxy.config import resource_dir
from tornado_proxy.db import Database, schema_tables
from tornado_proxy.dumpfile import DumpError

from .conftest import MASTER_KEY, PROVIDER_KEY, wait_for
from .test_e2e_model_api import db_config, fake_model

SQL = resource_dir("sql")
SALT = "salt-for-the-backup-test"
MODELS = """
  - model_name: cheap
    litellm_params: {model: mock/cheap, input_cost_per_token: 0.001, output_cost_per_token: 0.002}
"""


def query(dsn: str, sql: str, args=()) -> list[tuple]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchall() if cur.description else []


def public_tables(dsn: str) -> set[str]:
    return {r[0] for r in query(dsn, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}


def rows_as_text(dsn: str, table: str) -> list[str]:
    """Every row in PostgreSQL's own text form (floats with every digit), sorted."""
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SET extra_float_digits = 3; SET TimeZone = 'UTC'")
        cur.execute(f'SELECT whole_row::text FROM "{table}" AS whole_row')
        return sorted(r[0] for r in cur.fetchall())


def run_cli(args: list[str], env: dict | None = None, input: str | None = None):
    environ = {"LITELLM_MASTER_KEY": MASTER_KEY, "DATABASE_URL": None, "LITELLM_SALT_KEY": None,
               "CONFIG_FILE_PATH": None, "STORE_MODEL_IN_DB": None}
    environ.update(env or {})
    return CliRunner().invoke(cli, args, env=environ, input=input)


async def cli_async(args: list[str], env: dict | None = None, input: str | None = None):
    """The CLI runs its own event loop: from an async test, in a thread."""
    return await asyncio.to_thread(run_cli, args, env, input)


def config_file(tmp_path: Path, text: str = "model_list: []\n") -> str:
    path = tmp_path / f"c-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def dump_lines(path: Path) -> list:
    with gzip.open(path, "rb") as f:
        return [orjson.loads(line) for line in f]


# --- the tables ----------------------------------------------------------------------------------------------

def test_every_table_of_a_migrated_database_is_a_schema_table(empty_pg_dsn):
    """A table the migrations create that `schema_tables` (what dump covers) misses fails here."""
    async def migrate():
        db = Database(empty_pg_dsn)
        try:
            await db.migrate(SQL)
        finally:
            await db.close()
    asyncio.run(migrate())
    assert public_tables(empty_pg_dsn) - {"schema_migrations"} == set(schema_tables(SQL))


def test_schema_tables_follow_create_drop_and_rename(tmp_path):
    (tmp_path / "0001_a.sql").write_text(
        'CREATE TABLE IF NOT EXISTS public."Mixed" (x int); -- CREATE TABLE in_a_comment (x int)\n'
        "/* CREATE TABLE in_a_block (x int) */ create unlogged table gone (y int); CREATE TABLE renamed (z int);")
    (tmp_path / "0002_b.sql").write_text("DROP TABLE IF EXISTS gone, other CASCADE;\n"
                                         "ALTER TABLE renamed RENAME TO kept; ALTER TABLE kept RENAME COLUMN z TO w;")
    assert schema_tables(tmp_path, "0001") == ["Mixed", "gone", "renamed"]
    assert schema_tables(tmp_path) == ["Mixed", "kept"]


def test_dependency_order_puts_referenced_tables_first():
    tables = ["keys", "members", "teams", "logs"]
    refs = [("keys", "teams"), ("members", "teams"), ("keys", "keys"), ("x", "teams")]
    assert backup.dependency_order(tables, refs) == ["teams", "keys", "members", "logs"]
    assert backup.dependency_order(["a", "b"], [("a", "b"), ("b", "a")]) == ["a", "b"]  # a cycle: as given


# --- the round trip through the gateway's own paths ----------------------------------------------------------

def ok(response) -> dict:
    assert response.code == 200, response.body
    return orjson.loads(response.body)


async def fill_through_the_gateway(gw, fetch, fake, dsn: str) -> dict:
    model = ok(await fetch(gw, "/model/new", fake_model(fake, name="api-fake")))
    team = ok(await fetch(gw, "/team/new", {"team_alias": "ops", "max_budget": 10.5, "models": ["cheap", "api-fake"],
                                            "metadata": {"cost_center": "é-42"}, "budget_duration": "30d"}))
    ok(await fetch(gw, "/user/new", {"user_id": "u1", "user_email": "u1@example.com", "max_budget": 3}))
    ok(await fetch(gw, "/team/member_add", {"team_id": team["team_id"], "member": {"role": "user", "user_id": "u1"}}))
    key = ok(await fetch(gw, "/key/generate", {"team_id": team["team_id"], "user_id": "u1", "key_alias": "app",
                                               "duration": "30d", "max_budget": 5, "models": ["cheap", "api-fake"]}))
    for text in ("one", "two", "three"):
        ok(await fetch(gw, "/v1/chat/completions", {"model": "cheap", "messages": [{"role": "user", "content": text}]},
                       key=key["key"]))
    ok(await fetch(gw, "/v1/chat/completions", {"model": "api-fake", "messages": [{"role": "user", "content": "x"}]},
                   key=key["key"]))

    def written() -> bool:
        logs = query(dsn, "SELECT count(*) FROM proxy_spend_logs")[0][0]
        return logs == 4 and query(dsn, "SELECT spend FROM proxy_keys WHERE key_alias = 'app'")[0][0] > 0
    await wait_for(written, 15)
    return {"model_id": model["model_id"], "key": key["key"]}


async def test_round_trip_of_a_database_filled_through_the_gateway(gateway, fetch, fake_openai, pg_dsn,
                                                                   empty_pg_dsn, tmp_path):
    env = {"LITELLM_SALT_KEY": SALT}
    gw = await gateway(db_config(pg_dsn, MODELS), env=env)
    made = await fill_through_the_gateway(gw, fetch, fake_openai, pg_dsn)
    await gw.stop()  # the spend writer has flushed

    path = tmp_path / "gateway.dump.gz"
    dumped = await cli_async(["db", "dump", "--include-spend-logs", str(path), "-c", config_file(tmp_path),
                              "--database-url", pg_dsn])
    assert dumped.exit_code == 0, dumped.output
    assert "proxy_spend_logs: 4 rows" in dumped.output and "proxy_models: 2 rows" in dumped.output
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # key hashes and encrypted secrets: owner only
    text = gzip.decompress(path.read_bytes()).decode()
    assert PROVIDER_KEY not in text and SALT not in text and made["key"] not in text  # never decrypted
    assert "enc:v1:" in text

    restored = await cli_async(["db", "restore", str(path), "-c", config_file(tmp_path)],
                               env={"DATABASE_URL": empty_pg_dsn, **env})
    assert restored.exit_code == 0, restored.output
    assert "4 rows" in restored.output and "warning" not in restored.output
    for table in schema_tables(SQL):
        assert rows_as_text(empty_pg_dsn, table) == rows_as_text(pg_dsn, table), table
    assert query(empty_pg_dsn, "SELECT version, name FROM schema_migrations ORDER BY 1") == \
        query(pg_dsn, "SELECT version, name FROM schema_migrations ORDER BY 1")

    # the restored gateway: same salt key, the restored virtual key, the restored model's secret
    served_before = fake_openai.count("/chat/completions")
    again = await gateway(db_config(empty_pg_dsn, MODELS), env=env)
    reply = ok(await fetch(again, "/v1/chat/completions", {"model": "api-fake", "messages": [
        {"role": "user", "content": "after restore"}]}, key=made["key"]))
    assert reply["choices"][0]["message"]["content"] == "echo: after restore"
    assert fake_openai.count("/chat/completions") == served_before + 1


def test_restore_with_another_salt_key_warns_naming_the_models(pg_dsn, empty_pg_dsn, tmp_path):
    from tornado_proxy.crypt import Cipher
    from tornado_proxy.modelstore import ModelStore

    async def add():
        db = Database(pg_dsn)
        try:
            store = ModelStore(db, Cipher(SALT), {})
            await db.insert_model(store.checked_row({"model_name": "m", "litellm_params": {
                "model": "openai/gpt-4o", "api_key": PROVIDER_KEY}}, "model-one"))
        finally:
            await db.close()
    asyncio.run(add())
    path = tmp_path / "d.gz"
    assert run_cli(["db", "dump", str(path), "--database-url", pg_dsn, "-c", config_file(tmp_path)]).exit_code == 0
    result = run_cli(["db", "restore", str(path), "--database-url", empty_pg_dsn, "-c", config_file(tmp_path)],
                     env={"LITELLM_SALT_KEY": "another-salt"})
    assert result.exit_code == 0, result.output
    assert "do not decrypt" in result.output and "model-one" in result.output and PROVIDER_KEY not in result.output


# --- the spend log: only when asked, and only the dates asked for ---------------------------------------------

def spend_rows(dsn: str, days_ago: list[int]) -> None:
    for i, days in enumerate(days_ago):
        query(dsn, "INSERT INTO proxy_spend_logs (request_id, call_type, start_time, end_time, status) "
                   "VALUES (%s, 'acompletion', now() - make_interval(days => %s), now(), 'success')",
              (f"req-{i}-{days}d", days))


def test_spend_logs_only_with_the_flag_and_within_since_until(pg_dsn, tmp_path):
    import datetime as dt

    spend_rows(pg_dsn, [1, 10, 40])
    plain, some = tmp_path / "plain.gz", tmp_path / "some.gz"
    assert run_cli(["db", "dump", str(plain), "--database-url", pg_dsn, "-c", config_file(tmp_path)]).exit_code == 0
    header = dump_lines(plain)[0]
    assert "proxy_spend_logs" not in header["tables"] and header["excluded"] == ["proxy_spend_logs"]
    assert header["format"] == "tornado-proxy-dump" and header["format_version"] == 1
    assert header["schema_version"] == backup.known_versions(SQL)[-1]
    assert set(header["tables"]) == set(schema_tables(SQL)) - {"proxy_spend_logs"}

    today = dt.datetime.now(dt.timezone.utc).date()
    since, until = (today - dt.timedelta(days=20)).isoformat(), (today - dt.timedelta(days=5)).isoformat()
    result = run_cli(["db", "dump", "--include-spend-logs", "--since", since, "--until", until, str(some),
                      "--database-url", pg_dsn, "-c", config_file(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = dump_lines(some)
    start = next(i for i, line in enumerate(lines)
                 if isinstance(line, dict) and line.get("table") == "proxy_spend_logs")
    assert lines[start + 1][0] == "req-1-10d" and lines[start + 2] == {"end": "proxy_spend_logs", "rows": 1}
    assert lines[0]["spend_logs"] == {"included": True, "since": f"{since}T00:00:00+00:00",
                                      "until": f"{until}T00:00:00+00:00"}

    refused = run_cli(["db", "dump", "--since", since, str(tmp_path / "x.gz"), "--database-url", pg_dsn,
                       "-c", config_file(tmp_path)])
    assert refused.exit_code != 0 and "--include-spend-logs" in refused.output


# --- exact values of every type, a generic schema, older schemas -----------------------------------------------

TYPES_V1 = """
CREATE TABLE a_child (
    id        serial PRIMARY KEY,
    parent_id bigint NOT NULL,
    b bytea, n numeric(30, 10), f double precision, r real, arr text[], ints integer[], j jsonb, js json,
    ts timestamptz, t timestamp, d date, iv interval, flag boolean, small smallint, big bigint, u uuid,
    doubled numeric GENERATED ALWAYS AS (n * 2) STORED
);
CREATE TABLE z_parent (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text NOT NULL);
ALTER TABLE a_child ADD FOREIGN KEY (parent_id) REFERENCES z_parent (id);
"""
TYPES_V2 = "CREATE TABLE extra (x int);\nALTER TABLE z_parent ADD COLUMN note text NOT NULL DEFAULT 'from 0002';\n"


def sql_dir(tmp_path: Path, name: str, *migrations: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for i, text in enumerate(migrations, 1):
        (folder / f"{i:04d}_step{i}.sql").write_text(text)
    return folder


def fill_types(dsn: str) -> None:
    import datetime as dt

    query(dsn, "INSERT INTO z_parent (name) VALUES ('p1'), ('p2')")
    values = [
        (1, bytes(range(256)), Decimal("12345678901234567890.0123456789"), 0.1 + 0.2, 0.1,
         ["a", "b c", None, '"q"', "{x}", "é"], [1, None, -3], psycopg2.extras.Json({"a": [1, 2.5, None], "s": "é"}),
         '{"b": 1,   "a": 2}', dt.datetime(2026, 1, 2, 3, 4, 5, 123456, dt.timezone(dt.timedelta(hours=5, minutes=30))),
         dt.datetime(1999, 12, 31, 23, 59, 59, 999999), dt.date(2000, 2, 29), dt.timedelta(days=3, microseconds=7),
         True, -32768, 2 ** 63 - 1, uuid.UUID(int=12345)),
        (2, b"", Decimal("-0.0000000001"), float("inf"), float("nan"), [], [], psycopg2.extras.Json(None), "null",
         None, None, None, None, False, 0, 0, None),
        (2, None, None, float("-inf"), -0.0, None, None, None, None, None, None, None, None, None, None, None, None),
        (1, None, None, 1e-300, 3.4e38, None, None, None, None, None, None, None, None, None, None, None, None),
    ]
    for v in values:
        query(dsn, "INSERT INTO a_child (parent_id, b, n, f, r, arr, ints, j, js, ts, t, d, iv, flag, small, big, u) "
                   "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)", v)
    query(dsn, "UPDATE a_child SET iv = '1 year 2 mons 3 days 04:05:06.789' WHERE id = 2")


async def dump_and_restore(source: str, target: str, path: Path, dump_dir: Path, restore_dir: Path,
                           force: bool = False, fetch_size: int = 2) -> backup.Summary:
    src, dst = Database(source), Database(target)
    try:
        await backup.dump(src, path, backup.DumpOptions(fetch_size=fetch_size), dump_dir)
        return await backup.restore(dst, path, restore_dir, force)
    finally:
        await src.close()
        await dst.close()


async def migrated(dsn: str, folder: Path) -> None:
    db = Database(dsn)
    try:
        await db.migrate(folder)
    finally:
        await db.close()


async def test_every_type_round_trips_exactly(pg_server, empty_pg_dsn, tmp_path):
    from .conftest import admin_sql

    v1 = sql_dir(tmp_path, "v1", TYPES_V1)
    await migrated(empty_pg_dsn, v1)
    fill_types(empty_pg_dsn)
    name = f"t_{uuid.uuid4().hex[:16]}"
    admin_sql(pg_server, f"CREATE DATABASE {name}")
    target = psycopg2.extensions.make_dsn(pg_server, dbname=name)
    try:
        summary = await dump_and_restore(empty_pg_dsn, target, tmp_path / "types.gz", v1, v1)
        assert list(summary.rows) == ["z_parent", "a_child"]  # the referenced table first
        assert summary.rows == {"z_parent": 2, "a_child": 4}
        for table in ("z_parent", "a_child"):
            assert rows_as_text(target, table) == rows_as_text(empty_pg_dsn, table), table
        # identity and serial columns continue after the restored rows
        assert query(target, "INSERT INTO z_parent (name) VALUES ('p3') RETURNING id") == [(3,)]
        assert query(target, "INSERT INTO a_child (parent_id) VALUES (3) RETURNING id") == [(5,)]
        # with 0002 known, a 0001 dump is loaded at 0001, then migrated to 0002
        v2 = sql_dir(tmp_path, "v2", TYPES_V1, TYPES_V2)
        admin_sql(pg_server, f"DROP DATABASE {name} WITH (FORCE)")
        admin_sql(pg_server, f"CREATE DATABASE {name}")
        db = Database(target)
        try:
            await backup.restore(db, tmp_path / "types.gz", v2)
        finally:
            await db.close()
        assert query(target, "SELECT name, note FROM z_parent ORDER BY id") == [("p1", "from 0002"),
                                                                                ("p2", "from 0002")]
        assert [r[0] for r in query(target, "SELECT version FROM schema_migrations ORDER BY 1")] == ["0001", "0002"]
        # a dump of 0002 is refused by a proxyctl that knows only 0001
        await backup.dump(db, tmp_path / "v2.gz", backup.DumpOptions(), v2)
        with pytest.raises(DumpError, match="newer than this gateway's migrations"):
            await backup.restore(Database(empty_pg_dsn), tmp_path / "v2.gz", v1)
        await db.close()
    finally:
        admin_sql(pg_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# --- refusals --------------------------------------------------------------------------------------------------

def test_restore_refuses_a_database_with_data_unless_forced(pg_dsn, tmp_path):
    spend_rows(pg_dsn, [1])
    query(pg_dsn, "INSERT INTO proxy_teams (team_id) VALUES ('t1')")
    path = tmp_path / "d.gz"
    assert run_cli(["db", "dump", "--include-spend-logs", str(path), "--database-url", pg_dsn,
                    "-c", config_file(tmp_path)]).exit_code == 0
    before = rows_as_text(pg_dsn, "proxy_teams")
    query(pg_dsn, "INSERT INTO proxy_teams (team_id) VALUES ('added-after-the-dump')")

    refused = run_cli(["db", "restore", str(path), "--database-url", pg_dsn, "-c", config_file(tmp_path)])
    assert refused.exit_code == 1
    assert "already holds gateway data (in proxy_teams, proxy_spend_logs)" in refused.output
    assert "--force" in refused.output
    assert len(rows_as_text(pg_dsn, "proxy_teams")) == 2  # untouched

    forced = run_cli(["db", "restore", "--force", str(path), "--database-url", pg_dsn, "-c", config_file(tmp_path)])
    assert forced.exit_code == 0, forced.output
    assert rows_as_text(pg_dsn, "proxy_teams") == before
    assert query(pg_dsn, "SELECT count(*) FROM proxy_spend_logs") == [(1,)]


def rewrite(path: Path, lines: list) -> None:
    path.write_bytes(gzip.compress(b"".join(orjson.dumps(line) + b"\n" for line in lines)))


def without_row_of(lines: list, table: str) -> list:
    """The dump's lines less the (only) row of ``table``: the line just before its end line."""
    end = next(i for i, line in enumerate(lines) if isinstance(line, dict) and line.get("end") == table)
    return lines[:end - 1] + lines[end:]


@pytest.mark.parametrize("damage, message", [
    (lambda lines: lines[:-1], "ends early"),                                   # cut before the end marker
    (lambda lines: without_row_of(lines, "proxy_spend_logs"), "should hold 1 rows, the file has 0"),  # a row lost
    (lambda lines: [{**lines[0], "format_version": 2}] + lines[1:], "dump format 2 was written by a newer"),
    (lambda lines: [{**lines[0], "schema_version": "9999"}] + lines[1:], "schema version 9999 is newer"),
    (lambda lines: [{"hello": 1}] + lines[1:], "not a tornado-proxy dump"),
])
def test_restore_refuses_a_damaged_or_newer_dump_and_writes_nothing(pg_dsn, empty_pg_dsn, tmp_path, damage, message):
    spend_rows(pg_dsn, [1])
    path = tmp_path / "d.gz"
    assert run_cli(["db", "dump", "--include-spend-logs", str(path), "--database-url", pg_dsn,
                    "-c", config_file(tmp_path)]).exit_code == 0
    rewrite(path, damage(dump_lines(path)))
    result = run_cli(["db", "restore", str(path), "--database-url", empty_pg_dsn, "-c", config_file(tmp_path)])
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output
    tables = public_tables(empty_pg_dsn)
    assert all(query(empty_pg_dsn, f"SELECT count(*) FROM {t}") == [(0,)] for t in tables - {"schema_migrations"})


def test_restore_of_a_file_that_is_not_a_dump(empty_pg_dsn, tmp_path):
    path = tmp_path / "plain.txt"
    path.write_text("hello")
    result = run_cli(["db", "restore", str(path), "--database-url", empty_pg_dsn, "-c", config_file(tmp_path)])
    assert result.exit_code == 1 and "not a gzip'd tornado-proxy dump" in result.output
    missing = run_cli(["db", "restore", str(tmp_path / "nope.gz"), "--database-url", empty_pg_dsn,
                       "-c", config_file(tmp_path)])
    assert missing.exit_code == 1 and "no such file" in missing.output


def test_dump_of_an_unmigrated_or_unreachable_database(empty_pg_dsn, tmp_path):
    result = run_cli(["db", "dump", str(tmp_path / "d.gz"), "--database-url", empty_pg_dsn,
                      "-c", config_file(tmp_path)])
    assert result.exit_code == 1 and "no gateway schema" in result.output
    assert not list(tmp_path.glob("*.gz")) and not list(tmp_path.glob(".*partial"))  # nothing half-written left
    down = run_cli(["db", "dump", str(tmp_path / "d.gz"), "-c", config_file(tmp_path), "--database-url",
                    "host=127.0.0.1 port=1 user=postgres password=hunter2-not-shown dbname=x connect_timeout=2"])
    assert down.exit_code == 1 and "database unavailable" in down.output and "hunter2" not in down.output


def test_a_constraint_of_the_target_fails_the_restore_cleanly(pg_dsn, empty_pg_dsn, tmp_path):
    """A target whose schema refuses a row (here a NOT NULL column the dump lacks): one clear line,
    and not a row written (one transaction)."""
    spend_rows(pg_dsn, [1])
    query(pg_dsn, "INSERT INTO proxy_teams (team_id) VALUES ('t1')")
    path = tmp_path / "d.gz"
    assert run_cli(["db", "dump", "--include-spend-logs", str(path), "--database-url", pg_dsn,
                    "-c", config_file(tmp_path)]).exit_code == 0
    asyncio.run(migrated(empty_pg_dsn, SQL))
    query(empty_pg_dsn, "ALTER TABLE proxy_spend_logs ADD COLUMN required text NOT NULL")
    result = run_cli(["db", "restore", str(path), "--database-url", empty_pg_dsn, "-c", config_file(tmp_path)])
    assert result.exit_code == 1 and "restore failed, no row was written" in result.output, result.output
    assert "Traceback" not in result.output
    assert query(empty_pg_dsn, "SELECT count(*) FROM proxy_teams") == [(0,)]
