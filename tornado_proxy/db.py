"""PostgreSQL through aiopg: the pool, the migration runner for ``sql/NNNN_name.sql``, and every
SQL statement the gateway runs, each a named ``async def``.

Any failure to reach the database is raised as ``DatabaseUnavailable`` so callers can keep
serving from memory and answer writes with a 503.
"""

from __future__ import annotations

import asyncio
import logging
import re
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable

import aiopg
import orjson
import psycopg2
import psycopg2.errors

from .errors import DatabaseUnavailable
from .modelstore import ModelRow

log = logging.getLogger(__name__)

LOCK_ID = 0x7470_726F_7879  # pg_advisory_lock key shared by every gateway instance ("tproxy")
CHANNEL = "proxy_models_changed"
MIGRATION_FILE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
UNREACHABLE = (psycopg2.OperationalError, psycopg2.InterfaceError, asyncio.TimeoutError, OSError)
BACKOFF_MAX = 10.0  # seconds between a watcher's reconnection attempts, at most


def migrations(directory: Path) -> list[tuple[str, Path]]:
    found = sorted((m.group(1), p) for p in directory.glob("*.sql") if (m := MIGRATION_FILE.match(p.name)))
    versions = [v for v, _ in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"{directory}: two migrations share a number")
    return found


SQL_COMMENT = re.compile(r"--[^\n]*|/\*.*?\*/", re.DOTALL)
IDENT = r'(?:"[^"]+"|[A-Za-z_][\w$]*)'
QNAME = rf"{IDENT}(?:\s*\.\s*{IDENT})?"
TABLE_DDL = re.compile(
    rf"\bCREATE\s+(?:UNLOGGED\s+)?TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?(?P<created>{QNAME})"
    r"|\bDROP\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?P<dropped>[^;]+?)\s*(?:\bCASCADE|\bRESTRICT)?\s*(?:;|$)"
    rf"|\bALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?(?P<renamed>{QNAME})\s+RENAME\s+TO\s+(?P<to>{IDENT})",
    re.IGNORECASE)


def table_name(text: str) -> str:
    """The bare table name of a (maybe schema-qualified, maybe quoted) SQL name."""
    last = re.split(r'\.(?=(?:[^"]*"[^"]*")*[^"]*$)', text.strip())[-1].strip()
    return last[1:-1] if last.startswith('"') else last.lower()


def schema_tables(directory: Path, upto: str | None = None) -> list[str]:
    """Every table the migrations (up to version ``upto``) leave behind, in creation order: read
    from their CREATE / DROP / ALTER ... RENAME TO statements, so a new migration's tables are
    known without a list to keep up to date."""
    tables: list[str] = []
    for version, path in migrations(directory):
        if upto is not None and version > upto:
            break
        text = SQL_COMMENT.sub(" ", path.read_text(encoding="utf-8"))
        for m in TABLE_DDL.finditer(text):
            if m.group("created"):
                tables.append(table_name(m.group("created")))
            elif m.group("dropped"):
                gone = {table_name(n) for n in m.group("dropped").split(",")}
                tables = [t for t in tables if t not in gone]
            else:
                old, new = table_name(m.group("renamed")), table_name(m.group("to"))
                tables = [new if t == old else t for t in tables]
    return list(dict.fromkeys(tables))


def row_of(record: tuple) -> ModelRow:
    return ModelRow(id=record[0], model_name=record[1], litellm_params=record[2], model_info=record[3],
                    source=record[4], created_at=record[5], updated_at=record[6])


def jsonb(value: Any) -> str:
    return orjson.dumps(value).decode()


MODEL_COLUMNS = "id, model_name, litellm_params, model_info, source, created_at, updated_at"


