"""Waits between retries: doubling up to a cap, each drawn at random from part of its range.

Every loop that retries something that failed (an etcd watch, a restart of etcd, a
webhook delivery, an S3 call) or polls for something that has not happened yet waits
by this one rule. The randomness spreads out the retries of processes that failed
together: the workers and replicas whose etcd came back at the same moment, the
clients of one S3 endpoint that said SlowDown. `least` is the share of each wait that
is always waited: 0 is "full jitter" (the wait is anywhere up to the current step), 1
is no randomness at all.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field


def delay(step: float, least: float = 0.5) -> float:
    """One wait of at most `step` and at least `least` of it."""
    return step * (least + (1 - least) * random.random())


def nth(attempt: int, first: float, cap: float, least: float = 0.5) -> float:
    """The wait before retry `attempt` (1 for the first) of a loop that counts its attempts."""
    return delay(min(cap, first * 2 ** min(max(attempt - 1, 0), 64)), least)


@dataclass
class Backoff:
    """The waits of one retry loop: `first`, doubling to `cap`; `reset()` once the thing works again."""

    first: float
    cap: float
    least: float = 0.5
    _step: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.first <= self.cap or not 0 <= self.least <= 1:
            raise ValueError(f"a backoff needs 0 < first <= cap and 0 <= least <= 1, not {self}")
        self._step = self.first

    def next(self) -> float:
        """The next wait; the one after it is twice as long, up to the cap."""
        step = self._step
        self._step = min(step * 2, self.cap)
        return delay(step, self.least)

    async def sleep(self) -> float:
        """Wait the next wait; returns how long it was (for the log line that says so)."""
        wait = self.next()
        await asyncio.sleep(wait)
        return wait

    def reset(self) -> None:
        self._step = self.first
