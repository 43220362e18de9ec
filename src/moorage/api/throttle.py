"""Slowing down repeated failed logins, per client address and user name.

After `FREE_FAILURES` failures within `WINDOW_SECONDS`, the pair is refused
(429) for a while that doubles with every further failure, up to
`MAX_BLOCK_SECONDS`; a success clears it. While refused, a login is not even
checked: guessing costs the guesser time, and costs us no argon2 work.

Kept in memory, per replica and bounded (a replica with worker processes
keeps it in its own process, which the workers ask: `RemoteThrottle`): an attacker spreading guesses over
replicas gets a few more tries, never an unbounded number, and a flood of
distinct names cannot grow the table past `MAX_ENTRIES`.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

FREE_FAILURES = 5
WINDOW_SECONDS = 300.0
FIRST_BLOCK_SECONDS = 1.0
MAX_BLOCK_SECONDS = 300.0
MAX_ENTRIES = 10_000


@dataclass(slots=True)
class _Record:
    failures: int
    last_failure: float
    blocked_until: float


class LoginThrottle:
    def __init__(self, clock: Callable[[], float] = time.monotonic, max_entries: int = MAX_ENTRIES):
        self.clock = clock
        self.max_entries = max_entries
        self._records: OrderedDict[tuple[str, str], _Record] = OrderedDict()

    def retry_after(self, address: str, user: str) -> int:
        """Whole seconds until this pair may try again; 0 when it may now."""
        record = self._records.get((address, user))
        if record is None:
            return 0
        left = record.blocked_until - self.clock()
        return math.ceil(left) if left > 0 else 0

    def failed(self, address: str, user: str) -> None:
        now = self.clock()
        key = (address, user)
        record = self._records.get(key)
        if record is None or now - record.last_failure > WINDOW_SECONDS:
            record = _Record(0, now, 0.0)
        record.failures += 1
        record.last_failure = now
        beyond = record.failures - FREE_FAILURES
        if beyond >= 0:
            record.blocked_until = now + min(MAX_BLOCK_SECONDS, FIRST_BLOCK_SECONDS * 2 ** min(beyond, 20))
        self._records[key] = record
        self._records.move_to_end(key)
        while len(self._records) > self.max_entries:
            self._records.popitem(last=False)

    def succeeded(self, address: str, user: str) -> None:
        if self._records:
            self._records.pop((address, user), None)

    # The same, as the login path awaits it (a worker's RemoteThrottle asks its replica's process).
    async def check(self, address: str, user: str) -> int:
        return self.retry_after(address, user)

    async def record(self, address: str, user: str, ok: bool) -> None:
        (self.succeeded if ok else self.failed)(address, user)


class RemoteThrottle:
    """A worker's view of its replica's one LoginThrottle: each check and outcome is a call to the
    replica's process (~0.1 ms, beside a login's ~50 ms of password hashing), so the slowdown is
    per replica, whichever worker each attempt reaches."""

    def __init__(self, call: Callable[..., Awaitable[Any]]):
        self.call = call

    async def check(self, address: str, user: str) -> int:
        return int(await self.call("throttle.check", address, user) or 0)

    async def record(self, address: str, user: str, ok: bool) -> None:
        await self.call("throttle.record", address, user, ok)
