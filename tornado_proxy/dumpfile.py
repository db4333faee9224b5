"""The file format of ``proxyctl db dump`` / ``restore``: gzip'd JSON lines, written and read as
a stream (never a whole table in memory). Pure apart from the file itself; the database side is
``backup.py``.

Format version 1, one JSON value per line:

1. the header, an object: ``format`` ("tornado-proxy-dump"), ``format_version`` (1),
   ``gateway_version``, ``schema_version`` (the newest migration applied to the dumped database,
   e.g. "0003"), ``migrations`` (their file names), ``created_at`` (UTC, ISO 8601), ``tables``
   (the tables in the file, in file order: a table comes after the tables it references),
   ``excluded`` (tables of the schema left out: the spend log without ``--include-spend-logs``)
   and ``spend_logs`` (``{"included", "since", "until"}``);
2. for each table: ``{"table": name, "columns": [{"name", "type"}, ...]}`` (``type`` as
   PostgreSQL's ``format_type`` spells it), then one JSON array per row with the values in
   column order, then ``{"end": name, "rows": n}``;
3. ``{"end_of_dump": true, "rows": total}``: a file without it is incomplete and is refused.

A value is ``null`` (SQL NULL), a JSON boolean (``boolean`` columns), a JSON integer
(``smallint``, ``integer``, ``bigint``), or else a string holding PostgreSQL's own text form of
the value (timestamps with their UTC offset and microseconds, ``numeric`` digits, ``jsonb``
text, ``bytea`` hex, array literals, floats with every digit), which restore turns back with a
cast to the column's type: the round trip is exact.
"""

from __future__ import annotations

import datetime as dt
import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

import orjson

FORMAT = "tornado-proxy-dump"
FORMAT_VERSION = 1
NATIVE = {"boolean": bool, "smallint": int, "integer": int, "bigint": int}  # stored as JSON values


class DumpError(Exception):
    """A dump file that cannot be written or read (the message says why)."""


def is_native(pg_type: str) -> bool:
    return pg_type in NATIVE


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # format_type(): "text", "timestamp with time zone", "text[]", ...


@dataclass(frozen=True)
class Header:
    gateway_version: str
    schema_version: str
    migrations: tuple[str, ...]
    created_at: str
    tables: tuple[str, ...]
    excluded: tuple[str, ...]
    spend_logs: dict

    def to_json(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "gateway_version": self.gateway_version,
                "schema_version": self.schema_version, "migrations": list(self.migrations),
                "created_at": self.created_at, "tables": list(self.tables), "excluded": list(self.excluded),
                "spend_logs": self.spend_logs}

    @classmethod
    def parse(cls, doc: Any, where: str) -> Header:
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise DumpError(f"{where}: not a tornado-proxy dump (no {FORMAT!r} header)")
        version = doc.get("format_version")
        if not isinstance(version, int):
            raise DumpError(f"{where}: the header has no format_version")
        if version > FORMAT_VERSION:
            raise DumpError(f"{where}: dump format {version} was written by a newer tornado-proxy "
                            f"({doc.get('gateway_version')}); this one reads format {FORMAT_VERSION} and older: "
                            "restore it with that version or a later one")
        try:
            return cls(gateway_version=str(doc["gateway_version"]), schema_version=str(doc["schema_version"]),
                       migrations=tuple(doc["migrations"]), created_at=str(doc["created_at"]),
                       tables=tuple(doc["tables"]), excluded=tuple(doc.get("excluded") or ()),
                       spend_logs=dict(doc.get("spend_logs") or {}))
        except (KeyError, TypeError) as exc:
            raise DumpError(f"{where}: the header lacks {exc}") from None


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat().replace("+00:00", "Z")


