"""Ending the gateway's background tasks (watchers, timers, writers)."""

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
