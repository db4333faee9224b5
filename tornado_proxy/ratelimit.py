"""Rate limits per key, team and user: requests and tokens per minute, and parallel requests.

Counting is exact across every worker of one instance: the supervisor creates one
:class:`LimitTable` (an anonymous shared memory mapping of fixed-size slots, guarded by an
``fcntl`` lock on an unlinked file) before it forks, and every worker inherits it. With Redis
configured, counts are shared across instances through one Lua script per admission; a Redis
outage falls back to the table (the instance's own counts) without failing a request.

Windows are fixed calendar minutes (``int(now // 60)``), as LiteLLM counts them. A request is
counted only when it is admitted: a refusal by any scope charges no scope. Tokens are added to
the minute in which the request finishes.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import math
import mmap
import os
import struct
import tempfile
import time
import uuid
import weakref
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Sequence

from .errors import RateLimitError

log = logging.getLogger(__name__)

WINDOW = 60                 # seconds in a rate-limit window (a calendar minute)
DEFAULT_SLOTS = 65536       # scopes the shared table can follow at once
MAX_PROBE = 32              # a scope lives within this many slots of its home slot
REDIS_TIMEOUT = 0.2         # seconds for one Redis call before falling back to the table
REDIS_RETRY = 5.0           # seconds before trying Redis again after a failure
PARALLEL_LEASE = 600.0      # seconds a Redis parallel slot outlives an instance that died holding it
TABLE_FULL_LOG_EVERY = 60.0

# The names LiteLLM uses in its messages and x-ratelimit-<descriptor>-... headers.
DESCRIPTOR = {"key": "api_key", "team": "team", "user": "user"}
LIMIT_TYPES = ("requests", "tokens", "max_parallel_requests")

# One slot: scope hash (0 = never used), window, requests and tokens in that window, parallel
# requests of all workers; then one parallel count per worker, so that the supervisor can give
# back the slots of a worker that died.
HEAD = struct.Struct("<Qqqqq")
COUNT = struct.Struct("<q")


@dataclass(frozen=True)
class LimitScope:
    """What one key, team or user may do. ``id``: the key's hash, the team id or the user id."""

    kind: str  # "key" | "team" | "user"
    id: str
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    max_parallel_requests: int | None = None
    slot_key: int = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.kind not in DESCRIPTOR:
            raise ValueError(f"LimitScope kind must be key, team or user, not {self.kind!r}")
        digest = hashlib.blake2b(f"{self.kind}\0{self.id}".encode(), digest_size=8).digest()
        object.__setattr__(self, "slot_key", int.from_bytes(digest, "little") or 1)

    @property
    def limited(self) -> bool:
        return self.rpm_limit is not None or self.tpm_limit is not None or self.max_parallel_requests is not None


@dataclass(frozen=True)
class Usage:
    """One scope's counts after an admission (or at a refusal): this window's requests and
    tokens, and the requests running now."""

    scope: LimitScope
    requests: int
    tokens: int
    parallel: int


class Admission:
    """An admitted request. Hand it to :meth:`RateLimiter.finish` exactly once (more is harmless)."""

    __slots__ = ("scopes", "entries", "token", "headers", "finished", "worker")

    def __init__(self, scopes: tuple[LimitScope, ...], entries: tuple, token: str | None,
                 headers: dict[str, str], worker: int):
        self.scopes = scopes
        self.entries = entries  # table: ((slot offset, slot key), ...); Redis: ()
        self.token = token      # Redis admissions: the member in each scope's parallel set
        self.headers = headers  # x-ratelimit-* for the response
        self.finished = False
        self.worker = worker


