"""``proxyctl db dump`` / ``restore``: every table of the gateway's schema to a dump file and
back (the format is ``dumpfile.py``'s). The tables come from the migrations themselves
(``db.schema_tables``), so a migration that adds one is covered without a list to update.

A dump reads one snapshot (REPEATABLE READ, read only) through a server-side cursor, a batch of
rows at a time. Model secrets stay as stored, encrypted. A restore applies the migrations up to
the dump's schema version, loads every table in one transaction (refusing a database that
already holds gateway data unless told to delete it first), then applies the newer migrations.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import psycopg2

from . import __version__
from .db import describe, migrations, schema_tables
from .dumpfile import Column, DumpError, DumpReader, DumpWriter, Header, TableSection, is_native, utc_now
from .spendstore import LOG_TABLE, LOG_TIME

if TYPE_CHECKING:
    from .db import Database

# Text forms that read back exactly, whatever the server's or the role's defaults.
SESSION = ("SET LOCAL TimeZone = 'UTC'", "SET LOCAL DateStyle = 'ISO, YMD'", "SET LOCAL IntervalStyle = 'postgres'",
           "SET LOCAL extra_float_digits = 3", "SET LOCAL bytea_output = 'hex'")
FETCH_SIZE = 1000   # rows per FETCH from the dump's server-side cursor
INSERT_SIZE = 500   # rows per INSERT statement of a restore


@dataclass(frozen=True)
class DumpOptions:
    include_spend_logs: bool = False
    since: dt.datetime | None = None   # spend log rows with start_time >= since
    until: dt.datetime | None = None   # ... and < until
    fetch_size: int = FETCH_SIZE


@dataclass
class Summary:
    header: Header
    rows: dict[str, int] = field(default_factory=dict)  # table -> rows, in file order


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def dependency_order(tables: list[str], references: Iterable[tuple[str, str]]) -> list[str]:
    """``tables`` with every table after the tables it references (``(child, parent)`` pairs);
    otherwise in the given order. A cycle keeps the given order for the tables in it."""
    parents = {t: set() for t in tables}
    for child, parent in references:
        if child in parents and parent in parents and child != parent:
            parents[child].add(parent)
    ordered: list[str] = []
    while len(ordered) < len(tables):
        ready = [t for t in tables if t not in ordered and parents[t] <= set(ordered)]
        ordered.append(ready[0] if ready else next(t for t in tables if t not in ordered))
    return ordered


def known_versions(sql_dir: Path) -> list[str]:
    return [v for v, _ in migrations(sql_dir)]


async def applied(cur) -> list[tuple[str, str]]:
    """(version, file name) of every migration the database has, oldest first."""
    await cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not (await cur.fetchone())[0]:
        return []
    await cur.execute("SELECT version, name FROM schema_migrations ORDER BY version")
    return [tuple(r) for r in await cur.fetchall()]


async def columns_of(cur, table: str) -> list[Column]:
    await cur.execute("SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
                      "WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped "
                      "AND a.attgenerated = '' ORDER BY a.attnum", (quote(table),))
    return [Column(name, pg_type) for name, pg_type in await cur.fetchall()]


async def primary_key(cur, table: str) -> list[str]:
    await cur.execute("SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
                      "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = to_regclass(%s) AND i.indisprimary "
                      "ORDER BY array_position(i.indkey::int2[], a.attnum)", (quote(table),))
    return [r[0] for r in await cur.fetchall()]


async def references(cur) -> list[tuple[str, str]]:
    await cur.execute("SELECT c.relname, p.relname FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid "
                      "JOIN pg_class p ON p.oid = k.confrelid WHERE k.contype = 'f' "
                      "AND c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())")
    return [tuple(r) for r in await cur.fetchall()]


async def exists(cur, table: str) -> bool:
    await cur.execute("SELECT to_regclass(%s) IS NOT NULL", (quote(table),))
    return (await cur.fetchone())[0]


async def has_rows(cur, table: str) -> bool:
    await cur.execute(f"SELECT EXISTS (SELECT 1 FROM {quote(table)})")
    return (await cur.fetchone())[0]


async def schema_of(cur, sql_dir: Path) -> tuple[str, list[str]]:
    """The database's schema version and migration names; refused when this gateway's
    migrations do not cover it (its tables could then be missed)."""
    done = await applied(cur)
    if not done:
        raise DumpError("the database has no gateway schema (no schema_migrations table): nothing to dump")
    version, known = done[-1][0], known_versions(sql_dir)
    if version > known[-1]:
        raise DumpError(f"the database's schema ({done[-1][1]}) is newer than this proxyctl knows (up to "
                        f"{known[-1]}): use the tornado-proxy version that migrated it")
    return version, [name for _, name in done]


# --- dump ---------------------------------------------------------------------------------------------------

async def dump(db: Database, path: Path, options: DumpOptions, sql_dir: Path) -> Summary:
    """Write every table of the gateway's schema (the spend log only when asked) to ``path``."""
    async with db.transaction() as cur:
        await cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        for statement in SESSION:
            await cur.execute(statement)
        version, names = await schema_of(cur, sql_dir)
        tables = schema_tables(sql_dir, version)
        missing = [t for t in tables if not await exists(cur, t)]
        if missing:
            raise DumpError(f"the schema's table(s) {', '.join(missing)} are missing from the database")
        excluded = () if options.include_spend_logs or LOG_TABLE not in tables else (LOG_TABLE,)
        order = [t for t in dependency_order(tables, await references(cur)) if t not in excluded]
        header = Header(gateway_version=__version__, schema_version=version, migrations=tuple(names),
                        created_at=utc_now(), tables=tuple(order), excluded=excluded,
                        spend_logs={"included": not excluded, "since": iso(options.since),
                                    "until": iso(options.until)})
        summary = Summary(header)
        writer = DumpWriter(path)
        try:
            writer.header(header)
            for table in order:
                where, args = spend_filter(options) if table == LOG_TABLE else ("", ())
                summary.rows[table] = await dump_table(cur, writer, table, where, args, options.fetch_size)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
    return summary


def iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def spend_filter(options: DumpOptions) -> tuple[str, tuple]:
    clauses, args = [], []
    if options.since is not None:
        clauses.append(f"{quote(LOG_TIME)} >= %s")
        args.append(options.since)
    if options.until is not None:
        clauses.append(f"{quote(LOG_TIME)} < %s")
        args.append(options.until)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), tuple(args)


async def dump_table(cur, writer: DumpWriter, table: str, where: str, args: tuple, fetch_size: int) -> int:
    """Stream one table through a server-side cursor, ``fetch_size`` rows at a time."""
    columns = await columns_of(cur, table)
    select = ", ".join(quote(c.name) if is_native(c.type) else f"{quote(c.name)}::text" for c in columns)
    key = await primary_key(cur, table)
    order = " ORDER BY " + ", ".join(map(quote, key)) if key else ""
    await cur.execute(f"DECLARE dump_rows NO SCROLL CURSOR FOR SELECT {select} FROM {quote(table)}{where}{order}",
                      args or None)
    writer.begin_table(table, columns)
    while True:
        await cur.execute(f"FETCH {int(fetch_size)} FROM dump_rows")
        batch = await cur.fetchall()
        if not batch:
            break
        for row in batch:
            writer.row(row)
    await cur.execute("CLOSE dump_rows")
    return writer.end_table(table)


# --- restore ------------------------------------------------------------------------------------------------

async def restore(db: Database, path: Path, sql_dir: Path, force: bool = False) -> Summary:
    """Load a dump into the database at ``db`` (see the module doc). DumpError says why not."""
    reader = DumpReader(path)
    try:
        header = reader.header
        known = known_versions(sql_dir)
        if header.schema_version not in known:
            newer = header.schema_version > known[-1]
            raise DumpError(f"{path}: the dump's schema version {header.schema_version} is "
                            + (f"newer than this gateway's migrations (up to {known[-1]}): restore it with the "
                               "tornado-proxy version that wrote it, or a later one" if newer
                               else "not one of this gateway's migrations"))
        async with db.startup_lock():  # no gateway migrates or syncs models meanwhile
            async with db.cursor() as cur:
                done = await applied(cur)
            if done and done[-1][0] > known[-1]:
                raise DumpError(f"the target database's schema ({done[-1][1]}) is newer than this proxyctl knows")
            await db.migrate(sql_dir, upto=header.schema_version)
            try:
                summary = Summary(header, await load(db, reader, sql_dir, force))
            except psycopg2.Error as exc:  # a constraint of the target, say: the transaction was rolled back
                raise DumpError(f"restore failed, no row was written: {describe(exc)}") from None
            await db.migrate(sql_dir)
        return summary
    finally:
        reader.close()


