"""Stored Responses API responses (``store: true``, the default): what ``previous_response_id``,
``GET /v1/responses/{id}`` and ``DELETE /v1/responses/{id}`` read, and every SQL statement on
``proxy_responses`` (the store owns its rows).

Each worker keeps the latest ``MAX_IN_MEMORY`` responses it saved or read (least recently used
forgotten first). With database storage on, every response is also written to PostgreSQL, off
the answer path (a background task started after the answer went out); a write that fails is
logged and the response stays in memory. A lookup reads memory first and PostgreSQL only for an
id this worker does not hold; when the database does not answer then, ``DatabaseUnavailable`` is
raised (the handlers answer 503: "not found" would be a guess).

Two kinds of rows: a translated model's response (``response`` + the conversation's
``input_items``, from which a follow-up turn is built), and a pass-through record (an
``openai/`` / ``azure/`` answer: only which deployment holds it, so that GET / DELETE go there).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson

from .errors import DatabaseUnavailable

if TYPE_CHECKING:
    from .db import Database

log = logging.getLogger(__name__)

MAX_IN_MEMORY = 1000   # responses per worker
WRITE_WAIT = 5.0       # seconds stop() waits for writes still running
COLUMNS = "id, api_key, model, deployment_id, response, input_items, created_at"


@dataclass
class StoredResponse:
    id: str
    owner: str                    # the creating key's hash; "" for the master key (or no auth)
    model: str                    # the model name the request gave
    deployment_id: str | None = None   # pass-through: the deployment that holds the response
    response: dict | None = None       # translated: the response object
    input_items: list = field(default_factory=list)  # translated: the conversation up to this turn
    created_at: float = 0.0

    @property
    def passthrough(self) -> bool:
        return self.response is None

    def conversation(self) -> list[dict]:
        """The items a follow-up turn continues: this turn's input, then its output."""
        return [*self.input_items, *((self.response or {}).get("output") or ())]

    def visible_to(self, token: str | None, admin: bool) -> bool:
        return admin or self.owner == (token or "")


def row_of(record: tuple) -> StoredResponse:
    created = record[6]
    return StoredResponse(id=record[0], owner=record[1], model=record[2], deployment_id=record[3],
                          response=record[4], input_items=record[5] or [],
                          created_at=created.timestamp() if isinstance(created, dt.datetime) else 0.0)


class ResponseStore:
    def __init__(self, db: Database | None, max_in_memory: int = MAX_IN_MEMORY):
        self.db = db
        self.max_in_memory = max_in_memory
        self.memory: OrderedDict[str, StoredResponse] = OrderedDict()
        self.writes: set[asyncio.Task] = set()
        self.write_failures = 0  # a counter for tests and logs

    def remember(self, record: StoredResponse) -> None:
        self.memory[record.id] = record
        self.memory.move_to_end(record.id)
        while len(self.memory) > self.max_in_memory:
            self.memory.popitem(last=False)

    def save(self, record: StoredResponse) -> None:
        """Keep ``record`` now (memory) and write it to the database in the background."""
        self.remember(record)
        if self.db is not None:
            task = asyncio.ensure_future(self.write(record))
            self.writes.add(task)
            task.add_done_callback(self.writes.discard)

    async def write(self, record: StoredResponse) -> None:
        try:
            await insert(self.db, record)
        except DatabaseUnavailable as exc:
            self.write_failures += 1
            log.warning("response %s kept in this worker's memory only: the database is unavailable (%s)",
                        record.id, exc)
        except Exception:
            self.write_failures += 1
            log.exception("response %s kept in this worker's memory only: writing it failed", record.id)

    async def get(self, response_id: str) -> StoredResponse | None:
        record = self.memory.get(response_id)
        if record is not None:
            self.memory.move_to_end(response_id)
            return record
        if self.db is None:
            return None
        record = await fetch(self.db, response_id)  # DatabaseUnavailable: the caller answers 503
        if record is not None:
            self.remember(record)
        return record

    async def delete(self, response_id: str) -> bool:
        found = self.memory.pop(response_id, None) is not None
        if self.db is not None:
            await asyncio.gather(*self.writes, return_exceptions=True)  # a row being written goes too
            found = await remove(self.db, response_id) or found
        return found

    async def stop(self) -> None:
        if self.writes:
            await asyncio.wait(set(self.writes), timeout=WRITE_WAIT)


# --- SQL ---------------------------------------------------------------------------------------

def jsonb(value) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


async def insert(db: Database, r: StoredResponse) -> None:
    async with db.cursor() as cur:
        await cur.execute(
            "INSERT INTO proxy_responses (id, api_key, model, deployment_id, response, input_items, created_at) "
            "VALUES (%s, %s, %s, %s, %s::jsonb, %s::jsonb, to_timestamp(%s)) ON CONFLICT (id) DO NOTHING",
            (r.id, r.owner, r.model, r.deployment_id, jsonb(r.response), jsonb(r.input_items), r.created_at))


async def fetch(db: Database, response_id: str) -> StoredResponse | None:
    async with db.cursor() as cur:
        await cur.execute(f"SELECT {COLUMNS} FROM proxy_responses WHERE id = %s", (response_id,))
        record = await cur.fetchone()
        return row_of(record) if record else None


async def remove(db: Database, response_id: str) -> bool:
    async with db.cursor() as cur:
        await cur.execute("DELETE FROM proxy_responses WHERE id = %s", (response_id,))
        return cur.rowcount > 0
