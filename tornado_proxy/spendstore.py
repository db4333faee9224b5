"""The spend log's rows and the spend columns of keys, teams and users: every SQL statement
that writes or reads them (the store owns its rows). Spend is only ever added
(``spend = spend + x``), in the transaction that inserts the log rows it comes from, and only
for rows that were really inserted; only a budget reset sets it back, under an advisory lock
so that one worker of one instance does it.

A batch that added spend announces it once, in its transaction (so only on commit):
``spend:<origin>:<time>`` on the tenants channel, ``<time>`` being the transaction's ``now()``
(in UTC, fixed width, so that text order is time order), which is the ``spend_updated_at`` it
gave every row it touched. Workers then re-read the spend of the rows updated at or after it
(``TenantStore.spend_since``)."""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

import orjson

from .keystore import CHANNEL, SPEND_NOTE, parse_duration

if TYPE_CHECKING:
    from .db import Database
    from .spend import SpendEvent

RESET_LOCK = 0x7370_656E_6472  # pg_try_advisory_xact_lock key of the budget reset ("spendr")
PRUNE_LOCK = 0x7370_656E_6470  # pg_try_advisory_lock key of the spend log retention ("spendp")
LOG_TABLE, LOG_TIME = "proxy_spend_logs", "start_time"  # the spend log, and the time its retention reads
LOG_COLUMNS = ("request_id", "call_type", "api_key", "spend", "total_tokens", "prompt_tokens", "completion_tokens",
               "start_time", "end_time", "model", "model_id", "model_group", "custom_llm_provider", "api_base",
               "user", "end_user", "team_id", "status", "cache_hit", "metadata")
# (table, primary key, the event field naming the row)
OWNERS = (("proxy_keys", "token", "api_key"), ("proxy_teams", "team_id", "team_id"),
          ("proxy_users", "user_id", "user"))
BUDGET_TABLES = (("proxy_keys", "token"), ("proxy_teams", "team_id"), ("proxy_users", "user_id"))


@dataclass(frozen=True)
class Pruned:
    cutoff: dt.datetime
    deleted: int                 # rows deleted (or, for a dry run, that would be)
    statements: int              # DELETE statements run (0 for a dry run)


@dataclass(frozen=True)
class Written:
    inserted: list[str]          # the request ids inserted (the others were there already)
    at: str | None               # when their spend was added (see the module doc); None: no spend added


