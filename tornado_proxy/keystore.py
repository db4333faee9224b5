"""Virtual keys, teams, users and team membership: their row types and every SQL statement
that reads or writes them (the store owns its rows). Keys are kept only as the SHA-256 hex
digest of their text, as LiteLLM does; the text itself is returned once, at creation.

Spend columns are never rewritten here from a value read earlier: the spend writer adds to
them with ``spend = spend + x``; only a budget reset sets them, under the reset lock."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Iterable

import orjson

if TYPE_CHECKING:
    from .db import Database

CHANNEL = "proxy_tenants_changed"
SPEND_NOTE = "spend:"  # a spend batch's notification on CHANNEL: "spend:<origin>:<time>" (see spendstore.py)
DURATION = re.compile(r"^(\d+)(s|m|h|d|w|mo)$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "mo": 30 * 86400}
LIMIT_FIELDS = ("max_budget", "soft_budget", "budget_duration", "tpm_limit", "rpm_limit", "max_parallel_requests",
                "model_max_budget", "models", "metadata")


def hash_key(key: str) -> str:
    """The stored form of a key (LiteLLM's ``hash_token``)."""
    return hashlib.sha256(key.encode()).hexdigest()


def is_hash(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def token_of(key_or_hash: str) -> str:
    """Admin endpoints accept a key or its hash (as LiteLLM's)."""
    return key_or_hash if is_hash(key_or_hash) else hash_key(key_or_hash)


def new_key() -> str:
    return "sk-" + secrets.token_urlsafe(16)


def masked(key: str) -> str:
    """LiteLLM's ``key_name``: ``sk-...`` and the last four characters."""
    return f"sk-...{key[-4:]}"


def parse_duration(text: str) -> dt.timedelta:
    """``30s``, ``5m``, ``1h``, ``1d``, ``2w``, ``1mo`` -> a timedelta; ValueError otherwise."""
    match = DURATION.match(text.strip()) if isinstance(text, str) else None
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"invalid duration {text!r}: use a number and s, m, h, d, w or mo (e.g. 30s, 1h, 30d)")
    return dt.timedelta(seconds=int(match.group(1)) * UNITS[match.group(2)])


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, dt.datetime) else value


@dataclass(frozen=True)
class TeamRecord:
    team_id: str
    team_alias: str | None = None
    models: tuple = ()
    max_budget: float | None = None
    soft_budget: float | None = None
    budget_duration: str | None = None
    budget_reset_at: dt.datetime | None = None
    tpm_limit: int | None = None
    rpm_limit: int | None = None
    max_parallel_requests: int | None = None
    model_max_budget: dict | None = None
    metadata: dict | None = None
    blocked: bool = False
    spend: float = 0.0
    model_spend: dict | None = None
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None


@dataclass(frozen=True)
class UserRecord:
    user_id: str
    user_email: str | None = None
    user_alias: str | None = None
    user_role: str = "internal_user"
    models: tuple = ()
    max_budget: float | None = None
    soft_budget: float | None = None
    budget_duration: str | None = None
    budget_reset_at: dt.datetime | None = None
    tpm_limit: int | None = None
    rpm_limit: int | None = None
    max_parallel_requests: int | None = None
    model_max_budget: dict | None = None
    metadata: dict | None = None
    spend: float = 0.0
    model_spend: dict | None = None
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None


@dataclass(frozen=True)
class KeyRecord:
    token: str  # SHA-256 hex of the key
    key_name: str  # masked: "sk-...abcd"
    key_alias: str | None = None
    team_id: str | None = None
    user_id: str | None = None
    models: tuple = ()
    max_budget: float | None = None
    soft_budget: float | None = None
    budget_duration: str | None = None
    budget_reset_at: dt.datetime | None = None
    tpm_limit: int | None = None
    rpm_limit: int | None = None
    max_parallel_requests: int | None = None
    model_max_budget: dict | None = None
    metadata: dict | None = None
    blocked: bool = False
    expires: dt.datetime | None = None
    spend: float = 0.0
    model_spend: dict | None = None
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None

    def expired(self, at: dt.datetime | None = None) -> bool:
        return self.expires is not None and self.expires <= (at or now())


@dataclass(frozen=True)
class MemberRecord:
    team_id: str
    user_id: str
    role: str
    user_email: str | None


