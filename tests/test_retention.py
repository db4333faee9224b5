"""Spend log retention: the settings (LiteLLM's duration format), batched deletes of exactly the
old rows, one pruner at a time (advisory try-lock), a database outage skipping the round, the
gateway's background job, and `proxyctl db prune [--dry-run]`."""

from __future__ import annotations

import datetime as dt
import logging
import textwrap

import psycopg2
import pytest
from click.testing import CliRunner

from tornado_proxy.cli import cli
from tornado_proxy.config import ConfigError, load
from tornado_proxy.db import Database
from tornado_proxy.retention import RetentionSettings, SpendLogRetention
from tornado_proxy.spendstore import PRUNE_LOCK, SpendStore

from .conftest import MASTER_KEY, wait_for

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.timezone.utc)
AGES_HOURS = {"fresh": 1, "day": 23, "old-1": 25, "old-2": 24 * 3, "old-3": 24 * 10, "old-4": 24 * 40,
              "old-5": 24 * 400}


def query(dsn: str, sql: str, args=()) -> list[tuple]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchall() if cur.description else []


def add_rows(dsn: str, now: dt.datetime, ages: dict[str, float]) -> None:
    for request_id, hours in ages.items():
        start = now - dt.timedelta(hours=hours)
        query(dsn, "INSERT INTO proxy_spend_logs (request_id, call_type, start_time, end_time, status, spend) "
                   "VALUES (%s, 'acompletion', %s, %s, 'success', 0.5)", (request_id, start, start))


def remaining(dsn: str) -> set[str]:
    return {r[0] for r in query(dsn, "SELECT request_id FROM proxy_spend_logs")}


def settings_of(tmp_path, text: str) -> RetentionSettings:
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(text))
    return RetentionSettings.parse(load(path, environ={}).settings)


# --- settings ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("period, seconds", [("30d", 30 * 86400), ("12h", 12 * 3600), ("7d", 7 * 86400),
                                             ("90m", 5400), ("3600s", 3600), ("2w", 14 * 86400),
                                             ("1mo", 30 * 86400)])
def test_retention_period_in_litellms_format(tmp_path, period, seconds):
    s = settings_of(tmp_path, f"general_settings: {{maximum_spend_logs_retention_period: '{period}'}}\n")
    assert s == RetentionSettings(period=seconds, interval=86400)  # the interval defaults to 1d, as LiteLLM


def test_retention_is_off_by_default_and_the_interval_is_read(tmp_path):
    assert settings_of(tmp_path, "model_list: []\n") == RetentionSettings(None, 86400)
    s = settings_of(tmp_path, "general_settings: {maximum_spend_logs_retention_period: 7d, "
                              "maximum_spend_logs_retention_interval: 6h}\n")
    assert s == RetentionSettings(7 * 86400, 6 * 3600)


@pytest.mark.parametrize("key, value", [("maximum_spend_logs_retention_period", "30 days"),
                                        ("maximum_spend_logs_retention_period", "30"),
                                        ("maximum_spend_logs_retention_interval", "0d")])
def test_a_bad_duration_stops_check_naming_the_key(tmp_path, key, value):
    path = tmp_path / "c.yaml"
    path.write_text(f"general_settings: {{{key}: '{value}'}}\n")
    with pytest.raises(ConfigError, match=f"general_settings.{key}: invalid duration"):
        RetentionSettings.parse(load(path, environ={}).settings)
    result = CliRunner().invoke(cli, ["check", "-c", str(path)], env={"LITELLM_MASTER_KEY": MASTER_KEY})
    assert result.exit_code != 0 and f"general_settings.{key}" in result.output


# --- pruning ----------------------------------------------------------------------------------------------------

async def test_the_job_deletes_exactly_the_old_rows_in_batches(pg_dsn):
    add_rows(pg_dsn, NOW, AGES_HOURS)
    db = Database(pg_dsn)
    try:
        job = SpendLogRetention(SpendStore(db), RetentionSettings(period=86400, interval=86400), batch_size=2,
                                pause=0)
        result = await job.run_once(now=NOW)
        assert result.deleted == 5 and result.statements == 3  # 2 + 2 + 1: several short statements
        assert result.cutoff == NOW - dt.timedelta(days=1)
        assert remaining(pg_dsn) == {"fresh", "day"}
        again = await job.run_once(now=NOW)
        assert (again.deleted, again.statements) == (0, 1)
        assert remaining(pg_dsn) == {"fresh", "day"}
    finally:
        await db.close()


async def test_a_batch_size_that_divides_the_rows_needs_one_more_statement(pg_dsn):
    add_rows(pg_dsn, NOW, {"a": 48, "b": 49, "c": 1})
    db = Database(pg_dsn)
    try:
        result = await SpendStore(db).prune(NOW - dt.timedelta(days=1), batch_size=2, pause=0)
        assert (result.deleted, result.statements) == (2, 2)
        assert remaining(pg_dsn) == {"c"}
    finally:
        await db.close()


async def test_only_one_pruner_at_a_time(pg_dsn, caplog):
    """Another session holding the advisory lock (another instance's job, another `db prune`): this
    round is skipped and nothing is deleted; once the lock is free, the rows go."""
    add_rows(pg_dsn, NOW, AGES_HOURS)
    holder = psycopg2.connect(pg_dsn)
    db = Database(pg_dsn)
    try:
        holder.cursor().execute("SELECT pg_advisory_lock(%s)", (PRUNE_LOCK,))
        job = SpendLogRetention(SpendStore(db), RetentionSettings(86400, 86400), batch_size=2, pause=0)
        with caplog.at_level(logging.INFO, logger="tornado_proxy.retention"):
            assert await job.run_once(now=NOW) is None
        assert "another instance is deleting old rows now" in caplog.text
        assert len(remaining(pg_dsn)) == len(AGES_HOURS)
        holder.close()
        assert (await job.run_once(now=NOW)).deleted == 5
    finally:
        holder.close()
        await db.close()