class Database:
    def __init__(self, dsn: str, pool_size: int = 10, statement_timeout_ms: int = 5000,
                 connect_timeout: float = 5.0):
        self.dsn = dsn
        self.pool_size = pool_size
        self.statement_timeout_ms = statement_timeout_ms
        self.connect_timeout = connect_timeout
        self._pool: aiopg.Pool | None = None

    def connect_kwargs(self) -> dict:
        return {"timeout": self.connect_timeout, "options": f"-c statement_timeout={self.statement_timeout_ms}"}

    async def open(self) -> None:
        if self._pool is None:
            try:
                self._pool = await aiopg.create_pool(self.dsn, minsize=0, maxsize=self.pool_size,
                                                     **self.connect_kwargs())
            except UNREACHABLE as exc:
                raise DatabaseUnavailable(describe(exc)) from None

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.close()
            await pool.wait_closed()

    @asynccontextmanager
    async def cursor(self) -> AsyncIterator[aiopg.Cursor]:
        await self.open()
        try:
            async with self._pool.acquire() as conn:
                async with conn.cursor() as cur:
                    yield cur
        except UNREACHABLE as exc:
            if self._pool is not None:
                await self._pool.clear()  # drop connections the server has gone away from
            raise DatabaseUnavailable(describe(exc)) from None
        except asyncio.CancelledError:
            if really_cancelled():
                raise
            # aiopg turns a server-side statement timeout into CancelledError
            raise DatabaseUnavailable("statement timed out") from None

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiopg.Cursor]:
        async with self.cursor() as cur:
            async with cur.begin():
                yield cur

    async def own_connection(self) -> aiopg.Connection:
        """A connection outside the pool (a session lock, a LISTEN), closed by the caller."""
        try:
            return await aiopg.connect(self.dsn, **self.connect_kwargs())
        except UNREACHABLE as exc:
            raise DatabaseUnavailable(describe(exc)) from None

    @asynccontextmanager
    async def startup_lock(self) -> AsyncIterator[None]:
        """Held while one instance migrates and syncs; the others wait their turn.

        The lock lives on a connection of its own, outside the pool: the work done under it
        needs pool connections, and a pool of one would otherwise wait on itself."""
        conn = await self.own_connection()
        try:
            with unavailable_on_failure("timed out waiting for the start-up lock"):
                async with conn.cursor() as cur:
                    await cur.execute("SELECT pg_advisory_lock(%s)", (LOCK_ID,))
            yield  # closing the connection releases the (session-level) lock
        finally:
            conn.close()

    @asynccontextmanager
    async def try_lock(self, lock_id: int) -> AsyncIterator[aiopg.Cursor | None]:
        """A cursor on a connection of its own holding the session advisory lock ``lock_id``, or
        None when another session holds it (no waiting). For work done in several transactions
        under one lock; closing the connection releases the lock, whatever happened."""
        conn = await self.own_connection()
        try:
            async with conn.cursor() as cur:
                with unavailable_on_failure():
                    await cur.execute("SELECT pg_try_advisory_lock(%s)", (lock_id,))
                    locked = (await cur.fetchone())[0]
                with unavailable_on_failure():
                    yield cur if locked else None
        finally:
            conn.close()

    async def ping(self) -> None:
        async with self.cursor() as cur:
            await cur.execute("SELECT 1")

    async def migrate(self, directory: Path, upto: str | None = None) -> list[str]:
        """Apply the migrations not yet recorded (up to version ``upto``, when given), each in its
        own transaction. Returns them."""
        applied_now = []
        async with self.cursor() as cur:
            await cur.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                              "version text PRIMARY KEY, name text NOT NULL, "
                              "applied_at timestamptz NOT NULL DEFAULT now())")
            await cur.execute("SELECT version FROM schema_migrations")
            done = {r[0] for r in await cur.fetchall()}
            for version, path in migrations(directory):
                if version in done or (upto is not None and version > upto):
                    continue
                async with cur.begin():
                    await cur.execute(path.read_text(encoding="utf-8"))
                    await cur.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                                      (version, path.name))
                log.info("applied migration %s", path.name)
                applied_now.append(path.name)
        return applied_now

    async def has_table(self, name: str) -> bool:
        async with self.cursor() as cur:
            await cur.execute("SELECT to_regclass(%s) IS NOT NULL", (name,))
            return (await cur.fetchone())[0]

    async def applied_migrations(self) -> list[str]:
        async with self.cursor() as cur:
            await cur.execute("SELECT name FROM schema_migrations ORDER BY version")
            return [r[0] for r in await cur.fetchall()]

    async def fetch_models(self) -> list[ModelRow]:
        async with self.cursor() as cur:
            await cur.execute(f"SELECT {MODEL_COLUMNS} FROM proxy_models ORDER BY created_at, id")
            return [row_of(r) for r in await cur.fetchall()]

    async def fetch_model(self, model_id: str) -> ModelRow | None:
        async with self.cursor() as cur:
            await cur.execute(f"SELECT {MODEL_COLUMNS} FROM proxy_models WHERE id = %s", (model_id,))
            record = await cur.fetchone()
            return row_of(record) if record else None

    async def insert_model(self, row: ModelRow) -> ModelRow | None:
        """None when the id is taken."""
        async with self.cursor() as cur:
            await cur.execute(
                "INSERT INTO proxy_models (id, model_name, litellm_params, model_info, source) "
                f"VALUES (%s, %s, %s::jsonb, %s::jsonb, %s) ON CONFLICT (id) DO NOTHING RETURNING {MODEL_COLUMNS}",
                (row.id, row.model_name, jsonb(row.litellm_params), jsonb(row.model_info), row.source))
            record = await cur.fetchone()
            return row_of(record) if record else None

    async def update_model(self, row: ModelRow) -> ModelRow | None:
        """None when there is no such id."""
        async with self.cursor() as cur:
            await cur.execute(
                "UPDATE proxy_models SET model_name = %s, litellm_params = %s::jsonb, model_info = %s::jsonb, "
                f"updated_at = now() WHERE id = %s RETURNING {MODEL_COLUMNS}",
                (row.model_name, jsonb(row.litellm_params), jsonb(row.model_info), row.id))
            record = await cur.fetchone()
            return row_of(record) if record else None

    async def delete_model(self, model_id: str) -> bool:
        async with self.cursor() as cur:
            await cur.execute("DELETE FROM proxy_models WHERE id = %s", (model_id,))
            return cur.rowcount > 0

    async def rewrite_models(self, rewrite: Callable[[list[ModelRow]], dict[str, dict]]) -> dict[str, dict]:
        """One transaction: lock every model row, store ``rewrite(rows)`` ({id: new litellm_params});
        ``rewrite`` raising changes nothing. Returns what was stored. (updated_at is kept: the
        models' settings did not change.)"""
        async with self.transaction() as cur:
            await cur.execute(f"SELECT {MODEL_COLUMNS} FROM proxy_models ORDER BY id FOR UPDATE")
            changes = rewrite([row_of(r) for r in await cur.fetchall()])
            for model_id, params in sorted(changes.items()):
                await cur.execute("UPDATE proxy_models SET litellm_params = %s::jsonb WHERE id = %s",
                                  (jsonb(params), model_id))
        return changes

    async def apply_sync(self, upserts: Iterable[ModelRow], deletes: Iterable[str]) -> None:
        """One transaction: insert or replace the YAML rows, delete the YAML rows gone from the file."""
        async with self.transaction() as cur:
            for row in upserts:
                await cur.execute(
                    "INSERT INTO proxy_models (id, model_name, litellm_params, model_info, source) "
                    "VALUES (%s, %s, %s::jsonb, %s::jsonb, %s) ON CONFLICT (id) DO UPDATE SET "
                    "model_name = EXCLUDED.model_name, litellm_params = EXCLUDED.litellm_params, "
                    "model_info = EXCLUDED.model_info, source = EXCLUDED.source, updated_at = now()",
                    (row.id, row.model_name, jsonb(row.litellm_params), jsonb(row.model_info), row.source))
            ids = list(deletes)
            if ids:
                await cur.execute("DELETE FROM proxy_models WHERE source = 'yaml' AND id = ANY(%s)", (ids,))

    async def listen(self, channel: str = CHANNEL) -> aiopg.Connection:
        """A dedicated connection LISTENing on a change channel (``conn.notifies`` is a queue)."""
        conn = await self.own_connection()
        try:
            async with conn.cursor() as cur:
                await cur.execute(f"LISTEN {channel}")
            return conn
        except BaseException as exc:
            conn.close()
            if isinstance(exc, UNREACHABLE):
                raise DatabaseUnavailable(describe(exc)) from None
            raise