@dataclass(frozen=True)
class Table:
    name: str
    pk: str
    record: type
    json_columns: frozenset

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self.record))

    def row(self, record: tuple) -> Any:
        values = dict(zip(self.columns, record))
        values["models"] = tuple(values.get("models") or ())
        return self.record(**values)


JSON = frozenset({"models", "model_max_budget", "metadata", "model_spend"})
KEYS = Table("proxy_keys", "token", KeyRecord, JSON)
TEAMS = Table("proxy_teams", "team_id", TeamRecord, JSON)
USERS = Table("proxy_users", "user_id", UserRecord, JSON)
TABLES = {"key": KEYS, "team": TEAMS, "user": USERS}
SPEND_TABLES = {"key": (KEYS, "token"), "team": (TEAMS, "team_id"), "user": (USERS, "user_id")}


def public(record: Any) -> dict:
    """A record as the admin API shows it (timestamps as ISO text, never a key's text)."""
    out = {f.name: iso(getattr(record, f.name)) for f in fields(record)}
    out["models"] = list(out["models"])
    for name in ("model_max_budget", "metadata", "model_spend"):
        if name in out and out[name] is None:
            out[name] = {}
    return out


def encode(table: Table, name: str, value: Any) -> Any:
    if name in table.json_columns:
        return orjson.dumps(list(value) if isinstance(value, tuple) else value).decode()
    return value


