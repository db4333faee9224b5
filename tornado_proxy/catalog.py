"""The live model catalog of one worker: the config file's models plus, when database storage
is on, the models in PostgreSQL. It owns the database connection's life: migrate and sync at
start-up (under an advisory lock), LISTEN for changes, a periodic full refresh as a safety net,
reconnect with backoff, and config reloads. The registry it publishes is immutable and
replaced whole, so requests in flight keep the deployments they started with.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from .config import Config
from .errors import DatabaseUnavailable
from .modelstore import ModelStore, cipher_for
from .providers.base import Deployment
from .registry import Registry, build_deployment
from .tasks import end_task

if TYPE_CHECKING:
    from .db import Database

log = logging.getLogger(__name__)

NOT_CONFIGURED = "Not connected"  # LiteLLM's readiness wording when no database is set
CONNECTED = "connected"
DISCONNECTED = "disconnected"
LISTEN_POLL = 1.0  # how often a silent listener checks its connection is still alive


def storage_problem(config: Config) -> str | None:
    """Why database storage cannot be used; None when it can (or is not asked for)."""
    s = config.settings
    if not s.store_model_in_db:
        return None
    if not s.database_url:
        return "store_model_in_db is on but no database_url / DATABASE_URL is set"
    if cipher_for(s, config.environ) is None:
        return "store_model_in_db needs LITELLM_SALT_KEY or a master key to encrypt stored secrets"
    return None


def make_database(config: Config) -> Database:
    # Imported here: the PostgreSQL driver (psycopg2 + aiopg, ~16 MB resident) is loaded only
    # by processes that use a database.
    from .db import Database

    s = config.settings
    timeout = s.database_connection_timeout
    return Database(s.database_url.reveal(), pool_size=s.database_connection_pool_limit,
                    statement_timeout_ms=int(timeout * 1000), connect_timeout=timeout)


def keep_loaded(fresh, loaded, undecryptable) -> tuple[tuple[Deployment, ...], list[str]]:
    """``fresh`` with each row this worker can no longer decrypt replaced by the deployment it had
    loaded from it, if any: after ``proxyctl db rotate-key``, instances still running with the
    old key keep serving until they are restarted with the new one. Also returns the kept ids."""
    good = {d.id: d for d in loaded if d.problem is None}
    bad = set(undecryptable)
    out = tuple(good.get(d.id, d) if d.id in bad else d for d in fresh)
    return out, [d.id for d in fresh if d.id in bad and d.id in good]


class Catalog:
    def __init__(self, config: Config, generation: int = 1):
        self.config = config
        self.generation = generation
        self.store: ModelStore | None = None
        self.db_state = NOT_CONFIGURED
        self.db_error: str | None = None
        self.synced_generation = 0  # the config generation last synced into the database
        self._yaml = self._yaml_deployments(config)
        self._db: tuple[Deployment, ...] = ()
        self.registry = self._build()
        self._watcher: asyncio.Task | None = None
        self._refresh_lock = asyncio.Lock()
        problem = storage_problem(config)
        if problem:
            log.warning("database storage is off: %s", problem)
        elif config.settings.store_model_in_db:
            self.store = ModelStore(make_database(config), cipher_for(config.settings, config.environ),
                                    config.environ, config.own_env)
            self.db_state = DISCONNECTED

    @staticmethod
    def _yaml_deployments(config: Config) -> tuple[Deployment, ...]:
        return tuple(build_deployment(spec, config.environ) for spec in config.models)

    def _build(self) -> Registry:
        return Registry.build(self._yaml + self._db, self.generation,
                              self.config.router_settings.get("model_group_alias"))

    async def start(self, require_db: bool = False) -> None:
        if self.store is None:
            return
        try:
            await self.connect()
        except DatabaseUnavailable as exc:
            if require_db:
                raise
            self._lost(exc)
        self._watcher = asyncio.create_task(self.watch())

    async def stop(self) -> None:
        if self._watcher is not None:
            await end_task(self._watcher)
            if not self._watcher.cancelled() and self._watcher.exception() is not None:
                log.error("model watcher ended with %r", self._watcher.exception())
        if self.store is not None:
            await self.store.db.close()

    async def connect(self) -> None:
        """Migrate and sync (once per config generation), then load the database models."""
        if self.synced_generation != self.generation:
            plan = await self.store.sync(self.config.models)
            if not plan.empty:
                log.info("synced config models into the database: %d added, %d changed, %d removed",
                         len(plan.added), len(plan.changed), len(plan.removed))
            self.synced_generation = self.generation
        await self.refresh()

    async def refresh(self) -> None:
        """Re-read the database models; publish a new registry if anything changed."""
        async with self._refresh_lock:
            yaml_ids = {d.id for d in self._yaml}
            known_bad = self.store.undecryptable
            fresh, kept = keep_loaded(await self.store.deployments(exclude_ids=yaml_ids), self._db,
                                      self.store.undecryptable)
            self._connected()
            if self.store.undecryptable and self.store.undecryptable != known_bad:
                bad = self.store.undecryptable
                log.warning("%d stored model(s) cannot be decrypted with the current LITELLM_SALT_KEY / master "
                            "key (changed since they were stored?); requests for them get a 400 until they "
                            "are re-added through /model/update: %s%s", len(bad), ", ".join(bad),
                            f". {len(kept)} of them keep being served as this worker loaded them before (the key "
                            "was rotated? restart this instance with the new key)" if kept else "")
            if fresh != self._db:
                self._db = fresh
                self.registry = self._build()
                log.info("model registry now has %d deployments (%d from the database)",
                         len(self.registry.deployments), len(fresh))

    def _connected(self) -> None:
        if self.db_state != CONNECTED:
            log.info("database connected")
        self.db_state, self.db_error = CONNECTED, None

    def _lost(self, exc: Exception) -> None:
        if self.db_state != DISCONNECTED or self.db_error is None:
            log.warning("database unavailable (%s): serving the last known models", exc)
        self.db_state, self.db_error = DISCONNECTED, str(exc)

    async def watch(self) -> None:
        """LISTEN for changes; refresh on each, and fully every ``model_refresh_interval``."""
        from .db import CHANNEL, keep_listening  # here, not at import: without a database no process loads the driver

        async def catch_up() -> None:
            await (self.connect() if self.synced_generation != self.generation else self.refresh())

        await keep_listening(self.store.db, CHANNEL, catch_up, self._listen, self._lost, "model")

    async def _listen(self, conn) -> None:
        next_full = time.monotonic() + self.config.settings.model_refresh_interval
        while True:
            # a burst of changes comes as one set: one refresh
            if not await conn.next(LISTEN_POLL) and time.monotonic() < next_full:
                continue
            await self.refresh()
            next_full = time.monotonic() + self.config.settings.model_refresh_interval

    async def reload(self, config: Config, generation: int) -> None:
        """Swap in a new, already validated config: its models now, the database sync next."""
        self.config, self.generation = config, generation
        self._yaml = self._yaml_deployments(config)
        self.registry = self._build()
        if self.store is not None:
            self.store.environ, self.store.own_env = config.environ, config.own_env
            try:
                await self.connect()
            except DatabaseUnavailable as exc:
                self._lost(exc)  # the watcher syncs once the database is back
