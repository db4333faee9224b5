"""db.py against a real PostgreSQL: migrations, model rows, notifications."""

import asyncio

import pytest

from tornado_proxy.config import resource_dir
from tornado_proxy.db import Database, migrations
from tornado_proxy.errors import DatabaseUnavailable
from tornado_proxy.modelstore import ModelRow


async def test_migrations_from_empty_and_rerun(empty_pg_dsn):
    db = Database(empty_pg_dsn)
    try:
        first = await db.migrate(resource_dir("sql"))
        assert first == [p.name for _, p in migrations(resource_dir("sql"))]
        assert await db.migrate(resource_dir("sql")) == []
        assert await db.applied_migrations() == first
    finally:
        await db.close()


async def test_concurrent_migrations_under_the_lock(empty_pg_dsn):
    dbs = [Database(empty_pg_dsn) for _ in range(3)]

    async def run(db):
        async with db.startup_lock():
            return await db.migrate(resource_dir("sql"))

    try:
        results = await asyncio.gather(*(run(db) for db in dbs))
        assert sorted(len(r) for r in results) == [0, 0, len(migrations(resource_dir("sql")))]
    finally:
        for db in dbs:
            await db.close()


async def test_model_round_trip_and_notify(pg_dsn):
    db = Database(pg_dsn)
    listener = await db.listen()
    try:
        row = ModelRow("m1", "gpt", {"model": "openai/gpt-4o", "api_key": "enc:v1:x"}, {"mode": "chat"}, "api")
        created = await db.insert_model(row)
        assert created.id == "m1" and created.litellm_params["model"] == "openai/gpt-4o"
        assert created.created_at is not None
        assert await db.insert_model(row) is None  # id taken
        note = await asyncio.wait_for(listener.notifies.get(), 5)
        assert note.channel == "proxy_models_changed" and note.payload == "INSERT"
        updated = await db.update_model(ModelRow("m1", "gpt2", {"model": "openai/x"}, {}, "api"))
        assert updated.model_name == "gpt2" and updated.updated_at >= created.updated_at
        assert await db.update_model(ModelRow("nope", "x", {"model": "y"}, {}, "api")) is None
        assert [r.id for r in await db.fetch_models()] == ["m1"]
        assert await db.delete_model("m1") is True
        assert await db.delete_model("m1") is False
        assert await db.fetch_models() == []
    finally:
        listener.close()
        await db.close()


async def test_sync_only_deletes_yaml_rows(pg_dsn):
    db = Database(pg_dsn)
    try:
        await db.insert_model(ModelRow("api1", "a", {"model": "mock/a"}, {}, "api"))
        await db.apply_sync([ModelRow("y1", "b", {"model": "mock/b"}, {}, "yaml")], [])
        await db.apply_sync([], ["y1", "api1"])
        assert [r.id for r in await db.fetch_models()] == ["api1"]
    finally:
        await db.close()


async def test_unreachable_database_is_reported_not_raised_raw():
    db = Database("host=127.0.0.1 port=1 user=postgres dbname=postgres", connect_timeout=2)
    with pytest.raises(DatabaseUnavailable) as info:
        await db.fetch_models()
    assert "password" not in str(info.value)
    await db.close()


def test_statement_timeout_is_applied(pg_dsn):
    db = Database(pg_dsn, statement_timeout_ms=100)

    async def slow():
        async with db.cursor() as cur:
            await cur.execute("SELECT pg_sleep(2)")

    async def main():
        try:
            with pytest.raises(DatabaseUnavailable, match="timed out"):
                await slow()
        finally:
            await db.close()

    asyncio.run(main())