class TenantStore:
    """The SQL for keys, teams, users and members, on the gateway's one pool."""

    def __init__(self, db: Database):
        self.db = db

    async def insert(self, table: Table, values: dict) -> Any | None:
        """None when the primary key (or a key alias) is taken."""
        import psycopg2.errors

        names = list(values)
        placeholders = ", ".join("%s::jsonb" if n in table.json_columns else "%s" for n in names)
        sql = (f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({placeholders}) "
               f"ON CONFLICT DO NOTHING RETURNING {', '.join(table.columns)}")
        try:
            async with self.db.cursor() as cur:
                await cur.execute(sql, [encode(table, n, values[n]) for n in names])
                record = await cur.fetchone()
        except psycopg2.errors.ForeignKeyViolation:
            raise LookupError("team") from None
        return table.row(record) if record else None

    async def update(self, table: Table, pk: str, values: dict) -> Any | None:
        """None when there is no such row."""
        import psycopg2.errors

        if not values:
            return await self.get(table, pk)
        sets = ", ".join(f"{n} = %s::jsonb" if n in table.json_columns else f"{n} = %s" for n in values)
        sql = (f"UPDATE {table.name} SET {sets}, updated_at = now() WHERE {table.pk} = %s "
               f"RETURNING {', '.join(table.columns)}")
        try:
            async with self.db.cursor() as cur:
                await cur.execute(sql, [encode(table, n, v) for n, v in values.items()] + [pk])
                record = await cur.fetchone()
        except psycopg2.errors.UniqueViolation:
            raise KeyError("key_alias") from None
        except psycopg2.errors.ForeignKeyViolation:
            raise LookupError("team") from None
        return table.row(record) if record else None

    async def get(self, table: Table, pk: str) -> Any | None:
        async with self.db.cursor() as cur:
            await cur.execute(f"SELECT {', '.join(table.columns)} FROM {table.name} WHERE {table.pk} = %s", (pk,))
            record = await cur.fetchone()
        return table.row(record) if record else None

    async def get_many(self, table: Table, pks: Iterable[str]) -> list:
        async with self.db.cursor() as cur:
            await cur.execute(f"SELECT {', '.join(table.columns)} FROM {table.name} WHERE {table.pk} = ANY(%s)",
                              (list(pks),))
            return [table.row(r) for r in await cur.fetchall()]

    async def spend_since(self, at: str) -> list[tuple[str, str, float, dict]]:
        """(kind, id, spend, model_spend) of every key, team and user whose spend was added at or
        after ``at`` (a spend notification's UTC time), in one round trip."""
        sql = " UNION ALL ".join(
            f"SELECT '{kind}', {pk}, spend, model_spend FROM {table.name} "
            "WHERE spend_updated_at >= (%(at)s::timestamp AT TIME ZONE 'UTC')"
            for kind, (table, pk) in SPEND_TABLES.items())
        async with self.db.cursor() as cur:
            await cur.execute(sql, {"at": at})
            return list(await cur.fetchall())

    async def all(self, table: Table) -> list:
        async with self.db.cursor() as cur:
            await cur.execute(f"SELECT {', '.join(table.columns)} FROM {table.name} ORDER BY created_at, {table.pk}")
            return [table.row(r) for r in await cur.fetchall()]

    async def page(self, table: Table, where: dict, page: int, size: int) -> tuple[list, int]:
        """Rows matching ``where`` (column = value), oldest first, and their total count."""
        clause = " AND ".join(f"{n} = %s" for n in where) or "TRUE"
        args = list(where.values())
        async with self.db.cursor() as cur:
            await cur.execute(f"SELECT count(*) FROM {table.name} WHERE {clause}", args)
            total = (await cur.fetchone())[0]
            await cur.execute(f"SELECT {', '.join(table.columns)} FROM {table.name} WHERE {clause} "
                              f"ORDER BY created_at, {table.pk} LIMIT %s OFFSET %s", args + [size, (page - 1) * size])
            return [table.row(r) for r in await cur.fetchall()], total

    async def delete(self, table: Table, pks: list[str]) -> list[str]:
        """Delete the rows; returns the primary keys that existed."""
        async with self.db.cursor() as cur:
            await cur.execute(f"DELETE FROM {table.name} WHERE {table.pk} = ANY(%s) RETURNING {table.pk}", (pks,))
            return [r[0] for r in await cur.fetchall()]

    async def key_tokens_by_alias(self, aliases: list[str]) -> list[str]:
        async with self.db.cursor() as cur:
            await cur.execute("SELECT token FROM proxy_keys WHERE key_alias = ANY(%s)", (aliases,))
            return [r[0] for r in await cur.fetchall()]

    async def delete_user(self, user_ids: list[str]) -> list[str]:
        """Users, their keys and their team memberships (as LiteLLM's /user/delete)."""
        async with self.db.transaction() as cur:
            await cur.execute("DELETE FROM proxy_keys WHERE user_id = ANY(%s)", (user_ids,))
            await cur.execute("DELETE FROM proxy_team_members WHERE user_id = ANY(%s)", (user_ids,))
            await cur.execute("DELETE FROM proxy_users WHERE user_id = ANY(%s) RETURNING user_id", (user_ids,))
            return [r[0] for r in await cur.fetchall()]

    async def members(self, team_ids: Iterable[str] | None = None, user_id: str | None = None) -> list[MemberRecord]:
        sql = "SELECT team_id, user_id, role, user_email FROM proxy_team_members"
        if user_id is not None:
            sql, args = sql + " WHERE user_id = %s", (user_id,)
        elif team_ids is not None:
            sql, args = sql + " WHERE team_id = ANY(%s)", (list(team_ids),)
        else:
            args = ()
        async with self.db.cursor() as cur:
            await cur.execute(sql + " ORDER BY added_at, user_id", args)
            return [MemberRecord(*r) for r in await cur.fetchall()]

    async def add_members(self, team_id: str, members: list[dict]) -> None:
        """Add (or change the role of) members; creates the users that do not exist yet."""
        async with self.db.transaction() as cur:
            for m in members:
                await cur.execute("INSERT INTO proxy_users (user_id, user_email) VALUES (%s, %s) "
                                  "ON CONFLICT (user_id) DO NOTHING", (m["user_id"], m.get("user_email")))
                await cur.execute(
                    "INSERT INTO proxy_team_members (team_id, user_id, role, user_email) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (team_id, user_id) DO UPDATE SET role = EXCLUDED.role, "
                    "user_email = COALESCE(EXCLUDED.user_email, proxy_team_members.user_email)",
                    (team_id, m["user_id"], m.get("role") or "user", m.get("user_email")))

    async def remove_member(self, team_id: str, user_id: str | None, user_email: str | None) -> int:
        async with self.db.cursor() as cur:
            await cur.execute("DELETE FROM proxy_team_members WHERE team_id = %s AND (user_id = %s OR "
                              "(%s::text IS NOT NULL AND user_email = %s))", (team_id, user_id, user_email, user_email))
            return cur.rowcount

    async def user_by_email(self, email: str) -> UserRecord | None:
        async with self.db.cursor() as cur:
            await cur.execute(f"SELECT {', '.join(USERS.columns)} FROM proxy_users WHERE user_email = %s "
                              "ORDER BY created_at LIMIT 1", (email,))
            record = await cur.fetchone()
        return USERS.row(record) if record else None
