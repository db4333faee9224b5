"""Response caching, the storage: ``LocalCache`` (per worker, bounded LRU with TTL) and
``RedisCache`` (shared; a namespace prefix, a short timeout, skipped while it fails). Keys and
entry shapes are in ``cachekey.py``. Neither ever raises into a request."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

from .cachekey import CacheSettings
from .ratelimit import connect_redis

log = logging.getLogger(__name__)

REDIS_CACHE_TIMEOUT = 0.2  # seconds for one Redis call before the request goes on without the cache
REDIS_CACHE_RETRY = 5.0    # seconds the cache is skipped after a Redis failure
KEY_PREFIX = "litellm-cache:"  # every cache entry's Redis key starts with this (flush deletes only those)


def storage_key(key: str, namespace: str | None) -> str:
    return f"{KEY_PREFIX}{namespace}:{key}" if namespace else f"{KEY_PREFIX}{key}"


class LocalCache:
    """This worker's memory: at most ``max_size`` entries, least recently used dropped first."""

    kind = "local"

    def __init__(self, max_size: int, clock=time.monotonic):
        self.max_size, self.clock = max_size, clock
        self.entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    async def get(self, key: str, namespace: str | None) -> bytes | None:
        name = storage_key(key, namespace)
        found = self.entries.get(name)
        if found is None:
            return None
        if found[0] <= self.clock():
            del self.entries[name]
            return None
        self.entries.move_to_end(name)
        return found[1]

    async def set(self, key: str, namespace: str | None, data: bytes, ttl: float) -> bool:
        name = storage_key(key, namespace)
        self.entries[name] = (self.clock() + ttl, data)
        self.entries.move_to_end(name)
        while len(self.entries) > self.max_size:
            self.entries.popitem(last=False)
        return True

    async def flush(self, namespace: str | None = None) -> int:
        prefix = storage_key("", namespace) if namespace else KEY_PREFIX
        doomed = [k for k in self.entries if k.startswith(prefix)]
        for k in doomed:
            del self.entries[k]
        return len(doomed)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self.entries.clear()


class CacheUnavailable(Exception):
    """Redis did not answer (or is being skipped after a failure)."""


class RedisCache:
    """Entries shared by every worker and instance using one Redis. A failed or slow call is
    logged once per outage and raises ``CacheUnavailable`` (the caller counts it and goes on);
    new calls are then skipped for ``REDIS_CACHE_RETRY`` seconds, after which the next request
    tries again (the client reconnects by itself). A call already under way that succeeds ends
    the skipping at once: one slow answer among many concurrent ones does not turn the cache off
    for seconds while Redis is answering."""

    kind = "redis"

    def __init__(self, client, timeout: float = REDIS_CACHE_TIMEOUT):
        self.client, self.timeout = client, timeout
        self.down_until = 0.0
        self.logged = False

    def usable(self) -> bool:
        return time.monotonic() >= self.down_until

    def failed(self, exc: BaseException) -> None:
        self.down_until = time.monotonic() + REDIS_CACHE_RETRY
        if not self.logged:
            self.logged = True
            log.warning("Redis unavailable for the response cache (%s); requests go on uncached (retry every "
                        "%g s)", type(exc).__name__, REDIS_CACHE_RETRY)

    def recovered(self) -> None:
        self.down_until = 0.0
        if self.logged:
            self.logged = False
            log.info("Redis answers again: the response cache is back")

    async def call(self, command):
        """Run one Redis call within the timeout; raises CacheUnavailable (the failure noted)."""
        try:
            result = await asyncio.wait_for(command, self.timeout)
        except Exception as exc:  # redis errors, OSError, timeouts: the request goes on without the cache
            self.failed(exc)
            raise CacheUnavailable(f"Redis did not answer ({type(exc).__name__})") from None
        self.recovered()
        return result

    def check(self) -> None:
        if not self.usable():
            raise CacheUnavailable("Redis is being skipped after a failure")

    async def get(self, key: str, namespace: str | None) -> bytes | None:
        self.check()
        return await self.call(self.client.get(storage_key(key, namespace)))

    async def set(self, key: str, namespace: str | None, data: bytes, ttl: float) -> bool:
        self.check()
        return bool(await self.call(self.client.set(storage_key(key, namespace), data, px=max(int(ttl * 1000), 1))))

    async def flush(self, namespace: str | None = None) -> int:
        """Delete the cache's entries (one namespace's, or all); raises CacheUnavailable."""
        pattern = (storage_key("", namespace) if namespace else KEY_PREFIX) + "*"
        try:
            deleted = 0
            async for batch in self.batches(pattern):
                deleted += await asyncio.wait_for(self.client.unlink(*batch), self.timeout * 5)
        except Exception as exc:
            raise CacheUnavailable(f"Redis did not answer ({type(exc).__name__})") from None
        return deleted

    async def batches(self, pattern: str):
        cursor = 0
        while True:
            cursor, keys = await asyncio.wait_for(self.client.scan(cursor, match=pattern, count=500),
                                                  self.timeout * 5)
            if keys:
                yield keys
            if not cursor:
                return

    async def ping(self) -> None:
        try:
            await asyncio.wait_for(self.client.ping(), self.timeout * 5)
        except Exception as exc:
            raise CacheUnavailable(f"Redis did not answer ({type(exc).__name__})") from None
        self.recovered()

    async def close(self) -> None:
        await self.client.aclose()


def build_cache(cache: CacheSettings, settings):
    """The store for ``cache`` settings: its own Redis parameters, else router_settings / REDIS_*."""
    if cache.type == "local":
        return LocalCache(cache.max_size)
    url = cache.url or (settings.redis_url.reveal() if settings.redis_url and not cache.host else None)
    password = cache.password or (settings.redis_password.reveal() if settings.redis_password else None)
    client = connect_redis(url, cache.host or settings.redis_host, cache.port or settings.redis_port, password,
                           REDIS_CACHE_TIMEOUT)
    if client is None:
        return None
    return RedisCache(client)
