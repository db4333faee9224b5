"""Deployment selection: pure, no I/O. ``order`` tiers first (lowest wins), then LiteLLM's
``simple-shuffle``: a random pick weighted by ``weight`` (or ``rpm``/``tpm`` when those are
the only hints), the rest of the tier after it as the retry order."""

from __future__ import annotations

import random
from typing import Sequence

from .providers.base import Deployment


class Router:
    def __init__(self, rng: random.Random | None = None):
        self._rng = rng or random.Random()

    def plan(self, deployments: Sequence[Deployment]) -> list[Deployment]:
        """All deployments of a group in the order to try them."""
        if len(deployments) == 1:
            return list(deployments)
        tiers: dict[int, list[Deployment]] = {}
        for d in deployments:
            tiers.setdefault(d.order if d.order is not None else 1 << 30, []).append(d)
        out: list[Deployment] = []
        for order in sorted(tiers):
            out += self.shuffle(tiers[order])
        return out

    def shuffle(self, tier: list[Deployment]) -> list[Deployment]:
        """Weighted random order without replacement."""
        pool, out = list(tier), []
        while pool:
            weights = [weight(d) for d in pool]
            pick = self._rng.choices(range(len(pool)), weights=weights)[0] if sum(weights) > 0 else 0
            out.append(pool.pop(pick))
        return out


def weight(d: Deployment) -> float:
    if d.weight != 1.0:
        return max(d.weight, 0.0)
    return float(d.rpm or d.tpm or 1.0)
