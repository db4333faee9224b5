"""The gateway's background tasks (watchers, timers, writers): ending them, and timers."""

from __future__ import annotations

import asyncio


async def end_task(task: asyncio.Task, grace: float = 0.0) -> None:
    """Wait up to ``grace`` seconds for ``task`` to end by itself (its owner has asked it to),
    then cancel it until it has ended. One cancel() can be lost: before Python 3.12,
    ``asyncio.wait_for`` (ours, and aiopg's) returns a result that is ready in the same loop
    turn instead of raising, and a watcher would then listen on for ever."""
    if grace > 0:
        await asyncio.wait({task}, timeout=grace)
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)


class Timer:
    """A round every ``delay(first)`` seconds, in a task of its own (off the request path),
    until ``stop``: a round under way finishes first (no transaction is cut)."""

    _task: asyncio.Task | None = None
    _stopping: asyncio.Event | None = None

    def delay(self, first: bool) -> float:
        raise NotImplementedError

    async def round(self) -> None:
        raise NotImplementedError

    def start_rounds(self) -> None:
        self._stopping = asyncio.Event()
        self._task = asyncio.create_task(self._rounds())

    async def _rounds(self) -> None:
        first = True
        while True:
            try:
                await asyncio.wait_for(self._stopping.wait(), self.delay(first))
                return
            except asyncio.TimeoutError:
                pass
            first = False
            await self.round()

    async def stop(self) -> None:
        if self._task is not None:
            self._stopping.set()
            await end_task(self._task, grace=5)
            self._task = None