async def load(db: Database, reader: DumpReader, sql_dir: Path, force: bool) -> dict[str, int]:
    """One transaction: refuse (or, forced, empty) a database holding gateway data, then insert."""
    rows: dict[str, int] = {}
    async with db.transaction() as cur:
        for statement in SESSION:
            await cur.execute(statement)
        present = [t for t in schema_tables(sql_dir) if await exists(cur, t)]
        busy = [t for t in present if await has_rows(cur, t)]
        if busy and not force:
            raise DumpError(f"the database already holds gateway data (in {', '.join(busy)}): restore into an "
                            "empty database, or pass --force to delete that data first")
        if busy:
            await cur.execute("TRUNCATE " + ", ".join(map(quote, present)))
        allowed = set(schema_tables(sql_dir, reader.header.schema_version)) & set(reader.header.tables)
        for section, batches in reader.tables():
            if section.name not in allowed or section.name not in present or section.name in rows:
                raise DumpError(f"{reader.path}: unexpected table {section.name!r} in the dump")
            types = await target_types(cur, section)
            rows[section.name] = 0
            for batch in batches:
                await insert(cur, section, types, batch)
                rows[section.name] += len(batch)
            await reset_sequences(cur, section.name)
        if list(rows) != list(reader.header.tables):
            raise DumpError(f"{reader.path}: the header lists {', '.join(reader.header.tables)} but the file holds "
                            f"{', '.join(rows) or 'no table'}")
    return rows


async def target_types(cur, section: TableSection) -> list[str]:
    """The target's type of each dumped column; a column missing or of another type is refused."""
    target = {c.name: c.type for c in await columns_of(cur, section.name)}
    for column in section.columns:
        if column.name not in target:
            raise DumpError(f"column {section.name}.{column.name} of the dump is not in the database")
        if target[column.name] != column.type:
            raise DumpError(f"column {section.name}.{column.name} is {column.type} in the dump but "
                            f"{target[column.name]} in the database")
    return [target[c.name] for c in section.columns]


async def insert(cur, section: TableSection, types: list[str], batch: list[list]) -> None:
    for row in batch:
        for value, column in zip(row, section.columns):
            if not value_fits(value, column.type):
                raise DumpError(f"a value of {section.name}.{column.name} is not a {column.type}")
    template = "(" + ", ".join(f"(%s)::{t}" for t in types) + ")"  # (-32768)::smallint, not -(32768::smallint)
    values = b",".join(cur.mogrify(template, row) for row in batch)
    columns = ", ".join(quote(c.name) for c in section.columns)
    await cur.execute(f"INSERT INTO {quote(section.name)} ({columns}) OVERRIDING SYSTEM VALUE VALUES ".encode()
                      + values)


def value_fits(value, pg_type: str) -> bool:
    """What the format allows in a column of ``pg_type`` (see dumpfile.py)."""
    if value is None:
        return True
    if pg_type == "boolean":
        return isinstance(value, bool)
    if is_native(pg_type):
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, str)


async def reset_sequences(cur, table: str) -> None:
    """Serial and identity columns continue after the restored rows."""
    await cur.execute("SELECT a.attname, pg_get_serial_sequence(%s, a.attname) FROM pg_attribute a "
                      "WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped",
                      (quote(table), quote(table)))
    for column, sequence in await cur.fetchall():
        if sequence is not None:
            await cur.execute(f"SELECT setval(%s, COALESCE(max({quote(column)}), 1), max({quote(column)}) "
                              f"IS NOT NULL) FROM {quote(table)}", (sequence,))
