"""What the router learns from traffic, per deployment id: requests in flight, recent
latencies, requests and tokens this minute, failures this minute, cooldowns.

``LocalCounters`` keeps them in this worker's memory, as LiteLLM does without Redis. The
router reads them synchronously on every pick; a shared backend (Redis) would implement the
same methods over a local mirror it refreshes in the background, so a pick never waits on the
network. Nothing here decides anything: ``router.py`` does.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable, Iterable

LATENCY_SAMPLES = 10  # recent latencies kept per deployment (LiteLLM keeps the last 10 too)


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