async def test_the_lock_is_held_for_the_whole_run_and_released_after(pg_dsn):
    """While one run is between its batches, a second one skips; after it, the lock is free."""
    add_rows(pg_dsn, NOW, AGES_HOURS)
    db = Database(pg_dsn)
    store = SpendStore(db)
    try:
        first = asyncio_task(store.prune(NOW - dt.timedelta(days=1), batch_size=1, pause=0.5))
        await wait_for(lambda: len(remaining(pg_dsn)) < len(AGES_HOURS), 10)  # the first batch went
        assert await store.prune(NOW - dt.timedelta(days=1), batch_size=1, pause=0) is None
        done = await first
        assert done.deleted == 5 and done.statements == 6
        held = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s AND objid = %s"
        assert query(pg_dsn, held, (PRUNE_LOCK >> 32, PRUNE_LOCK & 0xFFFFFFFF)) == [(0,)]  # released
    finally:
        await db.close()


def asyncio_task(coro):
    import asyncio
    return asyncio.ensure_future(coro)


async def test_a_database_outage_skips_the_round(caplog):
    db = Database("host=127.0.0.1 port=1 user=postgres password=hunter2-not-shown dbname=x", connect_timeout=2)
    job = SpendLogRetention(SpendStore(db), RetentionSettings(86400, 86400))
    with caplog.at_level(logging.WARNING, logger="tornado_proxy.retention"):
        assert await job.run_once() is None
    assert "database unavailable" in caplog.text and "this round is skipped" in caplog.text
    assert "hunter2" not in caplog.text
    await db.close()


async def test_retention_off_does_nothing(pg_dsn):
    add_rows(pg_dsn, NOW, {"ancient": 24 * 1000})
    db = Database(pg_dsn)
    try:
        assert await SpendLogRetention(SpendStore(db), RetentionSettings(None, 86400)).run_once() is None
        assert remaining(pg_dsn) == {"ancient"}
    finally:
        await db.close()


async def test_the_gateway_runs_the_job_in_the_background(gateway, pg_dsn):
    now = dt.datetime.now(dt.timezone.utc)
    add_rows(pg_dsn, now, {"recent": 0.5, "two-hours": 2, "two-days": 48})
    await gateway(f"""
        model_list: []
        general_settings:
          store_model_in_db: true
          database_url: "{pg_dsn}"
          maximum_spend_logs_retention_period: 1h
          maximum_spend_logs_retention_interval: 1s
    """)
    await wait_for(lambda: remaining(pg_dsn) == {"recent"}, 15)


# --- proxyctl db prune ------------------------------------------------------------------------------------------

def prune(args: list[str], dsn: str, tmp_path, settings: str = ""):
    path = tmp_path / "c.yaml"
    path.write_text(f"model_list: []\ngeneral_settings:\n  database_url: \"{dsn}\"\n{settings}")
    return CliRunner().invoke(cli, ["db", "prune", "-c", str(path), *args],
                              env={"LITELLM_MASTER_KEY": MASTER_KEY, "DATABASE_URL": None})


def test_prune_dry_run_counts_and_deletes_nothing_then_prune_deletes(pg_dsn, tmp_path):
    now = dt.datetime.now(dt.timezone.utc)
    add_rows(pg_dsn, now, {"recent": 1, "week": 24 * 8, "month": 24 * 31, "year": 24 * 365})
    dry = prune(["--older-than", "7d", "--dry-run"], pg_dsn, tmp_path)
    assert dry.exit_code == 0, dry.output
    assert dry.output.startswith("would delete 3 spend log row(s) older than 7d")
    assert len(remaining(pg_dsn)) == 4

    done = prune(["--older-than", "30d", "--batch-size", "1"], pg_dsn, tmp_path)
    assert done.exit_code == 0, done.output
    assert done.output.startswith("deleted 2 spend log row(s) older than 30d") and "in 3 statement(s)" in done.output
    assert remaining(pg_dsn) == {"recent", "week"}

    from_config = prune([], pg_dsn, tmp_path, "  maximum_spend_logs_retention_period: 7d\n")
    assert from_config.exit_code == 0 and from_config.output.startswith("deleted 1 spend log row(s) older than 7d")
    assert remaining(pg_dsn) == {"recent"}


def test_prune_refusals(pg_dsn, tmp_path):
    none = prune([], pg_dsn, tmp_path)
    assert none.exit_code != 0 and "--older-than" in none.output
    bad = prune(["--older-than", "a while"], pg_dsn, tmp_path)
    assert bad.exit_code != 0 and "invalid duration" in bad.output
    holder = psycopg2.connect(pg_dsn)
    try:
        holder.cursor().execute("SELECT pg_advisory_lock(%s)", (PRUNE_LOCK,))
        busy = prune(["--older-than", "1d"], pg_dsn, tmp_path)
        assert busy.exit_code == 1 and "another prune is running now" in busy.output
    finally:
        holder.close()


def test_only_worker_zero_of_an_instance_runs_the_job(tmp_path, pg_dsn):
    from tornado_proxy.app import Gateway

    path = tmp_path / "g.yaml"
    path.write_text(f"general_settings:\n  store_model_in_db: true\n  database_url: \"{pg_dsn}\"\n"
                    "  maximum_spend_logs_retention_period: 30d\n")
    config = load(path, environ={"LITELLM_MASTER_KEY": MASTER_KEY})
    assert Gateway(config, worker=0).retention.store is not None
    assert Gateway(config, worker=1).retention.store is None
