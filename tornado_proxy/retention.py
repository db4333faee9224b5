"""Spend log retention, as LiteLLM's ``general_settings.maximum_spend_logs_retention_period``
(how long a spend log row is kept: ``30d``, ``12h``, ...) and
``maximum_spend_logs_retention_interval`` (how often the clean-up runs, ``1d`` by default).

One worker per instance (worker 0) runs the timer, off the request path; at each round it
deletes the old rows in small batches (``SpendStore.prune``) under a PostgreSQL advisory lock
taken without waiting, so that of several instances only one works at a time and the others
skip the round. A database outage skips the round too, with a log line."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import ConfigError
from .errors import DatabaseUnavailable
from .keystore import parse_duration
from .tasks import Timer

if TYPE_CHECKING:
    from .config import Settings
    from .spendstore import Pruned, SpendStore

log = logging.getLogger(__name__)

FIRST_ROUND_MAX = 60.0  # seconds after start-up of the first round, at most (restarts must not starve it)
BATCH_SIZE = 1000       # rows per DELETE statement
PAUSE = 0.1             # seconds between two DELETE statements


def duration_seconds(text: str, key: str) -> float:
    try:
        return parse_duration(text).total_seconds()
    except ValueError as exc:
        raise ConfigError(f"general_settings.{key}: {exc}") from None


@dataclass(frozen=True)
class RetentionSettings:
    period: float | None  # seconds a spend log row is kept; None: for ever
    interval: float       # seconds between clean-ups

    @classmethod
    def parse(cls, settings: Settings) -> RetentionSettings:
        """ConfigError naming the key when a value is not a duration."""
        period = settings.maximum_spend_logs_retention_period
        interval = duration_seconds(settings.maximum_spend_logs_retention_interval,
                                    "maximum_spend_logs_retention_interval")
        return cls(duration_seconds(period, "maximum_spend_logs_retention_period") if period else None, interval)


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class SpendLogRetention(Timer):
    """The background clean-up of one instance (see the module doc)."""

    def __init__(self, store: SpendStore | None, settings: RetentionSettings, batch_size: int = BATCH_SIZE,
                 pause: float = PAUSE):
        self.store = store
        self.settings = settings
        self.batch_size = batch_size
        self.pause = pause

    def configure(self, settings: RetentionSettings) -> None:
        """A reload: the new period applies from the next round, the new interval after this wait."""
        self.settings = settings

    def start(self) -> None:
        if self.store is not None:
            self.start_rounds()

    def delay(self, first: bool) -> float:
        return min(self.settings.interval, FIRST_ROUND_MAX) if first else self.settings.interval

    async def round(self) -> None:
        await self.run_once()

    async def run_once(self, now: dt.datetime | None = None) -> Pruned | None:
        """One round: None when retention is off, another session was pruning, or the database
        was away (logged); else what was deleted."""
        if self.store is None or self.settings.period is None:
            return None
        cutoff = (now or utc_now()) - dt.timedelta(seconds=self.settings.period)
        try:
            result = await self.store.prune(cutoff, self.batch_size, self.pause, self._stopping)
        except DatabaseUnavailable as exc:
            log.warning("spend log retention: database unavailable (%s); this round is skipped", exc)
            return None
        except Exception:  # e.g. not migrated yet: try again next round
            log.exception("spend log retention")
            return None
        if result is None:
            log.info("spend log retention: another instance is deleting old rows now; this round is skipped")
        elif result.deleted:
            log.info("spend log retention: deleted %d spend log row(s) older than %s in %d statement(s)",
                     result.deleted, cutoff.isoformat(), result.statements)
        return result