def epoch(value: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(value, dt.timezone.utc)


def row_values(e: SpendEvent) -> tuple:
    return (e.request_id, e.call_type, e.api_key, e.spend, e.total_tokens, e.prompt_tokens, e.completion_tokens,
            epoch(e.start_time), epoch(e.end_time), e.model, e.model_id, e.model_group, e.custom_llm_provider,
            e.api_base, e.user, e.end_user, e.team_id, e.status, "True" if e.cache_hit else "False",
            orjson.dumps(e.metadata or {}).decode())


def increments(events: Iterable[SpendEvent], field: str) -> dict[str, tuple[float, dict]]:
    """Per owner: the total spend and the spend per model group of ``events``."""
    out: dict[str, list] = {}
    for e in events:
        ident = getattr(e, field)
        if not ident or e.spend <= 0:
            continue
        entry = out.setdefault(ident, [0.0, {}])
        entry[0] += e.spend
        if e.model_group:
            entry[1][e.model_group] = entry[1].get(e.model_group, 0.0) + e.spend
    return {k: (v[0], v[1]) for k, v in out.items()}


def log_view(record: tuple) -> dict:
    """A spend log row as LiteLLM's ``/spend/logs`` shows it."""
    row = dict(zip(LOG_COLUMNS, record))
    start, end = row.pop("start_time"), row.pop("end_time")
    row["startTime"], row["endTime"] = start.isoformat(), end.isoformat()
    row["request_tags"] = (row["metadata"] or {}).get("tags") or []
    return row


class SpendStore:
    def __init__(self, db: Database):
        self.db = db

    async def write(self, events: list[SpendEvent], origin: str = "") -> Written:
        """Insert the rows not yet there and add their spend to their key, team and user, in one
        transaction that also announces the increments (once; ``origin`` names the writer)."""
        if not events:
            return Written([], None)
        cols = ", ".join(f'"{c}"' for c in LOG_COLUMNS)
        async with self.db.transaction() as cur:
            values = b",".join(cur.mogrify("(" + ", ".join(["%s"] * (len(LOG_COLUMNS) - 1)) + ", %s::jsonb)",
                                           row_values(e)) for e in events)
            await cur.execute(f"INSERT INTO proxy_spend_logs ({cols}) VALUES ".encode() + values
                              + b" ON CONFLICT (request_id) DO NOTHING RETURNING request_id")
            inserted = {r[0] for r in await cur.fetchall()}
            new = [e for e in events if e.request_id in inserted]
            added = False
            for table, pk, field in OWNERS:
                found = increments(new, field)
                if found:
                    await self.add(cur, table, pk, found)
                    added = True
            at = await self.announce(cur, origin) if added else None
        return Written(sorted(inserted), at)

    @staticmethod
    async def announce(cur, origin: str) -> str:
        await cur.execute("SELECT t, pg_notify(%s, %s || t) FROM (SELECT to_char(now() AT TIME ZONE 'UTC', "
                          "'YYYY-MM-DD\"T\"HH24:MI:SS.US') AS t) AS s", (CHANNEL, f"{SPEND_NOTE}{origin}:"))
        return (await cur.fetchone())[0]

    @staticmethod
    async def add(cur, table: str, pk: str, found: dict[str, tuple[float, dict]]) -> None:
        rows = b",".join(cur.mogrify("(%s, %s::float8, %s::jsonb)", (ident, total, orjson.dumps(by_model).decode()))
                         for ident, (total, by_model) in sorted(found.items()))  # one lock order: no deadlock
        await cur.execute(
            f"UPDATE {table} AS t SET spend = t.spend + v.x, spend_updated_at = now(), "
            "model_spend = t.model_spend || COALESCE((SELECT jsonb_object_agg(m.key, "
            "COALESCE((t.model_spend ->> m.key)::float8, 0) + m.value::float8) FROM jsonb_each_text(v.ms) m), "
            f"'{{}}'::jsonb) FROM (VALUES ".encode() + rows + f") AS v(id, x, ms) WHERE t.{pk} = v.id".encode())

    async def logs(self, where: dict[str, Any], start: dt.datetime | None, end: dt.datetime | None,
                   limit: int) -> list[dict]:
        clauses, args = [], []
        for name, value in where.items():
            clauses.append(f'"{name}" = %s')
            args.append(value)
        if start is not None:
            clauses.append("start_time >= %s")
            args.append(start)
        if end is not None:
            clauses.append("start_time < %s")
            args.append(end)
        cols = ", ".join(f'"{c}"' for c in LOG_COLUMNS)
        async with self.db.cursor() as cur:
            await cur.execute(f"SELECT {cols} FROM proxy_spend_logs WHERE {' AND '.join(clauses) or 'TRUE'} "
                              "ORDER BY start_time DESC, request_id LIMIT %s", args + [limit])
            return [log_view(r) for r in await cur.fetchall()]

    async def report(self, group: str, start: dt.datetime, end: dt.datetime, where: dict[str, Any]) -> list[tuple]:
        """(day, group value, model, api_key, spend, total tokens) per day, group, model and key."""
        clauses, args = ["start_time >= %s", "start_time < %s"], [start, end]
        for name, value in where.items():
            clauses.append(f'"{name}" = %s')
            args.append(value)
        async with self.db.cursor() as cur:
            await cur.execute(
                f"SELECT date_trunc('day', start_time AT TIME ZONE 'UTC') AS day, {group} AS grp, model_group, "
                "api_key, sum(spend), sum(total_tokens), sum(prompt_tokens), sum(completion_tokens) "
                f"FROM proxy_spend_logs WHERE {' AND '.join(clauses)} "
                "GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4", args)
            return list(await cur.fetchall())

    async def reset_budgets(self) -> dict[str, list[str]] | None:
        """Set spend to 0 where ``budget_reset_at`` has passed and move it one ``budget_duration``
        on; None when another worker (of any instance) is doing it now."""
        reset: dict[str, list[str]] = {}
        async with self.db.transaction() as cur:
            await cur.execute("SELECT pg_try_advisory_xact_lock(%s)", (RESET_LOCK,))
            if not (await cur.fetchone())[0]:
                return None
            for table, pk in BUDGET_TABLES:
                await cur.execute(f"SELECT {pk}, budget_duration FROM {table} WHERE budget_reset_at <= now() "
                                  "AND budget_duration IS NOT NULL ORDER BY 1 FOR UPDATE")
                due = []
                for ident, duration in await cur.fetchall():
                    try:
                        due.append((ident, parse_duration(duration).total_seconds()))
                    except ValueError:
                        continue
                if not due:
                    continue
                rows = b",".join(cur.mogrify("(%s, %s::float8)", r) for r in due)
                await cur.execute(f"UPDATE {table} AS t SET spend = 0, model_spend = '{{}}'::jsonb, "
                                  "budget_reset_at = now() + make_interval(secs => v.s) FROM (VALUES ".encode()
                                  + rows + f") AS v(id, s) WHERE t.{pk} = v.id".encode())
                reset[table] = [r[0] for r in due]
        return reset

    async def count_older(self, cutoff: dt.datetime) -> int:
        async with self.db.cursor() as cur:
            await cur.execute(f"SELECT count(*) FROM {LOG_TABLE} WHERE {LOG_TIME} < %s", (cutoff,))
            return (await cur.fetchone())[0]

    async def prune(self, cutoff: dt.datetime, batch_size: int = 1000, pause: float = 0.1,
                    stopping: asyncio.Event | None = None) -> Pruned | None:
        """Delete the spend log rows that started before ``cutoff``, ``batch_size`` rows per
        statement (each its own short transaction) with ``pause`` seconds between them, so the
        table is never locked for long. None when another session (a gateway's retention job, or
        another ``proxyctl db prune``) is pruning now."""
        async with self.db.try_lock(PRUNE_LOCK) as cur:
            if cur is None:
                return None
            deleted = statements = 0
            while not (stopping is not None and stopping.is_set()):
                await cur.execute(
                    f"WITH doomed AS (SELECT request_id FROM {LOG_TABLE} WHERE {LOG_TIME} < %s ORDER BY {LOG_TIME} "
                    f"LIMIT %s FOR UPDATE SKIP LOCKED) DELETE FROM {LOG_TABLE} AS s USING doomed "
                    "WHERE s.request_id = doomed.request_id", (cutoff, batch_size))
                statements += 1
                deleted += cur.rowcount
                if cur.rowcount < batch_size:
                    break
                await asyncio.sleep(pause)
            return Pruned(cutoff, deleted, statements)
