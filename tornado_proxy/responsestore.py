"""Stored Responses API responses (``store: true``, the default): what ``previous_response_id``,
``GET /v1/responses/{id}`` and ``DELETE /v1/responses/{id}`` read, and every SQL statement on
``proxy_responses`` (the store owns its rows).

Three levels, each read only when the one before does not hold the id:

1. this worker's memory: the latest ``MAX_IN_MEMORY`` responses it saved or read (least recently
   used forgotten first). A copy is served only while the instance still has it (see below): a
   ``DELETE`` on another worker is never contradicted by a stale copy;
2. under ``proxyctl serve``, the instance's directory (``responsedir.py``), shared by all its
   workers and written before the answer goes out, so a follow-up turn finds the response on any
   worker at once;
3. with database storage on, PostgreSQL, written off the answer path (a background task); a write
   that fails is logged and the response stays in this instance. When the database does not
   answer a lookup, ``DatabaseUnavailable`` is raised (the handlers answer 503: "not found" would
   be a guess). An id none of them holds whose embedded time (``responses_format.new_response_id``)
   is a few seconds old is looked up again for up to ``RECENT_WAIT`` seconds: its row may still be
   on its way from the instance that made it. A ``DELETE`` notifies every instance
   (``CHANNEL``); one worker of each listens and drops the instance's copies.

Two kinds of rows: a translated model's response (``response`` + the conversation's
``input_items``, from which a follow-up turn is built), and a pass-through record (an
``openai/`` / ``azure/`` answer: only which deployment holds it, so that GET / DELETE go there).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson

from .errors import DatabaseUnavailable
from .providers.responses_format import response_id_time
from .responsedir import ResponseDirectory
from .tasks import end_task

if TYPE_CHECKING:
    from .db import Database

log = logging.getLogger(__name__)

MAX_IN_MEMORY = 1000   # responses per worker
WRITE_WAIT = 5.0       # seconds stop() waits for writes still running
RECENT = 10.0          # seconds: an id made this recently may not have reached the database yet
CLOCK_SKEW = 5.0       # seconds an id made by another instance may seem to come from the future
RECENT_WAIT = 2.0      # seconds such an id is looked up again before it is a 404
CHANNEL = "proxy_responses_deleted"  # NOTIFY payload: the id a DELETE removed from the database
LISTEN_POLL = 1.0      # seconds between checks that the listening connection is alive
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


def encode(r: StoredResponse) -> bytes:
    """A response as the directory keeps it."""
    return orjson.dumps({"id": r.id, "owner": r.owner, "model": r.model, "deployment_id": r.deployment_id,
                         "response": r.response, "input_items": r.input_items, "created_at": r.created_at})


def decode(data: bytes, response_id: str) -> StoredResponse | None:
    """What ``encode`` wrote (None for anything else: a file is never trusted blindly)."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        obj = None
    try:
        if isinstance(obj, dict) and obj.get("id") == response_id and isinstance(obj.get("owner"), str) \
                and isinstance(obj.get("input_items") or [], list) \
                and isinstance(obj.get("response"), (dict, type(None))):
            return StoredResponse(id=response_id, owner=obj["owner"], model=str(obj.get("model") or ""),
                                  deployment_id=obj.get("deployment_id"), response=obj.get("response"),
                                  input_items=obj.get("input_items") or [],
                                  created_at=float(obj.get("created_at") or 0))
    except (TypeError, ValueError):
        pass
    log.warning("response %s: its file in the responses directory is unreadable; ignored", response_id)
    return None


def recently_made(response_id: str, now: float) -> bool:
    """The id says it was made within the last ``RECENT`` seconds (by any instance)."""
    made = response_id_time(response_id)
    return made is not None and now - RECENT <= made <= now + CLOCK_SKEW