class LimitTable:
    """Fixed-size open-addressing table in shared memory. Create it before forking; every
    process that inherits it counts in the same slots. A full neighbourhood (``MAX_PROBE``
    slots with live scopes) leaves a scope unlimited for that request, with a warning."""

    def __init__(self, slots: int = DEFAULT_SLOTS, workers: int = 1):
        self.slots, self.workers = slots, workers
        self.slot_size = HEAD.size + COUNT.size * workers
        self.mem = mmap.mmap(-1, slots * self.slot_size)  # anonymous, MAP_SHARED: shared by fork
        # fcntl locks die with their process: a worker killed inside admit cannot wedge the rest
        self.lock_fd, lock_path = tempfile.mkstemp(prefix="tornado-proxy-limits-")
        os.unlink(lock_path)
        self.full_logged = -TABLE_FULL_LOG_EVERY
        # a table nobody closes (a Gateway that was never stopped) still gives its fd back
        self.closer = weakref.finalize(self, release_table, self.mem, self.lock_fd)

    def close(self) -> None:
        self.closer()

    def admit(self, scopes: Sequence[LimitScope], now: float, worker: int) -> tuple[tuple, list[Usage]]:
        """Count one request for every limited scope, or for none if any scope refuses (then
        :class:`Refusal` is raised). Returns ``((slot offset, slot key), ...)`` for ``finish``
        and each counted scope's usage after this request."""
        window = int(now // WINDOW)
        mem, head, count, fd = self.mem, HEAD, COUNT, self.lock_fd
        found = []
        fcntl.lockf(fd, fcntl.LOCK_EX)
        try:
            for scope in scopes:
                if not scope.limited:
                    continue
                off = self.find(scope.slot_key, window)
                if off < 0:
                    self.report_full(scope)
                    continue
                _, w, requests, tokens, parallel = head.unpack_from(mem, off)
                if w != window:
                    requests = tokens = 0
                limit_type = over_limit(scope, requests, tokens, parallel)
                if limit_type is not None:
                    raise Refusal(limit_type, Usage(scope, requests, tokens, parallel))
                found.append((scope, off, requests + 1, tokens, parallel + 1))
            col = HEAD.size + COUNT.size * worker
            for scope, off, requests, tokens, parallel in found:
                head.pack_into(mem, off, scope.slot_key, window, requests, tokens, parallel)
                count.pack_into(mem, off + col, count.unpack_from(mem, off + col)[0] + 1)
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN)
        return (tuple((off, scope.slot_key) for scope, off, *_ in found),
                [Usage(scope, r, t, p) for scope, _, r, t, p in found])

    def finish(self, entries: tuple, tokens: int, now: float, worker: int) -> None:
        """Give back the parallel slot and add ``tokens`` to this window of every scope."""
        window = int(now // WINDOW)
        mem, head, count = self.mem, HEAD, COUNT
        col = HEAD.size + COUNT.size * worker
        fcntl.lockf(self.lock_fd, fcntl.LOCK_EX)
        try:
            for off, key in entries:
                k, w, requests, spent, parallel = head.unpack_from(mem, off)
                if k != key:  # cannot happen while parallel > 0 pins the slot; never corrupt another scope
                    continue
                if w != window:
                    w, requests, spent = window, 0, 0
                mine = count.unpack_from(mem, off + col)[0]
                if mine > 0:  # 0: the supervisor already gave this worker's slots back
                    count.pack_into(mem, off + col, mine - 1)
                    parallel -= 1
                head.pack_into(mem, off, k, w, requests, spent + max(tokens, 0), max(parallel, 0))
        finally:
            fcntl.lockf(self.lock_fd, fcntl.LOCK_UN)

    def release_worker(self, worker: int) -> int:
        """A worker died: its running requests will never finish. Returns the slots released."""
        mem, head, count = self.mem, HEAD, COUNT
        col = HEAD.size + COUNT.size * worker
        released = 0
        fcntl.lockf(self.lock_fd, fcntl.LOCK_EX)
        try:
            for off in range(0, self.slots * self.slot_size, self.slot_size):
                mine = count.unpack_from(mem, off + col)[0]
                if mine:
                    k, w, requests, tokens, parallel = head.unpack_from(mem, off)
                    head.pack_into(mem, off, k, w, requests, tokens, max(parallel - mine, 0))
                    count.pack_into(mem, off + col, 0)
                    released += mine
        finally:
            fcntl.lockf(self.lock_fd, fcntl.LOCK_UN)
        return released

    def usage(self, scope: LimitScope, now: float) -> Usage:
        """The scope's counts as the table has them (for headers, tests and operators)."""
        window = int(now // WINDOW)
        fcntl.lockf(self.lock_fd, fcntl.LOCK_EX)
        try:
            off = self.lookup(scope.slot_key)
            if off < 0:
                return Usage(scope, 0, 0, 0)
            _, w, requests, tokens, parallel = HEAD.unpack_from(self.mem, off)
        finally:
            fcntl.lockf(self.lock_fd, fcntl.LOCK_UN)
        return Usage(scope, requests if w == window else 0, tokens if w == window else 0, parallel)

    def lookup(self, key: int) -> int:
        """The offset of ``key``'s slot, or -1. Caller holds the lock."""
        home = key % self.slots
        for i in range(MAX_PROBE):
            off = ((home + i) % self.slots) * self.slot_size
            k = HEAD.unpack_from(self.mem, off)[0]
            if k == key:
                return off
            if k == 0:
                return -1
        return -1

    def find(self, key: int, window: int) -> int:
        """``key``'s slot, claiming a free or stale one (no running request, an older window)
        when it has none; -1 when all ``MAX_PROBE`` slots are live. Caller holds the lock.
        Slots are never emptied, only reused, so a probe may stop at the first empty slot."""
        home, mem, size = key % self.slots, self.mem, self.slot_size
        spare = -1
        for i in range(MAX_PROBE):
            off = ((home + i) % self.slots) * size
            k, w, _, _, parallel = HEAD.unpack_from(mem, off)
            if k == key:
                return off
            if k == 0:
                spare = off if spare < 0 else spare
                break
            if spare < 0 and parallel == 0 and w < window:
                spare = off
        if spare >= 0:
            HEAD.pack_into(mem, spare, key, window, 0, 0, 0)
            mem[spare + HEAD.size:spare + size] = bytes(size - HEAD.size)
        return spare

    def report_full(self, scope: LimitScope) -> None:
        now = time.monotonic()
        if now - self.full_logged >= TABLE_FULL_LOG_EVERY:
            self.full_logged = now
            log.warning("rate-limit table full (%d slots): %s %s is not limited for this request; "
                        "more scopes are active this minute than the table holds", self.slots,
                        DESCRIPTOR[scope.kind], scope.id)


def release_table(mem: mmap.mmap, fd: int) -> None:
    mem.close()
    os.close(fd)


def over_limit(scope: LimitScope, requests: int, tokens: int, parallel: int) -> str | None:
    """Which limit the next request would break, if any (requests, tokens, then parallel)."""
    if scope.rpm_limit is not None and requests >= scope.rpm_limit:
        return "requests"
    if scope.tpm_limit is not None and tokens >= scope.tpm_limit:
        return "tokens"
    if scope.max_parallel_requests is not None and parallel >= scope.max_parallel_requests:
        return "max_parallel_requests"
    return None


class Refusal(Exception):
    """Internal: which limit of which scope refused, with its counts."""

    def __init__(self, limit_type: str, usage: Usage):
        super().__init__(limit_type)
        self.limit_type, self.usage = limit_type, usage


def limit_of(scope: LimitScope, limit_type: str) -> int | None:
    return {"requests": scope.rpm_limit, "tokens": scope.tpm_limit,
            "max_parallel_requests": scope.max_parallel_requests}[limit_type]


def rate_headers(usages: Sequence[Usage]) -> dict[str, str]:
    """LiteLLM's headers: ``x-ratelimit-<api_key|team|user>-{remaining,limit}-<type>`` for every
    limit set, and OpenAI's ``x-ratelimit-{remaining,limit}-{requests,tokens}`` from the scope
    with the fewest remaining."""
    headers: dict[str, str] = {}
    tightest: dict[str, tuple[int, int]] = {}
    for u in usages:
        prefix = "x-ratelimit-" + DESCRIPTOR[u.scope.kind]
        for limit_type, used in (("requests", u.requests), ("tokens", u.tokens),
                                 ("max_parallel_requests", u.parallel)):
            limit = limit_of(u.scope, limit_type)
            if limit is None:
                continue
            remaining = max(limit - used, 0)
            headers[f"{prefix}-remaining-{limit_type}"] = str(remaining)
            headers[f"{prefix}-limit-{limit_type}"] = str(limit)
            if limit_type != "max_parallel_requests" and (
                    limit_type not in tightest or remaining < tightest[limit_type][0]):
                tightest[limit_type] = (remaining, limit)
    for limit_type, (remaining, limit) in tightest.items():
        headers[f"x-ratelimit-remaining-{limit_type}"] = str(remaining)
        headers[f"x-ratelimit-limit-{limit_type}"] = str(limit)
    return headers


def refusal_error(refusal: Refusal, now: float) -> RateLimitError:
    """The 429, worded as LiteLLM words it, with ``Retry-After`` and the x-ratelimit headers."""
    scope, limit_type = refusal.usage.scope, refusal.limit_type
    reset = (int(now // WINDOW) + 1) * WINDOW
    reset_at = datetime.fromtimestamp(reset, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    if limit_type == "max_parallel_requests":
        retry_after, resets = 1, "Limit resets when a running request finishes"
    else:
        retry_after, resets = max(1, math.ceil(reset - now)), f"Limit resets at: {reset_at}"
    message = (f"Rate limit exceeded for {DESCRIPTOR[scope.kind]}: {scope.id}. Limit type: {limit_type}. "
               f"Current limit: {limit_of(scope, limit_type)}, Remaining: 0. {resets}")
    headers = rate_headers([refusal.usage])
    headers.update({"Retry-After": str(retry_after), "rate_limit_type": limit_type, "reset_at": reset_at})
    return RateLimitError(message, headers=headers)


class RateLimiter:
    """``await admit(scopes)`` before calling a provider, ``finish(admission, tokens)`` after.

    ``table`` is the instance's shared table (or a process-local one); ``redis`` an optional
    ``redis.asyncio`` client whose counts are shared by every instance using it."""

    def __init__(self, table: LimitTable, worker: int = 0, redis=None, rejections=None):
        self.table, self.worker = table, worker
        self.rejections = rejections  # a Counter labelled (scope kind, limit type), or None
        self.redis = RedisCounters(redis) if redis is not None else None
        self.pending: set[asyncio.Task] = set()

    async def admit(self, scopes: Sequence[LimitScope], now: float | None = None) -> Admission:
        """Count the request for every limited scope, or raise ``RateLimitError`` (429) naming
        the first limit hit; a refused request is not counted anywhere."""
        now = time.time() if now is None else now
        scopes = tuple(s for s in scopes if s.limited)
        if not scopes:
            return Admission(scopes, (), None, {}, self.worker)
        try:
            if self.redis is not None and self.redis.usable():
                result = await self.redis.admit(scopes, now)
                if result is not None:
                    token, usages = result
                    return Admission(scopes, (), token, rate_headers(usages), self.worker)
            entries, usages = self.table.admit(scopes, now, self.worker)
        except Refusal as refusal:
            if self.rejections is not None:
                self.rejections.labels(refusal.usage.scope.kind, refusal.limit_type).inc()
            raise refusal_error(refusal, now) from None
        return Admission(scopes, entries, None, rate_headers(usages), self.worker)

    def finish(self, admission: Admission, tokens: int, now: float | None = None) -> None:
        """Release the parallel slot and add ``tokens`` to this minute of every scope. Safe to
        call more than once: only the first call counts. Never raises, never waits."""
        if admission.finished:
            return
        admission.finished = True
        now = time.time() if now is None else now
        if admission.entries:
            self.table.finish(admission.entries, tokens, now, admission.worker)
        elif admission.token is not None and self.redis is not None:
            task = asyncio.ensure_future(self.redis.finish(admission.scopes, admission.token, tokens, now))
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)

    async def flush(self) -> None:
        """Wait for the Redis updates ``finish`` has sent on their way."""
        if self.pending:
            await asyncio.gather(*self.pending, return_exceptions=True)

    async def close(self) -> None:
        await self.flush()
        if self.redis is not None:
            await self.redis.close()


# KEYS: per scope, its requests and tokens counters for this window and its parallel set.
# ARGV: now, lease deadline, admission token, window TTL, then per scope rpm, tpm, parallel
# limits (-1: none). Counts only when no scope refuses; returns {1, r, t, p, ...} with the counts
# after admission, or {0, scope index, limit type, r, t, p} for the first refusal.
ADMIT_SCRIPT = """
local now, deadline, token, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local counts = {}
for i = 1, #KEYS / 3 do
  local rk, tk, pk = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local rpm, tpm, par = tonumber(ARGV[3 * i + 2]), tonumber(ARGV[3 * i + 3]), tonumber(ARGV[3 * i + 4])
  redis.call('ZREMRANGEBYSCORE', pk, '-inf', now)
  local r, t, p = tonumber(redis.call('GET', rk) or '0'), tonumber(redis.call('GET', tk) or '0'), redis.call('ZCARD', pk)
  local over = nil
  if rpm >= 0 and r >= rpm then over = 'requests'
  elseif tpm >= 0 and t >= tpm then over = 'tokens'
  elseif par >= 0 and p >= par then over = 'max_parallel_requests' end
  if over then return {0, i, over, r, t, p} end
  counts[i] = {r, t, p}
end
local out = {1}
for i = 1, #KEYS / 3 do
  local rk, pk = KEYS[3 * i - 2], KEYS[3 * i]
  redis.call('INCR', rk)
  redis.call('EXPIRE', rk, ttl)
  redis.call('ZADD', pk, deadline, token)
  redis.call('EXPIRE', pk, math.ceil(deadline - now) + 1)
  table.insert(out, counts[i][1] + 1)
  table.insert(out, counts[i][2])
  table.insert(out, counts[i][3] + 1)
end
return out
"""


def redis_keys(scope: LimitScope, window: int) -> tuple[str, str, str]:
    tag = f"tornado_proxy:rl:{{{scope.kind}:{scope.id}}}"
    return f"{tag}:{window}:requests", f"{tag}:{window}:tokens", f"{tag}:parallel"


class RedisCounters:
    """The cross-instance backend. Any Redis error or timeout makes ``admit`` return None (the
    caller then uses the table), logs once, and keeps Redis aside for ``REDIS_RETRY`` seconds."""

    def __init__(self, client):
        self.client = client
        self.script = client.register_script(ADMIT_SCRIPT)
        self.down_until = 0.0
        self.down = False

    def usable(self) -> bool:
        return time.monotonic() >= self.down_until

    def failed(self, exc: BaseException) -> None:
        self.down_until = time.monotonic() + REDIS_RETRY
        if not self.down:
            self.down = True
            log.warning("Redis unavailable for rate limits (%s); counting in this instance's table until it "
                        "answers again (retry every %g s)", type(exc).__name__, REDIS_RETRY)

    def recovered(self) -> None:
        if self.down:
            self.down = False
            log.info("Redis answers again: rate limits are shared across instances")

    async def admit(self, scopes: tuple[LimitScope, ...], now: float):
        window = int(now // WINDOW)
        keys, args = [], [now, now + PARALLEL_LEASE, uuid.uuid4().hex, 2 * WINDOW]
        for scope in scopes:
            keys += redis_keys(scope, window)
            args += [-1 if v is None else v for v in (scope.rpm_limit, scope.tpm_limit, scope.max_parallel_requests)]
        try:
            reply = await asyncio.wait_for(self.script(keys=keys, args=args), REDIS_TIMEOUT)
        except Exception as exc:  # connection refused, timeout, auth, script error: the table takes over
            self.failed(exc)
            return None
        self.recovered()
        if int(reply[0]) == 0:
            scope = scopes[int(reply[1]) - 1]
            limit_type = reply[2].decode() if isinstance(reply[2], bytes) else reply[2]
            usage = Usage(scope, int(reply[3]), int(reply[4]), int(reply[5]))
            raise Refusal(limit_type, usage)  # RateLimiter.admit counts it and answers the 429
        usages = [Usage(s, int(reply[1 + 3 * i]), int(reply[2 + 3 * i]), int(reply[3 + 3 * i]))
                  for i, s in enumerate(scopes)]
        return args[2], usages

    async def finish(self, scopes: tuple[LimitScope, ...], token: str, tokens: int, now: float) -> None:
        window = int(now // WINDOW)
        try:
            pipe = self.client.pipeline(transaction=False)
            for scope in scopes:
                _, tokens_key, parallel_key = redis_keys(scope, window)
                pipe.zrem(parallel_key, token)
                if tokens > 0:
                    pipe.incrby(tokens_key, tokens)
                    pipe.expire(tokens_key, 2 * WINDOW)
            await asyncio.wait_for(pipe.execute(), REDIS_TIMEOUT)
        except Exception as exc:  # the parallel lease expires on its own; these tokens are not counted
            self.failed(exc)

    async def close(self) -> None:
        await self.client.aclose()


def redis_client(settings):
    """A ``redis.asyncio`` client from ``router_settings`` / REDIS_* (None when not configured).
    Short timeouts and no retries: a slow Redis must not hold requests up; the table takes over."""
    url = settings.redis_url.reveal() if settings.redis_url else None
    password = settings.redis_password.reveal() if settings.redis_password else None
    return connect_redis(url, settings.redis_host, settings.redis_port, password, REDIS_TIMEOUT)


def connect_redis(url: str | None, host: str | None, port: int, password: str | None, timeout: float):
    """A ``redis.asyncio`` client with ``timeout`` for connecting and for each call, and no
    retries (None when neither ``url`` nor ``host`` is given). It reconnects by itself."""
    if not url and not host:
        return None
    import redis.asyncio  # local: only gateways with Redis configured load the client
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    options = dict(socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))
    if url:
        return redis.asyncio.Redis.from_url(url, **options)
    return redis.asyncio.Redis(host=host, port=port, password=password, **options)
