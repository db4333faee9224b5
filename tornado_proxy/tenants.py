"""The per-worker memory of virtual keys, teams and users: what authentication reads on every
request, so no request waits on PostgreSQL for its key.

Loaded whole at start, kept current by LISTEN/NOTIFY (each notification names the changed key,
team or user, and only that row is re-read) and by a full re-read every
``user_api_key_cache_ttl`` seconds. A key that is not in memory (created a moment ago on
another instance) is looked up once and remembered, found or not: unknown keys are remembered
for ``invalid_key_cache_ttl`` seconds, and concurrent lookups are coalesced and bounded, so a
flood of bad keys costs PostgreSQL a handful of queries.

Spend columns do not fire the row notifications (see sql/0002_tenants.sql). Spend reaches this
memory by ``add_spend`` (this worker's own requests, at once) and by spend re-reads: each batch
the spend writers (of every worker and instance) commit announces itself once
(``spend:<origin>:<time>``, see spendstore.py), and the listener re-reads only the spend of the
rows updated since the earliest announced time it has not read yet; announcements that come
while a re-read runs are served by one more re-read after it. This worker's own batches are
not taken from the channel but from the writer (``spend_written``), after it has taken them off
``unflushed``, so that a re-read never counts them twice or not at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import replace
from typing import TYPE_CHECKING

from .auth import Principal
from .errors import DatabaseUnavailable
from .keystore import CHANNEL, KEYS, SPEND_NOTE, TEAMS, USERS, KeyRecord, TeamRecord, TenantStore, UserRecord
from .tasks import end_task

if TYPE_CHECKING:
    from .config import Settings
    from .db import Database, Listener

log = logging.getLogger(__name__)

LISTEN_POLL = 1.0
NEGATIVE_MAX = 10_000  # unknown keys remembered at most (oldest forgotten first)
CONCURRENT_LOOKUPS = 4  # per worker: the most database lookups of unknown keys at once


TABLE_PK = {"key": "token", "team": "team_id", "user": "user_id"}


def with_spend(record, cost: float, by_model: dict):
    model_spend = dict(record.model_spend or {})
    for model, value in by_model.items():
        model_spend[model] = model_spend.get(model, 0.0) + value
    return replace(record, spend=record.spend + cost, model_spend=model_spend)


class Tenants:
    def __init__(self, db: Database | None, settings: Settings):
        self.store = TenantStore(db) if db is not None else None
        self.settings = settings
        self.keys: dict[str, KeyRecord] = {}
        self.teams: dict[str, TeamRecord] = {}
        self.users: dict[str, UserRecord] = {}
        self.unknown: OrderedDict[str, float] = OrderedDict()  # token -> when to forget it
        self.connected = False
        self.loaded = False
        self.db_lookups = 0  # unknown keys looked up in the database (a counter for tests/metrics)
        self._pending: dict[str, asyncio.Future] = {}
        self._lookups: asyncio.Semaphore | None = None
        self._watcher: asyncio.Task | None = None
        self.origin = uuid.uuid4().hex  # names this worker's spend events (see add_spend)
        self.unflushed: dict[tuple[str, str], list] = {}  # (kind, id) -> [spend, {model: spend}]
        self.full_reads = 0  # counters for tests and logs: full re-reads, spend re-reads
        self.spend_reads = 0
        self._spend_at: str | None = None  # the earliest announced spend time not re-read yet
        self._spend_wake = asyncio.Event()

    # -- the request path ------------------------------------------------------------------

    async def principal(self, token: str) -> Principal | None:
        """The caller with this key hash; None: no such key. DatabaseUnavailable: unknown here
        and the database cannot say (or the database is down and known keys are not to be trusted)."""
        if not self.connected and self.loaded and not self.settings.allow_requests_on_db_unavailable:
            raise DatabaseUnavailable("key store disconnected")
        key = self.keys.get(token)
        if key is None:
            key = await self.lookup(token)
            if key is None:
                return None
        return Principal("key", key, self.teams.get(key.team_id) if key.team_id else None,
                         self.users.get(key.user_id) if key.user_id else None)

    async def lookup(self, token: str) -> KeyRecord | None:
        forget_at = self.unknown.get(token)
        if forget_at is not None:
            if forget_at > time.monotonic():
                return None
            del self.unknown[token]
        pending = self._pending.get(token)
        if pending is None:
            pending = self._pending[token] = asyncio.ensure_future(self._fetch(token))
            pending.add_done_callback(lambda _f: self._pending.pop(token, None))
        return await asyncio.shield(pending)

    async def _fetch(self, token: str) -> KeyRecord | None:
        if self._lookups is None:
            self._lookups = asyncio.Semaphore(CONCURRENT_LOOKUPS)
        async with self._lookups:
            if token in self.keys:
                return self.keys[token]
            self.db_lookups += 1
            key = await self.store.get(KEYS, token)
            if key is None:
                self.unknown[token] = time.monotonic() + self.settings.invalid_key_cache_ttl
                while len(self.unknown) > NEGATIVE_MAX:
                    self.unknown.popitem(last=False)
                return None
            await self._load_owners(key)
            self.keys[token] = key = self.with_unflushed("key", key)
            return key

    async def _load_owners(self, key: KeyRecord) -> None:
        if key.team_id and key.team_id not in self.teams:
            team = await self.store.get(TEAMS, key.team_id)
            if team is not None:
                self.teams[team.team_id] = self.with_unflushed("team", team)
        if key.user_id and key.user_id not in self.users:
            user = await self.store.get(USERS, key.user_id)
            if user is not None:
                self.users[user.user_id] = self.with_unflushed("user", user)

    # -- keeping the memory current ---------------------------------------------------------

    async def start(self) -> None:
        if self.store is None:
            return
        try:
            await self.refresh()
        except Exception as exc:  # down, or not migrated yet: the watcher keeps trying
            self._lost(exc)
        self._watcher = asyncio.create_task(self.watch())

    async def stop(self) -> None:
        if self._watcher is not None:
            await end_task(self._watcher)

    async def refresh(self) -> None:
        """Re-read every key, team and user; replace the memory whole."""
        teams = {t.team_id: self.with_unflushed("team", t) for t in await self.store.all(TEAMS)}
        users = {u.user_id: self.with_unflushed("user", u) for u in await self.store.all(USERS)}
        keys = {k.token: self.with_unflushed("key", k) for k in await self.store.all(KEYS)}
        self.teams, self.users, self.keys = teams, users, keys
        self.full_reads += 1
        log.debug("key store: full re-read (%d keys, %d teams, %d users)", len(keys), len(teams), len(users))
        self.unknown.clear()
        self.loaded = True
        self._connected()

    async def reload(self, names: set[str]) -> None:
        """Re-read the rows named by notifications (``key:<token>``, ``team:<id>``, ``user:<id>``)."""
        wanted = {"key": set(), "team": set(), "user": set()}
        for name in names:
            kind, _, ident = name.partition(":")
            if kind in wanted and ident:
                wanted[kind].add(ident)
        for kind, table, memory in (("team", TEAMS, self.teams), ("user", USERS, self.users),
                                    ("key", KEYS, self.keys)):
            if not wanted[kind]:
                continue
            log.debug("key store: re-read %d %s row(s)", len(wanted[kind]), kind)
            found = {getattr(r, table.pk): r for r in await self.store.get_many(table, wanted[kind])}
            for ident in wanted[kind]:
                if ident in found:
                    memory[ident] = self.with_unflushed(kind, found[ident])
                else:
                    memory.pop(ident, None)
                if kind == "key":
                    self.unknown.pop(ident, None)

    def spend_announced(self, at: str) -> None:
        """A spend batch committed at ``at``: re-read the spend changed since then (coalesced)."""
        if self._spend_at is None or at < self._spend_at:
            self._spend_at = at
        self._spend_wake.set()

    def spend_written(self, at: str) -> None:
        """This worker's writer committed a batch at ``at`` and has called ``flushed`` for it."""
        self.spend_announced(at)

    async def reread_spend(self) -> None:
        """Re-read the spend of the keys, teams and users updated since the earliest announced
        time, and add this worker's spend not yet written (as every re-read does)."""
        at, self._spend_at = self._spend_at, None
        self._spend_wake.clear()
        if at is None:
            return
        try:
            rows = await self.store.spend_since(at)
        except BaseException:
            self.spend_announced(at)  # read it next time
            raise
        self.spend_reads += 1
        memories = {"key": self.keys, "team": self.teams, "user": self.users}
        for kind, ident, spend, model_spend in rows:
            record = memories[kind].get(ident)
            if record is not None:  # rows not in memory are read whole when first needed
                memories[kind][ident] = self.with_unflushed(kind, replace(record, spend=spend,
                                                                          model_spend=model_spend))
        log.debug("key store: spend re-read since %s (%d row(s))", at, len(rows))

    def add_spend(self, principal: Principal, cost: float, model: str | None) -> list:
        """This worker's own spend, seen at once by its next requests' budget checks (other
        workers' spend arrives with the spend re-reads). It is also kept aside until the
        spend writer has stored it (``flushed``), so that a re-read of a row does not forget
        it meanwhile. Returns the updated key, team and user records."""
        if cost <= 0 or principal.key is None:
            return []
        updated = []
        for kind, memory, ident in self.owners(principal.key.token, principal.key.team_id, principal.key.user_id):
            pending = self.unflushed.setdefault((kind, ident), [0.0, {}])
            pending[0] += cost
            if model:
                pending[1][model] = pending[1].get(model, 0.0) + cost
            record = memory.get(ident)
            if record is not None:
                memory[ident] = with_spend(record, cost, {model: cost} if model else {})
                updated.append(memory[ident])
        return updated

    def owners(self, token: str | None, team_id: str | None, user_id: str | None):
        return [(kind, memory, ident) for kind, memory, ident in
                (("key", self.keys, token), ("team", self.teams, team_id), ("user", self.users, user_id)) if ident]

    def flushed(self, events) -> None:
        """These events' spend is in the database now (or in the spill file): stop adding it."""
        for e in events:
            if e.origin != self.origin or e.spend <= 0:
                continue
            for kind, _memory, ident in self.owners(e.api_key, e.team_id, e.user):
                pending = self.unflushed.get((kind, ident))
                if pending is None:
                    continue
                pending[0] -= e.spend
                if e.model_group in pending[1]:
                    pending[1][e.model_group] -= e.spend
                if pending[0] <= 1e-12:
                    del self.unflushed[(kind, ident)]

    def with_unflushed(self, kind: str, record):
        pending = self.unflushed.get((kind, getattr(record, TABLE_PK[kind])))
        return with_spend(record, pending[0], pending[1]) if pending else record

    def _connected(self) -> None:
        if not self.connected:
            log.info("key store connected")
        self.connected = True

    def _lost(self, exc: Exception) -> None:
        if self.connected or not self.loaded:
            log.warning("key store unavailable (%s): known keys are served from memory", exc)
        self.connected = False

    async def watch(self) -> None:
        from .db import keep_listening  # here, not at import: without a database no process loads the driver

        await keep_listening(self.store.db, CHANNEL, self.refresh, self._listen, self._lost, "key store")

    async def _listen(self, conn: Listener) -> None:
        next_full = time.monotonic() + self.settings.user_api_key_cache_ttl
        while True:
            names = set()
            for payload in await conn.next(LISTEN_POLL, self._spend_wake):
                if not payload.startswith(SPEND_NOTE):
                    names.add(payload)
                    continue
                origin, _, at = payload[len(SPEND_NOTE):].partition(":")
                if origin != self.origin and at:  # this worker's own batches come from its writer
                    self.spend_announced(at)
            if names:
                await self.reload(names)
            if self._spend_at is not None:
                await self.reread_spend()
            if time.monotonic() >= next_full:
                await self.refresh()
                next_full = time.monotonic() + self.settings.user_api_key_cache_ttl