class ResponseStore:
    def __init__(self, db: Database | None, directory: ResponseDirectory | None = None,
                 max_in_memory: int = MAX_IN_MEMORY, watches: bool = False):
        self.db = db
        self.directory = directory
        # with a database: this worker hears the DELETEs of other instances and drops the instance's
        # copies (one worker per instance: the others see the file gone)
        self.watches = watches and db is not None
        self.watcher: asyncio.Task | None = None
        self.listening = False
        self.max_in_memory = max_in_memory
        # id -> (record, shared): shared records are served while their file exists, the others
        # (too large for the directory) while no DELETE marked them
        self.memory: OrderedDict[str, tuple[StoredResponse, bool]] = OrderedDict()
        self.gone: OrderedDict[str, None] = OrderedDict()  # ids this worker deleted lately
        self.writes: set[asyncio.Task] = set()
        self.write_failures = 0  # a counter for tests and logs

    def open(self) -> None:
        """Map the instance's directory (under ``proxyctl serve``; without it, memory only), and
        start listening for other instances' DELETEs."""
        if self.watches:
            self.watcher = asyncio.ensure_future(self.watch())
        if self.directory is None:
            return
        try:
            self.directory.open()
        except OSError as exc:
            log.error("responses directory %s cannot be used (%s): stored responses stay in each worker's "
                      "memory, and a follow-up that reaches another worker gets a 404", self.directory.path, exc)
            self.directory.close()
            self.directory = None

    def remember(self, record: StoredResponse, shared: bool = False) -> None:
        self.memory[record.id] = (record, shared)
        self.memory.move_to_end(record.id)
        while len(self.memory) > self.max_in_memory:
            self.memory.popitem(last=False)

    def keep(self, record: StoredResponse) -> None:
        """In memory and, when there is one, the instance's directory (synchronously)."""
        shared = self.directory is not None and self.directory.put(record.id, encode(record))
        self.remember(record, shared)

    def save(self, record: StoredResponse) -> None:
        """Keep ``record`` now (memory, directory) and write it to the database in the background."""
        self.keep(record)
        if self.db is not None:
            task = asyncio.ensure_future(self.write(record))
            self.writes.add(task)
            task.add_done_callback(self.writes.discard)

    async def write(self, record: StoredResponse) -> None:
        where = "this worker's memory" if self.directory is None else "this instance"
        try:
            await insert(self.db, record)
        except DatabaseUnavailable as exc:
            self.write_failures += 1
            log.warning("response %s kept in %s only: the database is unavailable (%s)", record.id, where, exc)
        except Exception:
            self.write_failures += 1
            log.exception("response %s kept in %s only: writing it failed", record.id, where)

    def cached(self, response_id: str) -> StoredResponse | None:
        """This worker's copy, if the instance has not deleted or pruned the response since."""
        entry = self.memory.get(response_id)
        if entry is None:
            return None
        record, shared = entry
        d = self.directory
        if d is not None and not (d.exists(response_id) if shared else not d.deleted(response_id)):
            del self.memory[response_id]
            return None
        self.memory.move_to_end(response_id)
        return record

    def shared(self, response_id: str) -> StoredResponse | None:
        data = self.directory.read(response_id) if self.directory is not None else None
        record = decode(data, response_id) if data is not None else None
        if record is not None:
            self.remember(record, shared=True)
        return record

    async def get(self, response_id: str) -> StoredResponse | None:
        record = self.cached(response_id) or self.shared(response_id)
        if record is not None or self.db is None:
            return record
        if response_id in self.gone or (self.directory is not None and self.directory.deleted(response_id)):
            return None  # deleted here: no database lookup, and no wait for a row on its way
        record = await fetch(self.db, response_id)  # DatabaseUnavailable: the caller answers 503
        if record is None and recently_made(response_id, time.time()):
            record = await self.fetch_again(response_id)
        if record is not None:
            self.keep(record)
        return record

    async def fetch_again(self, response_id: str) -> StoredResponse | None:
        """A response made a moment ago, maybe by another instance: its row may still be on its
        way. Read again, backing off, for up to ``RECENT_WAIT`` seconds in all."""
        deadline = time.monotonic() + RECENT_WAIT
        delay = 0.05
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(delay, left))
            delay *= 2
            record = await fetch(self.db, response_id)
            if record is not None:
                return record
        return None

    async def delete(self, response_id: str) -> bool:
        """Remove the response everywhere this instance reaches: the database first (when it does
        not answer, DatabaseUnavailable and nothing changed), then the directory and memory."""
        found = False
        if self.db is not None:
            await asyncio.gather(*self.writes, return_exceptions=True)  # a row being written goes too
            found = await remove(self.db, response_id)
        return self.forget(response_id) or found

    def forget(self, response_id: str) -> bool:
        """Remove the instance's copies (the database row stays); True when there was one."""
        found = self.memory.pop(response_id, None) is not None
        self.gone[response_id] = None
        while len(self.gone) > self.max_in_memory:
            self.gone.popitem(last=False)
        if self.directory is not None:
            found = self.directory.remove(response_id) or found
        return found

    async def watch(self) -> None:
        from .db import keep_listening  # here, not at import: without a database no process loads the driver

        await keep_listening(self.db, CHANNEL, self.caught_up, self.listen, self.lost, "responses")

    async def caught_up(self) -> None:
        """(Re)connected. A DELETE made elsewhere while nobody listened here is not heard: the
        copies it concerns stay until pruned."""
        if not self.listening:
            log.info("responses: listening for deletions made by other instances")
        self.listening = True

    async def listen(self, conn) -> None:
        while True:
            for response_id in await conn.next(LISTEN_POLL):
                if response_id in self.memory or (self.directory is not None and self.directory.exists(response_id)):
                    self.forget(response_id)

    def lost(self, exc: Exception) -> None:
        if self.listening:
            log.warning("responses: not hearing other instances' deletions for now (%s)", exc)
        self.listening = False

    async def stop(self) -> None:
        if self.watcher is not None:
            await end_task(self.watcher)
        if self.writes:
            await asyncio.wait(set(self.writes), timeout=WRITE_WAIT)
        if self.directory is not None:
            self.directory.close()


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
    """Delete the row and tell every instance (``CHANNEL``) to drop its copies."""
    async with db.cursor() as cur:
        await cur.execute("WITH gone AS (DELETE FROM proxy_responses WHERE id = %s RETURNING id) "
                          "SELECT pg_notify(%s, id) FROM gone", (response_id, CHANNEL))
        return bool(await cur.fetchall())
