"""What the router learns from traffic, per deployment id: requests in flight, recent
latencies, requests and tokens this minute, failures this minute, cooldowns.

``LocalCounters`` keeps them in this worker's memory, as LiteLLM does without Redis.
``SharedCounters`` (Redis configured) has the same synchronous methods over the same memory,
which is then a mirror: usage, failures and cooldowns are applied to it at once and sent to
Redis in the background, and a background refresh copies what every worker of every instance
counted back into it. The router reads them on every pick and never waits on the network.
In-flight counts and latencies stay per worker. Nothing here decides anything: ``router.py``
does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .ratelimit import REDIS_RETRY, REDIS_TIMEOUT

log = logging.getLogger(__name__)

LATENCY_SAMPLES = 10  # recent latencies kept per deployment (LiteLLM keeps the last 10 too)
REFRESH_INTERVAL = 0.5  # seconds between two round trips to Redis (writes sent, mirror refreshed)
KEY_PREFIX = "tornado_proxy:router"
MINUTE_TTL = 120  # seconds a minute's counters outlive their minute in Redis
SYNC_TIMEOUT = 2 * REDIS_TIMEOUT  # seconds for one round trip (connect and pipeline)


class LocalCounters:
    def __init__(self, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self.clock = clock  # cooldowns and latencies
        self.wall = wall    # minute buckets, aligned on the wall clock as rpm/tpm limits are
        self._in_flight: dict[str, int] = {}
        self._latency: dict[str, deque] = {}
        self._minute = -1
        self._requests: dict[str, int] = {}   # this minute
        self._tokens: dict[str, int] = {}     # this minute
        self._failures: dict[str, int] = {}   # this minute
        self._cooldown_until: dict[str, float] = {}

    # --- in flight -------------------------------------------------------------------------
    def started(self, deployment_id: str) -> None:
        self._in_flight[deployment_id] = self._in_flight.get(deployment_id, 0) + 1

    def ended(self, deployment_id: str) -> None:
        self._in_flight[deployment_id] = max(self._in_flight.get(deployment_id, 1) - 1, 0)

    def in_flight(self, deployment_id: str) -> int:
        return self._in_flight.get(deployment_id, 0)

    # --- latency ---------------------------------------------------------------------------
    def add_latency(self, deployment_id: str, seconds: float) -> None:
        samples = self._latency.get(deployment_id)
        if samples is None:
            samples = self._latency[deployment_id] = deque(maxlen=LATENCY_SAMPLES)
        samples.append(seconds)

    def latency(self, deployment_id: str) -> float | None:
        """Mean of the recent latencies; None before the first one."""
        samples = self._latency.get(deployment_id)
        return sum(samples) / len(samples) if samples else None

    # --- this minute's usage and failures --------------------------------------------------
    def _roll(self) -> None:
        minute = int(self.wall() // 60)
        if minute != self._minute:
            self._minute = minute
            self._requests.clear()
            self._tokens.clear()
            self._failures.clear()

    def add_request(self, deployment_id: str) -> None:
        self._roll()
        self._requests[deployment_id] = self._requests.get(deployment_id, 0) + 1

    def add_tokens(self, deployment_id: str, tokens: int) -> None:
        self._roll()
        self._tokens[deployment_id] = self._tokens.get(deployment_id, 0) + tokens

    def usage(self, deployment_id: str) -> tuple[int, int]:
        """(requests, tokens) this minute."""
        self._roll()
        return self._requests.get(deployment_id, 0), self._tokens.get(deployment_id, 0)

    def seconds_to_next_minute(self) -> float:
        return 60.0 - self.wall() % 60

    def add_failure(self, deployment_id: str) -> int:
        """Count a failure; returns the failures this minute, this one included."""
        self._roll()
        count = self._failures[deployment_id] = self._failures.get(deployment_id, 0) + 1
        return count

    def failures(self, deployment_id: str) -> int:
        """Failures this minute (since its last cooldown)."""
        self._roll()
        return self._failures.get(deployment_id, 0)

    # --- cooldowns -------------------------------------------------------------------------
    def cool_down(self, deployment_id: str, seconds: float) -> None:
        self._cooldown_until[deployment_id] = self.clock() + seconds
        self._failures.pop(deployment_id, None)  # a fresh count once it is back

    def cooling(self, deployment_ids: Iterable[str]) -> dict[str, float]:
        """The ids among ``deployment_ids`` cooling down now -> seconds left."""
        if not self._cooldown_until:
            return {}
        now = self.clock()
        out = {}
        for d in deployment_ids:
            until = self._cooldown_until.get(d)
            if until is not None:
                if until > now:
                    out[d] = until - now
                else:
                    del self._cooldown_until[d]
        return out


# --- shared through Redis ---------------------------------------------------------------------

def usage_key(deployment_id: str, minute: int, kind: str) -> str:
    """``kind``: requests, tokens or failures, of one deployment in one minute (``wall // 60``)."""
    return f"{KEY_PREFIX}:{deployment_id}:{minute}:{kind}"


def cooldown_key(deployment_id: str) -> str:
    return f"{KEY_PREFIX}:{deployment_id}:cooldown"


@dataclass
class Pending:
    """What this worker counted since its last round trip to Redis, for one minute."""

    minute: int
    requests: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    resets: set[str] = field(default_factory=set)     # failure counts a cooldown restarted
    cooldowns: set[str] = field(default_factory=set)  # ids cooled down here

    def merge_older(self, older: "Pending") -> None:
        """Put back the writes of a round trip that failed (``older``), before this one's."""
        if older.minute == self.minute:
            for mine, theirs in ((self.requests, older.requests), (self.tokens, older.tokens)):
                for d, n in theirs.items():
                    mine[d] = mine.get(d, 0) + n
            for d, n in older.failures.items():
                if d not in self.resets:  # a newer cooldown restarted the count
                    self.failures[d] = self.failures.get(d, 0) + n
            self.resets |= older.resets
        self.cooldowns |= older.cooldowns


@dataclass(frozen=True)
class Sync:
    """One round trip: this worker's writes, then the reads that refresh the mirror."""

    pending: Pending
    ids: tuple[str, ...]           # the deployments mirrored
    commands: tuple[tuple, ...]    # Redis commands, writes first
    reads: int                     # index of the first read (an MGET when ids, then one PTTL per id)


class SharedCounters(LocalCounters):
    """``LocalCounters`` whose usage (requests and tokens this minute), failures this minute and
    cooldowns are shared by every worker of every instance on one Redis.

    Writes change the mirror at once and wait in ``Pending``; every ``interval`` (at once after
    a cooldown) one pipeline sends them (INCRBY + EXPIRE on per-minute keys, SET PX for a
    cooldown) and reads back every mirrored deployment's counts (MGET) and cooldown (PTTL).
    A Redis that fails or does not answer within ``SYNC_TIMEOUT`` leaves the mirror as it is
    (this worker's own counts keep going on top of the last shared ones), logs once, and is
    tried again after a backoff up to ``REDIS_RETRY`` seconds; the unsent writes go with the
    first round trip that succeeds. No request ever waits for Redis."""

    def __init__(self, client, deployment_ids: Callable[[], Iterable[str]] = tuple,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 interval: float = REFRESH_INTERVAL):
        super().__init__(clock, wall)
        self.client = client
        self.deployment_ids = deployment_ids  # the registry's, read at each round trip
        self.interval = interval
        self._pending = Pending(self._minute)
        self._roll()
        self._seen: set[str] = set()  # ids written here (a wildcard's may not be in the registry)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.down = False  # the last round trip failed: routing on this worker's own counts

    # --- writes: the mirror at once, Redis at the next round trip --------------------------
    def _roll(self) -> None:
        minute = int(self.wall() // 60)
        if minute != self._minute:
            super()._roll()
            # a finished minute's unsent counts route nothing any more; cooldowns still do
            self._pending = Pending(minute, cooldowns=self._pending.cooldowns)

    def add_request(self, deployment_id: str) -> None:
        super().add_request(deployment_id)
        requests = self._pending.requests
        requests[deployment_id] = requests.get(deployment_id, 0) + 1
        self._seen.add(deployment_id)

    def add_tokens(self, deployment_id: str, tokens: int) -> None:
        super().add_tokens(deployment_id, tokens)
        if tokens:
            pending = self._pending.tokens
            pending[deployment_id] = pending.get(deployment_id, 0) + tokens
        self._seen.add(deployment_id)

    def add_failure(self, deployment_id: str) -> int:
        count = super().add_failure(deployment_id)
        failures = self._pending.failures
        failures[deployment_id] = failures.get(deployment_id, 0) + 1
        self._seen.add(deployment_id)
        return count

    def cool_down(self, deployment_id: str, seconds: float) -> None:
        super().cool_down(deployment_id, seconds)
        self._roll()
        self._pending.failures.pop(deployment_id, None)
        self._pending.resets.add(deployment_id)
        self._pending.cooldowns.add(deployment_id)
        self._seen.add(deployment_id)
        self._wake.set()  # other instances should stop sending it traffic now, not at the next tick

    # --- one round trip, as data (pure) ----------------------------------------------------
    def begin_sync(self) -> Sync:
        """Take the pending writes and list the commands of the next round trip."""
        self._roll()
        pending, self._pending = self._pending, Pending(self._minute)
        minute, now = pending.minute, self.clock()
        commands: list[tuple] = [("DEL", usage_key(d, minute, "failures")) for d in sorted(pending.resets)]
        for kind, counts in (("requests", pending.requests), ("tokens", pending.tokens),
                             ("failures", pending.failures)):
            for d, n in counts.items():
                key = usage_key(d, minute, kind)
                commands += [("INCRBY", key, n), ("EXPIRE", key, MINUTE_TTL)]
        for d in sorted(pending.cooldowns):
            left = self._cooldown_until.get(d, now) - now
            if left > 0:
                commands.append(("SET", cooldown_key(d), "1", "PX", max(int(left * 1000), 1)))
        ids = tuple(sorted(set(self.deployment_ids()) | self._seen))
        reads = len(commands)
        if ids:
            commands.append(("MGET", *[usage_key(d, minute, kind) for kind in ("requests", "tokens", "failures")
                                        for d in ids]))
            commands += [("PTTL", cooldown_key(d)) for d in ids]
        return Sync(pending, ids, tuple(commands), reads)

    def end_sync(self, sync: Sync, replies: list) -> None:
        """Refresh the mirror from the replies: the shared counts plus what this worker counted
        since the round trip began; a cooldown set anywhere, for the time it has left."""
        if not sync.ids:
            return
        self._roll()
        ids, n = sync.ids, len(sync.ids)
        values = replies[sync.reads]
        if self._minute == sync.pending.minute:
            pending = self._pending
            for i, (mirror, since) in enumerate(((self._requests, pending.requests), (self._tokens, pending.tokens),
                                                 (self._failures, pending.failures))):
                for j, d in enumerate(ids):
                    shared = 0 if mirror is self._failures and d in pending.resets else int(values[i * n + j] or 0)
                    total = shared + since.get(d, 0)
                    if total:
                        mirror[d] = total
                    else:
                        mirror.pop(d, None)
        now = self.clock()
        for d, ttl in zip(ids, replies[sync.reads + 1:]):
            if ttl is not None and int(ttl) > 0:
                until = now + int(ttl) / 1000
                if until > self._cooldown_until.get(d, 0.0):
                    self._cooldown_until[d] = until

    def failed_sync(self, sync: Sync) -> None:
        """Redis did not take the writes: they go with the next round trip."""
        self._roll()
        self._pending.merge_older(sync.pending)

    # --- the background round trips --------------------------------------------------------
    async def sync_once(self) -> bool:
        """One round trip; False (and the mirror left as it is) when Redis failed."""
        sync = self.begin_sync()
        try:
            pipe = self.client.pipeline(transaction=False)
            for command in sync.commands:
                pipe.execute_command(*command)
            replies = await asyncio.wait_for(pipe.execute(), SYNC_TIMEOUT)
        except Exception as exc:  # refused, reset, timeout, auth, ...: route on this worker's counts
            self.failed_sync(sync)
            self.report_down(exc)
            return False
        self.end_sync(sync, replies)
        if self.down:
            self.down = False
            log.info("Redis answers again: cooldowns and usage are shared across instances")
        return True

    def report_down(self, exc: BaseException) -> None:
        if not self.down:
            self.down = True
            log.warning("Redis unavailable for router state (%s); each worker routes on its own cooldowns "
                        "and usage until it answers again", type(exc).__name__)

    async def run(self) -> None:
        """Round trips every ``interval`` (sooner after a cooldown); after a failure, with a
        backoff doubling up to ``REDIS_RETRY`` seconds."""
        delay = self.interval
        while True:
            self._wake.clear()
            if await self.sync_once():
                delay = self.interval
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                except asyncio.TimeoutError:
                    pass
            else:
                delay = min(delay * 2, REDIS_RETRY)
                await asyncio.sleep(delay)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self.run())

    async def stop(self) -> None:
        """Stop the round trips, sending what is still pending (once, best effort)."""
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None
        if not self.down:
            await self.sync_once()
