"""Spend: the cost of a call, the ``SpendEvent`` every LLM call leaves, and the per-worker
writer that carries them to PostgreSQL off the request path.

``submit`` never blocks and never fails a response: events wait in a bounded in-memory queue;
a writer task inserts them in batches (every ``SPEND_FLUSH_INTERVAL`` seconds or
``SPEND_BATCH_SIZE`` events), adding each inserted row's spend to its key, team and user in
the same transaction. While PostgreSQL is away the queue fills up to ``spend_queue_size``;
past that, events are appended to a JSON-lines file in ``spend_spill_dir`` and written (by
whichever worker gets there first) once the database is back. The spend log's primary key is
the call id and increments follow only the rows actually inserted, so a replayed batch never
counts twice. Only when even the spill file cannot be written is an event dropped (and
counted)."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import orjson

from .errors import DatabaseUnavailable
from .providers.base import Deployment
from .router import configured_price, table_price
from .tasks import end_task

if TYPE_CHECKING:
    from .spendstore import SpendStore
    from .tenants import Tenants

log = logging.getLogger(__name__)

SPEND_BATCH_SIZE = 500       # events per INSERT at most
SPEND_FLUSH_INTERVAL = 1.0   # seconds an event waits in the queue at most (the database being up)
RETRY_MAX = 5.0              # seconds between attempts while the database is away, at most
SPILL_PREFIX, REPLAY_PREFIX = "spend-", "replay-"


def cost_of(d: Deployment, usage: Mapping[str, Any] | None, table: Mapping[str, Any]) -> float:
    """USD for one call: prompt and completion tokens times the deployment's per-token prices
    (its ``model_info`` / ``litellm_params`` ``input_cost_per_token`` / ``output_cost_per_token``,
    else the shipped price table ``table``, as the router's cost-based routing reads them).
    No usage or no known price: 0."""
    if not usage:
        return 0.0
    price = configured_price(d) or table_price(table, d)
    if price is None:
        return 0.0
    prompt, completion = tokens(usage, "prompt_tokens"), tokens(usage, "completion_tokens")
    return prompt * price[0] + completion * price[1]


# What an images / audio call is priced by besides tokens: model_info (or litellm_params) keys,
# LiteLLM's names, multiplied by the images returned, the characters read, the seconds heard
MEDIA_PRICES = {"image_generation": "output_cost_per_image", "audio_speech": "input_cost_per_character",
                "audio_transcription": "input_cost_per_second", "audio_translation": "input_cost_per_second"}


def media_cost(d: Deployment, endpoint: str, units: float) -> float:
    """USD for ``units`` of an images / audio call at the deployment's configured per-unit
    price; 0 when it has none (or the endpoint is not priced that way)."""
    name = MEDIA_PRICES.get(endpoint)
    if name is None or units <= 0:
        return 0.0
    for source in (d.model_info, d.public_params):
        price = source.get(name)
        if isinstance(price, (int, float)) and not isinstance(price, bool):
            return float(price) * units
    return 0.0


def tokens(usage: Mapping[str, Any], name: str) -> int:
    value = usage.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


@dataclass
class SpendEvent:
    """One row of the spend log (LiteLLM's ``LiteLLM_SpendLogs`` fields)."""

    request_id: str
    call_type: str
    api_key: str                 # the key's SHA-256 hex (the master key's, for the master key)
    spend: float
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    start_time: float            # epoch seconds
    end_time: float
    model: str                   # the provider's model id
    model_id: str | None
    model_group: str | None      # what the client asked for
    custom_llm_provider: str | None
    api_base: str | None         # without credentials
    user: str | None             # the key's user_id
    end_user: str | None         # the request body's ``user``
    team_id: str | None
    status: str                  # "success" | "failure"
    metadata: dict = field(default_factory=dict)
    cache_hit: bool = False
    origin: str = ""             # the worker that counted it in its memory (see Tenants.add_spend)

    def to_line(self) -> bytes:
        return orjson.dumps(asdict(self)) + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> SpendEvent:
        return cls(**orjson.loads(line))


class SpillFile:
    """The JSON-lines files events wait in while PostgreSQL is away. Each worker appends to its
    own file under an exclusive ``flock``; a replayer renames a file before reading it and
    takes the same lock, so no line is read half-written or appended after it was read."""

    def __init__(self, folder: Path, origin: str):
        self.folder = folder
        self.path = folder / f"{SPILL_PREFIX}{origin}.jsonl"
        self.origin = origin

    def append(self, events: Iterable[SpendEvent]) -> None:
        data = b"".join(e.to_line() for e in events)
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    continue  # a replayer took the file away meanwhile: append to a new one
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
                return
            finally:
                os.close(fd)

    def waiting(self) -> list[Path]:
        """Files with events to replay: every worker's spill files, and replays left unfinished."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir()
                      if p.suffix == ".jsonl" and p.name.startswith((SPILL_PREFIX, REPLAY_PREFIX)))

    def claim(self, path: Path) -> Path | None:
        """Rename a spill file for replay (appenders then start a new one); None: gone."""
        if not path.name.startswith(SPILL_PREFIX):
            return path
        claimed = path.with_name(f"{REPLAY_PREFIX}{self.origin}-{uuid.uuid4().hex[:8]}.jsonl")
        try:
            os.rename(path, claimed)
        except FileNotFoundError:
            return None
        return claimed


class SpendWriter:
    def __init__(self, store: SpendStore | None, tenants: Tenants, spill_dir: str | Path, queue_size: int,
                 dropped_metric=None):
        self.store = store
        self.tenants = tenants
        self.queue: deque[SpendEvent] = deque()
        self.queue_size = queue_size
        self.spill = SpillFile(Path(spill_dir), tenants.origin)
        self.dropped = 0
        self.spilled = 0
        self.written = 0
        self._dropped_metric = dropped_metric
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._task: asyncio.Task | None = None
        self._down_since: float | None = None

    # -- the request path ---------------------------------------------------------------------

    def submit(self, event: SpendEvent, urgent: bool = False) -> None:
        """Queue an event: O(1), never raises. A full queue (the database away) goes to the spill file.
        ``urgent`` (the event used a budget up): write the queue now, not at the next tick, so
        that the other workers and instances learn it within milliseconds."""
        if self.store is None:
            return
        self.queue.append(event)
        if len(self.queue) > self.queue_size:
            self.spill_queue()
        elif (urgent or len(self.queue) >= SPEND_BATCH_SIZE) and self._wake is not None:
            self._wake.set()

    def spill_queue(self) -> None:
        events = list(self.queue)
        self.queue.clear()
        self.tenants.flushed(events)  # off this worker's books: whoever replays them writes them
        for event in events:
            event.origin = ""
        try:
            self.spill.append(events)
            self.spilled += len(events)
        except OSError as exc:
            self.drop(len(events), f"spill file {self.spill.path}: {exc.strerror or type(exc).__name__}")

    def drop(self, n: int, why: str) -> None:
        self.dropped += n
        if self._dropped_metric is not None:
            self._dropped_metric.inc(n)
        log.error("spend log: %d event(s) lost (%s)", n, why)

    # -- the writer task ------------------------------------------------------------------------

    def start(self) -> None:
        if self.store is None:
            return
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self.run())

    async def run(self) -> None:
        delay = SPEND_FLUSH_INTERVAL
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            if self._stopping:
                return
            try:
                ok = await self.flush()
            except Exception:  # a bug must not end spend logging: log it, keep the events
                log.exception("spend log writer")
                ok = False
            delay = SPEND_FLUSH_INTERVAL if ok else min(delay * 2, RETRY_MAX)

    async def flush(self) -> bool:
        """Replay spill files, then write the queue. False: the database is away (events kept)."""
        try:
            await self.replay()
            while self.queue:
                batch = [self.queue.popleft() for _ in range(min(SPEND_BATCH_SIZE, len(self.queue)))]
                try:
                    await self.write(batch)
                except BaseException:
                    self.queue.extendleft(reversed(batch))
                    raise
        except DatabaseUnavailable as exc:
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("spend log: database unavailable (%s); %d event(s) wait in memory, then in %s",
                            exc, len(self.queue), self.spill.folder)
            return False
        if self._down_since is not None:
            log.info("spend log: database back; queued spend written")
            self._down_since = None
        return True

    async def write(self, batch: list[SpendEvent]) -> None:
        written = await self.store.write(batch, self.tenants.origin)
        self.written += len(written.inserted)
        self.tenants.flushed(batch)
        if written.at is not None:
            self.tenants.spend_written(written.at)

    async def replay(self) -> None:
        waiting = self.spill.waiting()
        if waiting:
            await self.store.db.ping()  # down: leave the files as they are (no renaming on every retry)
        for path in waiting:
            claimed = self.spill.claim(path)
            if claimed is None:
                continue
            try:
                fd = os.open(claimed, os.O_RDONLY)
            except FileNotFoundError:
                continue  # another worker finished it
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if claimed == path else 0))
                except BlockingIOError:
                    continue  # another worker is replaying it now
                with os.fdopen(os.dup(fd), "rb") as f:
                    lines = [line for line in f.read().splitlines() if line.strip()]
                events = []
                for line in lines:
                    try:
                        events.append(SpendEvent.from_line(line))
                    except (orjson.JSONDecodeError, TypeError):
                        self.drop(1, f"unreadable line in {claimed.name}")
                for i in range(0, len(events), SPEND_BATCH_SIZE):
                    await self.write(events[i:i + SPEND_BATCH_SIZE])
                claimed.unlink(missing_ok=True)
                log.info("spend log: replayed %d event(s) from %s", len(events), claimed.name)
            finally:
                os.close(fd)

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM: stop the writer, write what is queued (for up to ``timeout`` seconds), and
        put what could not be written into the spill file."""
        if self._task is not None:
            self._stopping = True  # a write under way finishes (no transaction is cut)
            self._wake.set()
            await end_task(self._task, grace=timeout)
            self._task = None
        if self.store is None or not self.queue:
            return
        try:
            await asyncio.wait_for(self.flush(), timeout)
        except (asyncio.TimeoutError, Exception) as exc:  # noqa: BLE001 - whatever it was, spill
            log.warning("spend log: final flush failed (%s)", type(exc).__name__)
        if self.queue:
            self.spill_queue()
