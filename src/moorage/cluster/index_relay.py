"""A replica's one etcd watch, passed on to its workers.

Each etcd watcher has a price: the member sends every change to every watcher,
and a Python gRPC stream costs its reader more CPU than a msgpack frame on a
socketpair does. With a watch per process, a replica of N workers paid it N+1
times. Measured on small pushes (2 workers, the bench's workload, the old and
the new code taking turns, 8 rounds each): 4% less CPU per push (etcd 6% less,
the workers 5% less, the parent 6% more for its sending) and 4% more pushes a
second; with more workers, each one more watcher saved.

So only the replica's process watches (meta/index.py), and it sends each
batch its index applied, in order, over the control channel to every worker
that follows it. A worker's index applies the same batches, so
read-your-writes across workers stands on the same revisions as before.

Why a starting worker misses no change: it asks to follow (`FOLLOW`) and only
once the answer is back does it load its view from etcd. The parent puts it
on the list before answering, so every batch the parent applies from then on
is relayed to it; everything the parent had applied before, the load (read
afterwards, from the same member) already holds. Batches that arrive during
the load wait, and those the load already covered are skipped.

When the parent's watch falls behind compaction it reloads its view; that is
relayed too, and each worker reloads its own. The parent's watch going down
or up is relayed as the worker's watch health (its /health says so).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from moorage.backoff import Backoff
from moorage.meta.etcd import KV, EtcdUnavailable, Event
from moorage.meta.index import Index

log = logging.getLogger(__name__)

FOLLOW = "index-follow"       # a worker's call to its parent
BATCH = "index-batch"         # the parent's messages to a following worker
RELOAD = "index-reload"
HEALTH = "index-health"
RELAYED = frozenset({BATCH, RELOAD, HEALTH})

# Events per control frame, about: a transaction's batch is split so that no frame nears the
# channel's limit (cluster/channel.py); a single event is at most etcd's request size.
FRAME_BYTES = 1 << 20
_EVENT_OVERHEAD = 32
RELOAD_BACKOFF_MAX = 5.0


class WatchRelay:
    """The parent's end: an Index's relay (meta/index.py's Relay), sending to its following workers."""

    def __init__(self, send: Callable[[dict], None]):
        self._send = send

    def batch(self, revision: int, events: list[Event]) -> None:
        frame: list[tuple[bytes, bytes, int, int, bool]] = []
        size = 0
        for ev in events:
            kv = ev.kv
            frame.append((kv.key, kv.value, kv.mod_revision, kv.create_revision, ev.deleted))
            size += len(kv.key) + len(kv.value) + _EVENT_OVERHEAD
            if size >= FRAME_BYTES:
                self._send({"t": BATCH, "e": frame, "more": True})
                frame, size = [], 0
        self._send({"t": BATCH, "r": revision, "e": frame})

    def reloaded(self) -> None:
        self._send({"t": RELOAD})

    def health(self, healthy: bool) -> None:
        self._send({"t": HEALTH, "ok": healthy})


class Follower:
    """A worker's end: feeds its Index with what the parent relays."""

    def __init__(self, index: Index):
        self.index = index
        self._held: list[dict] | None = None    # relayed while the first load runs
        self._partial: list[Event] = []         # a batch's frames so far

    async def start(self, ask: Callable[[], Awaitable[Any]]) -> None:
        """Ask to follow (`ask` makes the FOLLOW call), then load; the channel must already be read."""
        self._held = []
        try:
            await ask()
            await self.index.load()
            self.index.watch_healthy = True
            while self._held:
                await self._handle(self._held.pop(0))
        finally:
            self._held = None

    async def handle(self, message: dict) -> None:
        """A relayed message, in the order the parent sent it (the channel's serve loop)."""
        if self._held is not None:
            self._held.append(message)
            return
        await self._handle(message)

    async def _handle(self, message: dict) -> None:
        kind = message["t"]
        if kind == BATCH:
            self._partial.extend(Event(deleted, KV(key, value, mod, create))
                                 for key, value, mod, create, deleted in message["e"])
            if message.get("more"):
                return
            events, self._partial = self._partial, []
            self.index.watch_healthy = True
            if not events:   # progress: everything up to the revision was delivered
                self.index.apply(message["r"], [])
                return
            applied = self.index.applied
            newer = [ev for ev in events if ev.kv.mod_revision > applied]
            if newer:
                self.index.apply(0, newer)
        elif kind == RELOAD:
            await self._reload()
        elif kind == HEALTH:
            self.index.watch_healthy = bool(message["ok"])

    async def _reload(self) -> None:
        # The channel's later messages wait meanwhile: none may be applied to the view being replaced.
        backoff = Backoff(0.1, RELOAD_BACKOFF_MAX)
        while True:
            try:
                await self.index.load()
                return
            except EtcdUnavailable as e:
                self.index.watch_healthy = False
                log.warning("index reload failed", extra={"error": str(e)})
            await backoff.sleep()
