"""The replica's in-memory copy of the registry metadata, fed by an etcd watch.

Reads (manifest by tag, blob HEAD, tag lists) are served from here so the hot
path costs no consensus round trip per request. To stay read-your-writes
across replicas a reader calls `sync()`: it learns etcd's current revision
linearizably and waits until the watch has applied it. One such revision read
is shared by every request that arrived before it started, so a thousand
concurrent GETs cost one etcd round trip, not a thousand.

When this replica's etcd member is the only one (`solo`), every write goes
through this process and is applied here before it is acknowledged, so the
index is already current and `sync()` costs nothing. The cluster layer clears
`solo` before a second member is added and whenever it sees more than one.

A replica with worker processes (cluster/workers.py) has several writers
behind one member, so no process may trust `solo` for itself. Each process
publishes the revision of every write etcd acknowledged to it (`Peers`); while
the member is alone, `sync()` waits until the watch has applied the newest of
them, with no etcd round trip: a client's next request comes after the
acknowledgement, so it is covered. When the member is not alone, the shared
revision read, as across replicas.

When etcd cannot be reached (no quorum), `sync()` gives up after a short
deadline and readers serve what this replica knows: pulls keep working.

Only the replica's process watches; its `relay` passes every batch it applies
on to the workers, whose indexes apply the same batches (cluster/index_relay.py
says why and how).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from moorage.backoff import Backoff
from moorage.meta import keys
from moorage.meta.etcd import EtcdClient, EtcdCompacted, EtcdUnavailable, Event
from moorage.meta.records import BlobRecord, ManifestRecord, Referrer, decoder

log = logging.getLogger(__name__)

_blob = decoder(BlobRecord)
_manifest = decoder(ManifestRecord)
_referrer = decoder(Referrer)

SYNC_TIMEOUT = 1.0
# After a failed sync, readers serve the local view at once for this long
# instead of each waiting out SYNC_TIMEOUT against an etcd that is down.
SYNC_BACKOFF = 2.0


@dataclass(slots=True)
class Repo:
    blobs: set[str] = field(default_factory=set)
    manifests: dict[str, ManifestRecord] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    referrers: dict[str, dict[str, Referrer]] = field(default_factory=dict)
    _sorted_tags: list[str] | None = None
    # Counts every change applied, so that what is derived from the repository
    # (the console's summaries) is recomputed only when it changed.
    version: int = 0

    def empty(self) -> bool:
        return not (self.blobs or self.manifests or self.tags or self.referrers)

    def sorted_tags(self) -> list[str]:
        if self._sorted_tags is None:
            self._sorted_tags = sorted(self.tags)
        return self._sorted_tags


class Peers(Protocol):
    """The other processes writing through this replica's etcd member (cluster/shared.py)."""

    def solo(self) -> bool:
        """Whether the member is the cluster's only one (the replica's process polls it)."""

    def set_solo(self, value: bool) -> None: ...

    def leave_solo(self, hold_seconds: float) -> None: ...

    def newest_write(self) -> int:
        """The newest revision etcd acknowledged to any of the replica's processes."""


class Relay(Protocol):
    """Where the replica's process passes on what its watch brings (cluster/index_relay.py)."""

    def batch(self, revision: int, events: list[Event]) -> None:
        """A batch just applied, as `Index.apply` took it."""

    def reloaded(self) -> None:
        """The view was loaded again from etcd (the watch fell behind compaction)."""

    def health(self, healthy: bool) -> None:
        """The watch went down, or came back."""