class Listener:
    """The notifications of a ``Database.listen()`` connection, awaited so that none is lost:
    one read of aiopg's queue stays pending across timeouts and wake-ups (cancelling a read
    that has just taken a notification off the queue would drop it)."""

    def __init__(self, conn: aiopg.Connection):
        self.conn = conn
        self._read: asyncio.Future | None = None

    async def next(self, timeout: float, wake: asyncio.Event | None = None) -> set[str]:
        """The payloads that came within ``timeout`` (a burst is taken whole); an empty set when
        none came or ``wake`` was set first. DatabaseUnavailable once the connection is lost."""
        if self._read is None:
            self._read = asyncio.ensure_future(self.conn.notifies.get())
        waker = asyncio.ensure_future(wake.wait()) if wake is not None else None
        try:
            await asyncio.wait({self._read} | ({waker} if waker else set()), timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            if waker is not None:
                waker.cancel()
        if not self._read.done():
            if self.conn.closed:
                raise DatabaseUnavailable("the listening connection was closed")
            return set()
        read, self._read = self._read, None
        try:
            payloads = {read.result().payload}
            while not self.conn.notifies.empty():
                payloads.add(self.conn.notifies.get_nowait().payload)
        except psycopg2.Error as exc:
            raise DatabaseUnavailable(describe(exc)) from None
        return payloads

    def close(self) -> None:
        if self._read is not None:
            self._read.cancel()
            self._read = None
        self.conn.close()


async def keep_listening(db: Database, channel: str, catch_up, listen, lost, name: str) -> None:
    """A memory kept current by LISTEN/NOTIFY, for ever: connect and LISTEN on ``channel``,
    ``await catch_up()`` (whatever changed while nobody listened), then ``await listen(listener)``
    until the connection fails. Then ``lost(exc)`` and try again, backing off exponentially.
    Any other error (not migrated yet, a bug) is logged and retried the same way: the watcher
    never dies."""
    backoff = 0.5
    while True:
        listener = None
        try:
            listener = Listener(await db.listen(channel))
            await catch_up()
            backoff = 0.5
            await listen(listener)
        except DatabaseUnavailable as exc:
            lost(exc)
        except Exception as exc:
            log.warning("%s watcher: %s", name, describe(exc), exc_info=log.isEnabledFor(logging.DEBUG))
            lost(exc)
        finally:
            if listener is not None:
                listener.close()
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, BACKOFF_MAX)


def really_cancelled() -> bool:
    """A CancelledError is a real cancellation of this task (aiopg also raises one for a
    server-side statement timeout)."""
    task = asyncio.current_task()
    return task is not None and bool(task.cancelling())


@contextmanager
def unavailable_on_failure(timeout_message: str = "statement timed out"):
    """Inside: an unreachable server or a statement timeout is raised as DatabaseUnavailable."""
    try:
        yield
    except UNREACHABLE as exc:
        raise DatabaseUnavailable(describe(exc)) from None
    except asyncio.CancelledError:
        if really_cancelled():
            raise
        raise DatabaseUnavailable(timeout_message) from None


def describe(exc: BaseException) -> str:
    """A one-line reason without the DSN (which may hold a password)."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return re.sub(r"password=\S+", "password=***", text)