class DumpWriter:
    """Writes a dump to ``path`` through a temporary file beside it (mode 0600: it holds key
    hashes and encrypted secrets), renamed into place only by ``commit()``."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as exc:
            raise DumpError(f"{path}: {exc.strerror}") from None
        self._raw: IO[bytes] = os.fdopen(fd, "wb")
        self._gz = gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, compresslevel=6, mtime=0)
        self.rows = 0
        self._table_rows = 0

    def _line(self, value: Any) -> None:
        self._gz.write(orjson.dumps(value) + b"\n")

    def header(self, header: Header) -> None:
        self._line(header.to_json())

    def begin_table(self, name: str, columns: list[Column]) -> None:
        self._line({"table": name, "columns": [{"name": c.name, "type": c.type} for c in columns]})
        self._table_rows = 0

    def row(self, values: tuple | list) -> None:
        self._line(list(values))
        self._table_rows += 1

    def end_table(self, name: str) -> int:
        self._line({"end": name, "rows": self._table_rows})
        self.rows += self._table_rows
        return self._table_rows

    def commit(self) -> None:
        self._line({"end_of_dump": True, "rows": self.rows})
        self._gz.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self._gz.close()
            self._raw.close()
        finally:
            self.tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class TableSection:
    name: str
    columns: tuple[Column, ...]


class DumpReader:
    """Reads a dump as a stream: ``header`` at once, then ``tables()`` yields each table's
    section with an iterator of row batches; counts and the end marker are checked as it goes."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._gz = gzip.open(path, "rb")
            first = self._gz.readline()
        except FileNotFoundError:
            raise DumpError(f"{path}: no such file") from None
        except (OSError, EOFError) as exc:
            raise DumpError(f"{path}: not a gzip'd tornado-proxy dump ({exc})") from None
        self.header = Header.parse(self._parse(first), str(path))
        self.rows = 0

    def close(self) -> None:
        self._gz.close()

    def _parse(self, line: bytes) -> Any:
        if not line:
            raise DumpError(f"{self.path}: the file ends early (an interrupted dump?)")
        try:
            return orjson.loads(line)
        except orjson.JSONDecodeError:
            raise DumpError(f"{self.path}: a line is not JSON (a damaged file?)") from None

    def _next(self) -> Any:
        try:
            return self._parse(self._gz.readline())
        except (OSError, EOFError) as exc:
            raise DumpError(f"{self.path}: the file is damaged or cut short ({exc})") from None

    def tables(self) -> Iterator[tuple[TableSection, Iterator[list[list]]]]:
        """(section, batches of rows) per table; each batch iterator must be used up before the next table."""
        while True:
            item = self._next()
            if isinstance(item, dict) and item.get("end_of_dump"):
                if item.get("rows") != self.rows:
                    raise DumpError(f"{self.path}: the end marker counts {item.get('rows')} rows, the file holds "
                                    f"{self.rows}")
                return
            if not isinstance(item, dict) or not isinstance(item.get("table"), str):
                raise DumpError(f"{self.path}: expected a table section, found {str(item)[:60]!r}")
            columns = tuple(Column(c["name"], c["type"]) for c in item["columns"])
            section = TableSection(item["table"], columns)
            yield section, self._batches(section)

    def _batches(self, section: TableSection, size: int = 500) -> Iterator[list[list]]:
        batch: list[list] = []
        count = 0
        while True:
            item = self._next()
            if isinstance(item, list):
                if len(item) != len(section.columns):
                    raise DumpError(f"{self.path}: a row of {section.name} has {len(item)} values for "
                                    f"{len(section.columns)} columns")
                batch.append(item)
                count += 1
                if len(batch) >= size:
                    yield batch
                    batch = []
                continue
            if isinstance(item, dict) and item.get("end") == section.name:
                if item.get("rows") != count:
                    raise DumpError(f"{self.path}: {section.name} should hold {item.get('rows')} rows, the file "
                                    f"has {count}")
                if batch:
                    yield batch
                self.rows += count
                return
            raise DumpError(f"{self.path}: unexpected line in table {section.name}: {str(item)[:60]!r}")
