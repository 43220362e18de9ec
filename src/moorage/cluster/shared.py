"""The shared block of a replica's processes: what the parent and its workers must all see at once.

One memfd mapping made by the parent (`Shared`): the quorum probe's last
success, whether this replica's etcd member is alone, the revision of the
last write each process had acknowledged (read-your-writes across workers,
see meta/index.py), each worker's open-connection counters, each worker's
row of the per-client connection table, and each process's row of
upload-session changes (what keeps the session cache of registry/sessions.py
valid across workers). Every field has one writer, so no locks. It is its
own module because every layer that shares state across the processes reads
it (the index, the session cache, the connection caps, the hand-off), while
only the supervisor starts processes.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from dataclasses import dataclass

# Buckets of the per-client connection table: an address's count is its
# bucket summed over the workers' rows; two addresses in one bucket share a cap.
CLIENT_BUCKETS = 1 << 16
# Buckets of the session-change table: a change to one upload's session
# invalidates what every process cached of the uploads in its bucket.
SESSION_BUCKETS = 1 << 12

# Header: magic, quorum_ok_at (CLOCK_MONOTONIC seconds), solo (0/1), not_solo_until,
# solo_epoch (counts the times solo began).
_HEADER = struct.Struct("<Qdqdq")
_MAGIC = 0x6D6F6F7261676531  # "moorage1"
_SLOT = struct.Struct("<q")


@dataclass
class Layout:
    workers: int

    @property
    def revisions(self) -> int:   # one slot per worker, and the parent's at index `workers`
        return 64

    @property
    def counters(self) -> int:    # per worker: connections handed (parent writes), closed (worker writes)
        return self.revisions + 8 * (self.workers + 1)

    @property
    def clients(self) -> int:
        return self.counters + 16 * self.workers

    @property
    def sessions(self) -> int:    # per process (the workers, then the parent): changes per bucket
        return self.clients + 4 * CLIENT_BUCKETS * self.workers

    @property
    def size(self) -> int:
        raw = self.sessions + 8 * SESSION_BUCKETS * (self.workers + 1)
        return -(-raw // mmap.PAGESIZE) * mmap.PAGESIZE


class Shared:
    """The replica's shared state; `slot` is this process's index (the parent's is `workers`)."""

    def __init__(self, fd: int, workers: int, slot: int, create: bool = False):
        self.fd, self.workers, self.slot = fd, workers, slot
        self.layout = Layout(workers)
        if create:
            os.ftruncate(fd, self.layout.size)
        self.map = mmap.mmap(fd, self.layout.size)
        if create:
            _HEADER.pack_into(self.map, 0, _MAGIC, 0.0, 0, 0.0, 0)
        elif _HEADER.unpack_from(self.map, 0)[0] != _MAGIC:
            raise RuntimeError("shared state of another version")
        self._clients = memoryview(self.map)[self.layout.clients:self.layout.sessions].cast("i")
        self._sessions = memoryview(self.map)[self.layout.sessions:].cast("q")
        self._counters = memoryview(self.map)[self.layout.counters:self.layout.clients].cast("q")

    @classmethod
    def create(cls, workers: int) -> "Shared":
        return cls(os.memfd_create("moorage-shared", 0), workers, workers, create=True)

    # quorum: written by the parent's probe, read by every writer's `writable()`
    @property
    def quorum_ok_at(self) -> float:
        return struct.unpack_from("<d", self.map, 8)[0]

    @quorum_ok_at.setter
    def quorum_ok_at(self, value: float) -> None:
        struct.pack_into("<d", self.map, 8, value)

    # solo: the parent's membership poll sets it; any process clears it before adding a member
    def solo(self) -> bool:
        return struct.unpack_from("<q", self.map, 16)[0] == 1

    def set_solo(self, value: bool) -> None:
        if value and time.monotonic() < struct.unpack_from("<d", self.map, 24)[0]:
            return
        if value and not self.solo():
            # A new epoch each time solo begins: what a process cached in an earlier solo
            # period may have been changed by another member in between.
            struct.pack_into("<q", self.map, 32, struct.unpack_from("<q", self.map, 32)[0] + 1)
        struct.pack_into("<q", self.map, 16, 1 if value else 0)

    def leave_solo(self, hold_seconds: float = 30.0) -> None:
        struct.pack_into("<d", self.map, 24, time.monotonic() + hold_seconds)
        struct.pack_into("<q", self.map, 16, 0)

    # revisions: every process publishes the revision of each write etcd acknowledged to it
    def wrote(self, revision: int) -> None:
        off = self.layout.revisions + 8 * self.slot
        if revision > _SLOT.unpack_from(self.map, off)[0]:
            _SLOT.pack_into(self.map, off, revision)

    def newest_write(self) -> int:
        return max(_SLOT.unpack_from(self.map, self.layout.revisions + 8 * i)[0]
                   for i in range(self.workers + 1))

    # upload sessions: a process counts its own changes to each bucket, and a cached session
    # stays valid while the member is alone, in the same solo epoch, and its bucket's sum unchanged
    def session_stamp(self, upload_id: str) -> tuple[int, int] | None:
        """What a session cached now is valid under, or None when nothing may be cached."""
        if not self.solo():
            return None
        b = _session_bucket(upload_id)
        changes = sum(self._sessions[r * SESSION_BUCKETS + b] for r in range(self.workers + 1))
        return struct.unpack_from("<q", self.map, 32)[0], changes

    def session_changed(self, upload_id: str, before: tuple[int, int] | None) -> tuple[int, int] | None:
        """Count this process's change; the stamp of the new state: `before` plus this change."""
        self._sessions[self.slot * SESSION_BUCKETS + _session_bucket(upload_id)] += 1
        return None if before is None else (before[0], before[1] + 1)

    # connections handed to worker k (the parent counts) and closed by it (the worker counts)
    def handed(self, k: int) -> int:
        return self._counters[2 * k]

    def add_handed(self, k: int) -> None:
        self._counters[2 * k] += 1

    def closed(self, k: int) -> int:
        return self._counters[2 * k + 1]

    def add_closed(self) -> None:
        self._counters[2 * self.slot + 1] += 1

    def open_connections(self, k: int) -> int:
        return self.handed(k) - self.closed(k)

    # per-client connections: own row written, every row read
    def client_connections(self, address: str) -> int:
        b = _bucket(address)
        return sum(self._clients[w * CLIENT_BUCKETS + b] for w in range(self.workers))

    def client_opened(self, address: str) -> None:
        self._clients[self.slot * CLIENT_BUCKETS + _bucket(address)] += 1

    def client_closed(self, address: str) -> None:
        self._clients[self.slot * CLIENT_BUCKETS + _bucket(address)] -= 1

    def reset_worker(self, k: int) -> None:
        """A dead worker's counts go with it (called by the parent before restarting slot k)."""
        start = k * CLIENT_BUCKETS
        self._clients[start:start + CLIENT_BUCKETS] = memoryview(bytes(4 * CLIENT_BUCKETS)).cast("i")
        self._counters[2 * k] = 0
        self._counters[2 * k + 1] = 0
        # It may have died between a session's write to etcd and counting it: every process's
        # cached sessions go (a new epoch) rather than one of them trusting a stale offset.
        struct.pack_into("<q", self.map, 32, struct.unpack_from("<q", self.map, 32)[0] + 1)


def _bucket(address: str) -> int:
    # Python's str hash is salted per process: the workers must agree, so FNV-1a.
    h = 0xCBF29CE484222325
    for b in address.encode():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h & (CLIENT_BUCKETS - 1)


def _session_bucket(upload_id: str) -> int:
    # Upload ids are random hex (storage/base.py): their last digits are an even spread.
    return int(upload_id[-3:], 16) & (SESSION_BUCKETS - 1)