class Index:
    def __init__(self, client: EtcdClient, peers: Peers | None = None):
        self._client = client
        self.peers = peers
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, BlobRecord] = {}
        self.applied = 0
        self._sorted_repos: list[str] | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._next: asyncio.Future | None = None
        self._fetching = False
        self.last_sync_ok = time.monotonic()
        self._sync_failed_at = -SYNC_BACKOFF
        self.watch_healthy = False
        self.relay: Relay | None = None
        self._solo = False
        self._not_solo_until = 0.0
        self.solo_epoch = 0
        self._subscribers: list[tuple[bytes, Callable[[Event], None]]] = []
        self._resets: list[Callable[[], None]] = []

    def subscribe(self, prefix: bytes, callback: Callable[[Event], None],
                  reset: Callable[[], None] | None = None) -> None:
        """Call `callback` for every change under `prefix` (keys the index itself ignores),
        in revision order, including those already present when the index loads.

        A (re)load feeds only the keys that exist: `reset` is called just before, so
        a subscriber can forget keys deleted while the watch was behind compaction.
        """
        self._subscribers.append((prefix, callback))
        if reset is not None:
            self._resets.append(reset)

    @property
    def solo(self) -> bool:
        return self._solo

    @solo.setter
    def solo(self, value: bool) -> None:
        if self.peers is not None:  # not ours alone to trust: the sync reads the peers' writes
            self.peers.set_solo(value)
            return
        if value and time.monotonic() < self._not_solo_until:
            return
        # A new epoch each time solo begins: what was cached in an earlier solo
        # period may have been changed by another member in between.
        if value and not self._solo:
            self.solo_epoch += 1
        self._solo = value

    def leave_solo(self, hold_seconds: float = 30.0) -> None:
        """Stop trusting solo now and for a while: a member is about to be added,
        and a membership poll that began before the addition must not turn
        solo back on."""
        self._not_solo_until = time.monotonic() + hold_seconds
        self._solo = False
        if self.peers is not None:
            self.peers.leave_solo(hold_seconds)

    # -- life -------------------------------------------------------------

    async def start(self) -> None:
        """Load, then watch in a task of its own (a replica runs `watch` among its tasks instead)."""
        await self.load()
        self._task = asyncio.create_task(self.watch(), name="index-watch")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    async def load(self) -> None:
        """Read everything under /moorage/ at one revision: the view, and each subscriber's keys."""
        revision, kvs = await self._client.range_prefix(keys.ROOT)
        self.repos, self.blobs, self._sorted_repos = {}, {}, None
        for reset in self._resets:  # in the same step as the load below: no one sees an empty view
            reset()
        for kv in kvs:
            self._apply_one(Event(False, kv))
        self._advance(revision)
        log.debug("index loaded", extra={"revision": revision, "keys": len(kvs)})
        if self.relay is not None:
            self.relay.reloaded()

    async def watch(self) -> None:
        """Apply every change from the loaded revision on, forever; reload after a compaction."""
        backoff = Backoff(0.1, 5.0)
        while True:
            try:
                async for revision, events in self._client.watch_prefix(keys.ROOT, self.applied + 1):
                    self._healthy(True)
                    backoff.reset()
                    self.apply(revision, events)
            except asyncio.CancelledError:
                raise
            except EtcdCompacted as e:
                log.warning("index watch fell behind compaction, reloading", extra={"error": str(e)})
                await self._reload_quietly()
            except Exception as e:  # watch streams die with their connection
                self._healthy(False)
                log.warning("index watch interrupted", extra={"error": str(e)})
            self._healthy(False)
            await backoff.sleep()

    async def _reload_quietly(self) -> None:
        try:
            await self.load()
        except EtcdUnavailable as e:
            log.warning("index reload failed", extra={"error": str(e)})

    def _healthy(self, healthy: bool) -> None:
        if healthy != self.watch_healthy:
            self.watch_healthy = healthy
            if self.relay is not None:
                self.relay.health(healthy)

    # -- applying changes ------------------------------------------------

    def apply(self, revision: int, events: list[Event]) -> None:
        """One batch of the watch: its events, in order; with none, a progress note that every
        change up to `revision` was delivered (0: the watch is only in place). With events, the
        view is current to the last event's revision only: `revision` is etcd's when it sent
        the batch, and changes up to it may still be on their way."""
        if events:
            for ev in events:
                self._apply_one(ev)
            self._advance(events[-1].kv.mod_revision)
        else:
            self._advance(revision)
        if self.relay is not None and (revision or events):
            self.relay.batch(revision, events)

    def _advance(self, revision: int) -> None:
        if revision > self.applied:
            self.applied = revision
            self._changed.set()
            self._changed = asyncio.Event()

    def _repo(self, name: str) -> Repo:
        repo = self.repos.get(name)
        if repo is None:
            repo = self.repos[name] = Repo()
            self._sorted_repos = None
        return repo

    def _apply_one(self, ev: Event) -> None:
        key = ev.kv.key
        if key.startswith(keys.BLOB):
            digest = key[len(keys.BLOB):].decode()
            if ev.deleted:
                self.blobs.pop(digest, None)
            else:
                self.blobs[digest] = _blob.decode(ev.kv.value)
            return
        if not key.startswith(keys.REPO):
            for prefix, callback in self._subscribers:
                if key.startswith(prefix):
                    try:
                        callback(ev)
                    except Exception:  # a subscriber's bug must not stop the index
                        log.exception("index subscriber failed", extra={"key": key[:200]})
            return
        rk = keys.parse_repo_key(key)
        if rk is None:
            return
        if ev.deleted and rk.repo not in self.repos:
            return
        repo = self._repo(rk.repo)
        repo.version += 1
        if rk.kind == "blob":
            if ev.deleted:
                repo.blobs.discard(rk.name)
            else:
                repo.blobs.add(rk.name)
        elif rk.kind == "manifest":
            if ev.deleted:
                repo.manifests.pop(rk.name, None)
            else:
                repo.manifests[rk.name] = _manifest.decode(ev.kv.value)
        elif rk.kind == "tag":
            repo._sorted_tags = None
            if ev.deleted:
                repo.tags.pop(rk.name, None)
            else:
                repo.tags[rk.name] = ev.kv.value.decode()
        elif rk.kind == "referrer":
            if ev.deleted:
                refs = repo.referrers.get(rk.subject)
                if refs is not None:
                    refs.pop(rk.name, None)
                    if not refs:
                        del repo.referrers[rk.subject]
            else:
                repo.referrers.setdefault(rk.subject, {})[rk.name] = _referrer.decode(ev.kv.value)
        if repo.empty():
            del self.repos[rk.repo]
            self._sorted_repos = None

    # -- consistency -----------------------------------------------------

    async def wait_applied(self, revision: int, timeout: float = 5.0) -> bool:
        """Wait until the watch has applied `revision`; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.applied < revision:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                return False
        return True

    async def sync(self) -> bool:
        """Make this replica's view at least as new as etcd's when we were called.

        Returns False (and lets the caller serve what it knows) when etcd does
        not answer within SYNC_TIMEOUT.
        """
        if self.solo:
            return True
        if time.monotonic() - self._sync_failed_at < SYNC_BACKOFF:
            return False
        if self.peers is not None and self.peers.solo():
            newest = self.peers.newest_write()
            if newest <= self.applied:
                return True
            if await self.wait_applied(newest, SYNC_TIMEOUT):
                self.last_sync_ok = time.monotonic()
                return True
            self._sync_failed_at = time.monotonic()
            return False
        fut = self._next
        if fut is None:
            fut = self._next = asyncio.get_running_loop().create_future()
            if not self._fetching:
                asyncio.create_task(self._fetch_rounds())
        return await asyncio.shield(fut)

    async def _fetch_rounds(self) -> None:
        # Requests that arrive while a revision read is in flight wait for the
        # next one: a read that began before them might predate a write they
        # have already seen acknowledged.
        self._fetching = True
        try:
            while self._next is not None:
                fut, self._next = self._next, None
                ok = False
                try:
                    revision = await asyncio.wait_for(self._client.revision(), SYNC_TIMEOUT)
                    ok = await self.wait_applied(revision, SYNC_TIMEOUT)
                except (EtcdUnavailable, asyncio.TimeoutError):
                    ok = False
                if ok:
                    self.last_sync_ok = time.monotonic()
                else:
                    self._sync_failed_at = time.monotonic()
                    log.debug("index sync failed; serving local view",
                              extra={"applied": self.applied})
                fut.set_result(ok)
        finally:
            self._fetching = False

    # -- queries ---------------------------------------------------------

    def sorted_repos(self) -> list[str]:
        if self._sorted_repos is None:
            self._sorted_repos = sorted(self.repos)
        return self._sorted_repos
