"""The audit log: every write and every denied request, kept on the shared storage.

Each replica appends JSON lines to `<storage>/audit/<replica id>/<YYYY-MM-DD>.jsonl`
(UTC days). One writer per file means plain appends are safe even on NFS,
where O_APPEND from two machines is not; and since every replica mounts the
same storage, any replica answers a query for the whole cluster by reading
every replica's files. etcd is not the place: audit volume would swamp it.
When the blobs are in an object store, `BucketAuditLog` keeps the same log
as objects in the bucket (no replica shares a directory then).

`record` is called on the request path, so it only appends to a bounded
in-memory queue; a background task writes a batch a second in a thread, one
write and one fsync per file and batch. A full queue drops the oldest events,
counted and logged, never silently.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple, Protocol

import msgspec

from moorage.metrics import Metrics
from moorage.storage.base import BlobDriver
from moorage.storage.durable import fsync_dir, write_all
from moorage.storage.errors import StorageError

log = logging.getLogger(__name__)

# "challenged": a request that sent no credentials and got a 401 with a token
# challenge. Every client's first request to a repository looks like that (it
# learns where to get a token), so these are kept apart: a query that names no
# kind leaves them out and only counts them.
CHALLENGED = "challenged"
KINDS = ("write", "denied", "login-failed", "admin", CHALLENGED)
RETENTION_DAYS = 90
FLUSH_SECONDS = 1.0
QUEUE_EVENTS = 50_000
DROP_WARNING_SECONDS = 60.0
MAX_PATH = 512
MAX_DETAIL = 512
MAX_FIELD = 256
DEFAULT_LIMIT = 100
MAX_LIMIT = 10_000
_READ_BLOCK = 1 << 20
_DAY_FILE = re.compile(r"^(\d{4}-\d{2}-\d{2})\.jsonl$")
_REPLICA_DIR = re.compile(r"^[0-9a-f]{1,64}$")
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_SEGMENT = re.compile(r"^(\d+)-(\d+)-\d+\.jsonl$")


class AuditEvent(msgspec.Struct, frozen=True):
    """Who did what, when, from where, on which replica.

    `user` is the authenticated user (None: anonymous or not authenticated);
    `claimed` is the name given in credentials that were refused, so failed
    attempts against one account can be found. `remote` is the client's
    address: the TCP peer, or the client a load balancer named in a PROXY
    protocol header, which only trusted addresses may send (`via`: that load
    balancer); `forwarded` is the client-supplied X-Forwarded-For, kept apart
    because anyone can write it.
    """

    time: float
    replica: str
    kind: str
    method: str
    path: str
    status: int
    user: str | None = None
    claimed: str | None = None
    remote: str | None = None
    forwarded: str | None = None
    agent: str | None = None
    repo: str | None = None
    detail: str | None = None
    via: str | None = None


def bounded(value: str | None, limit: int = MAX_FIELD) -> str | None:
    """A client-supplied string cut to `limit` characters, so no request can bloat the log."""
    if value is None or len(value) <= limit:
        return value
    return value[:limit] + "…"


_encoder = msgspec.json.Encoder()
_decode = msgspec.json.Decoder(AuditEvent).decode


def day_of(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


class AuditQuery(msgspec.Struct, frozen=True):
    since: float | None = None
    until: float | None = None
    user: str | None = None
    repo: str | None = None
    kind: str | None = None
    limit: int = DEFAULT_LIMIT

    def matches(self, e: AuditEvent) -> bool:
        return (e.kind == self.kind if self.kind is not None else e.kind != CHALLENGED) and self.fits(e)

    def fits(self, e: AuditEvent) -> bool:
        """Every condition but the kind."""
        return ((self.since is None or e.time >= self.since)
                and (self.until is None or e.time <= self.until)
                and (self.repo is None or e.repo == self.repo)
                and (self.user is None or self.user in (e.user, e.claimed)))


class Found(NamedTuple):
    events: list[AuditEvent]   # newest first
    more: bool                 # more matched than the limit
    challenged: int            # challenged events left out over the period the events span (no kind asked)


class AuditSink(Protocol):
    """Where a worker process's events go: its replica's process, which writes the one file."""

    def send(self, event: AuditEvent) -> None: ...

    async def flush(self) -> None:
        """Every event sent so far by any of the replica's processes, written."""


class AuditLog:
    def __init__(self, storage_dir: Path, replica: str, retention_days: int = RETENTION_DAYS,
                 queue_events: int = QUEUE_EVENTS, sink: AuditSink | None = None,
                 metrics: Metrics | None = None):
        self.metrics = metrics
        self.root = Path(storage_dir) / "audit"
        self.replica = replica
        self.dir = self.root / replica
        self.retention_days = retention_days
        self.queue_events = queue_events
        self._queue: deque[AuditEvent] = deque()
        self.sink = sink  # a worker's: events go to the replica's process (cluster/channel.py)
        self.dropped = 0  # since this process started
        self._dropped_unreported = 0
        self._warned_at = 0.0
        self._lock = asyncio.Lock()  # one batch at a time keeps each file in order
        # And one writer thread at a time, even when a caller of flush() was
        # cancelled (a client hung up on a query) while its thread still writes.
        self._write_lock = threading.Lock()
        self._task: asyncio.Task | None = None
        self._stopping = asyncio.Event()
        self._checked: set[Path] = set()  # files whose tail we have made sure ends a line
        self._retention_day = ""

    # -- writing -----------------------------------------------------------------

    def record(self, event: AuditEvent) -> None:
        """Queue an event; never blocks, never raises."""
        if self.sink is not None:
            self.sink.send(event)
            return
        if len(self._queue) >= self.queue_events:
            self._queue.popleft()
            self.dropped += 1
            self._dropped_unreported += 1
            if self.metrics is not None:
                self.metrics.audit_dropped.inc()
        self._queue.append(event)

    async def open(self) -> None:
        if self.sink is not None:
            return  # the replica's process writes (and expires) the files
        self.dir.mkdir(parents=True, exist_ok=True)
        await self._expire_if_new_day()

    async def start(self) -> None:
        """Open, then write in a task of its own (a replica runs `run` among its tasks instead)."""
        await self.open()
        self._task = asyncio.create_task(self.run())

    async def run(self) -> None:
        """Write a batch a second until close(), which waits for it to end."""
        # Stopped by an event, not by cancelling: a cancelled flush would let
        # go of the lock while its thread still writes, and the next batch
        # could interleave with it.
        if self._task is None:  # run by its owner (a replica's task list) rather than start()
            self._task = asyncio.current_task()
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), FLUSH_SECONDS)
            except asyncio.TimeoutError:
                pass
            try:
                await self.flush()
                await self._expire_if_new_day()
            except Exception:  # the log must outlive a bad moment of the disk
                log.exception("audit log flush failed; will retry")

    async def flush(self) -> None:
        """Write everything queued so far; on an error the batch goes back to the queue."""
        if self.sink is not None:
            await self.sink.flush()
            return
        async with self._lock:
            self._report_drops()
            if not self._queue:
                return
            batch = list(self._queue)
            self._queue.clear()
            try:
                await self._persist(batch)
            except (OSError, StorageError) as e:
                log.error("cannot write the audit log; keeping events in memory",
                          extra={"dir": str(self.dir), "error": str(e), "events": len(batch)})
                for event in reversed(batch):
                    if len(self._queue) >= self.queue_events:
                        self.dropped += 1
                        self._dropped_unreported += 1
                        if self.metrics is not None:
                            self.metrics.audit_dropped.inc()
                        continue
                    self._queue.appendleft(event)

    def _report_drops(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._dropped_unreported and (force or now - self._warned_at >= DROP_WARNING_SECONDS):
            log.warning("audit events were dropped: the queue was full", extra={
                "dropped": self._dropped_unreported, "dropped_total": self.dropped,
                "queue_events": self.queue_events})
            self._dropped_unreported = 0
            self._warned_at = now

    async def _persist(self, batch: list[AuditEvent]) -> None:
        await asyncio.to_thread(self._write, batch)

    def _write(self, batch: list[AuditEvent]) -> None:
        with self._write_lock:
            self._write_days(batch)

    def _write_days(self, batch: list[AuditEvent]) -> None:
        by_day: dict[str, list[bytes]] = {}
        for event in batch:
            by_day.setdefault(day_of(event.time), []).append(_encoder.encode(event) + b"\n")
        self.dir.mkdir(parents=True, exist_ok=True)
        for day, lines in by_day.items():
            path = self.dir / f"{day}.jsonl"
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                data = b"".join(lines)
                if path not in self._checked:
                    # A crash mid-write may have left half a line: start on a fresh one.
                    if _ends_mid_line(path):
                        data = b"\n" + data
                    self._checked.add(path)
                    new = True
                else:
                    new = False
                write_all(fd, data)
            finally:
                os.close(fd)
            if new:
                fsync_dir(self.dir)

    async def close(self) -> None:
        """Stop the writer (`run` returns) and write what is left; called on shutdown."""
        self._stopping.set()
        if self._task is not None:
            await self._task
            self._task = None
        try:
            await self.flush()
        except Exception:
            log.exception("audit log: final flush failed", extra={"events": len(self._queue)})
        self._report_drops(force=True)

    # -- retention ---------------------------------------------------------------

    async def _expire_if_new_day(self) -> None:
        today = day_of(time.time())
        if today != self._retention_day:
            self._retention_day = today
            removed = await self._expire(time.time())
            if removed:
                log.info("audit log: removed old day files", extra={"files": removed,
                                                                    "retention_days": self.retention_days})

    async def _expire(self, now: float) -> int:
        return await asyncio.to_thread(self.expire, now)

    def expire(self, now: float) -> int:
        """Delete day files past retention, every replica's (a removed replica cleans up no more)."""
        oldest = day_of(now - self.retention_days * 86400)
        removed = 0
        for _, day, path in self._files():
            if day < oldest:
                try:
                    path.unlink()
                    removed += 1
                except FileNotFoundError:
                    pass  # another replica got there first
        return removed

    # -- reading -----------------------------------------------------------------

    def _files(self) -> list[tuple[str, str, Path]]:
        """(replica, day, path) of every day file of every replica."""
        found = []
        try:
            replicas = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        for r in replicas:
            if not (_REPLICA_DIR.match(r.name) and r.is_dir()):
                continue
            try:
                entries = list(os.scandir(r.path))
            except FileNotFoundError:
                continue
            for f in entries:
                m = _DAY_FILE.match(f.name)
                if m:
                    found.append((r.name, m.group(1), Path(f.path)))
        return found

    async def query(self, q: AuditQuery) -> Found:
        """Matching events of the whole cluster, newest first; whether more matched than `limit`;
        and how many challenged events were left out on the way.

        Our own queue is flushed first, so a caller sees what it just did.
        """
        await self.flush()
        return await self._read(q)

    async def _read(self, q: AuditQuery) -> Found:
        return await asyncio.to_thread(self._query, q)

    def _query(self, q: AuditQuery) -> Found:
        first = day_of(q.since) if q.since is not None else ""
        last = day_of(q.until) if q.until is not None else "9999-12-31"
        days: dict[str, list[tuple[str, Path]]] = {}
        for replica, day, path in self._files():
            if first <= day <= last:
                days.setdefault(replica, []).append((day, path))
        # Each replica's events, newest first (its files are written in time
        # order); merged across replicas by time, read lazily from the end.
        streams = [_newest_first(sorted(files, reverse=True)) for files in days.values()]
        selection = Selection(q)
        for event in heapq.merge(*streams, key=lambda e: -e.time):
            if selection.done(event):
                break
        return selection.found()


class Selection:
    """What a query keeps of the cluster's events, fed newest first."""

    def __init__(self, q: AuditQuery):
        self.q = q
        self.events: list[AuditEvent] = []
        self.more = False
        self.challenged = 0

    def done(self, event: AuditEvent) -> bool:
        """Take `event`; True once nothing further can be taken."""
        q = self.q
        if q.since is not None and event.time < q.since:
            return True  # newest first: nothing older can match
        if q.matches(event):
            if len(self.events) == q.limit:
                self.more = True
                return True
            self.events.append(event)
        elif q.kind is None and event.kind == CHALLENGED and q.fits(event):
            self.challenged += 1
        return False

    def found(self) -> Found:
        return Found(self.events, self.more, self.challenged)


class BucketAuditLog(AuditLog):
    """The audit log in the object store, for clusters that share no directory.

    S3 has no append: each replica writes one object per day and flush,
    `audit/<replica>/<YYYY-MM-DD>/<first ns>-<last ns>-<seq>.jsonl` (a second's
    events, or what piled up while the store was down), written by that
    replica alone. Any replica answers for the whole cluster, removed and
    dead replicas included: it lists the day prefixes (never the blobs) and
    reads objects newest first, merged by time across replicas; an object is
    read only once every event newer than its last one is out.
    """

    def __init__(self, storage: BlobDriver, replica: str, retention_days: int = RETENTION_DAYS,
                 queue_events: int = QUEUE_EVENTS, sink: AuditSink | None = None):
        super().__init__(Path("."), replica, retention_days, queue_events, sink=sink)
        self.storage = storage
        self._seq = 0

    async def open(self) -> None:
        if self.sink is not None:
            return  # the replica's process writes (and expires) the objects
        await self._expire_if_new_day()

    async def _persist(self, batch: list[AuditEvent]) -> None:
        by_day: dict[str, list[AuditEvent]] = {}
        for event in batch:
            by_day.setdefault(day_of(event.time), []).append(event)
        for day, events in by_day.items():
            self._seq += 1
            first, last = min(e.time for e in events), max(e.time for e in events)
            name = f"audit/{self.replica}/{day}/{_ns(first)}-{_ns(last)}-{self._seq:06d}.jsonl"
            await self.storage.put_file(name, b"".join(_encoder.encode(e) + b"\n" for e in events))

    async def _days(self, first: str, last: str) -> dict[str, list[str]]:
        """day -> the replicas that wrote on it, within [first, last]."""
        days: dict[str, list[str]] = {}
        for replica in await self.storage.list_dirs("audit/"):
            if _REPLICA_DIR.match(replica):
                for day in await self.storage.list_dirs(f"audit/{replica}/"):
                    if _DAY.match(day) and first <= day <= last:
                        days.setdefault(day, []).append(replica)
        return days

    async def _expire(self, now: float) -> int:
        oldest = day_of(now - self.retention_days * 86400)
        removed = 0
        for day, replicas in (await self._days("", "9999-12-31")).items():
            if day < oldest:
                for replica in replicas:
                    names = await self.storage.list_files(f"audit/{replica}/{day}/")
                    await self.storage.delete_files(names)
                    removed += len(names)
        return removed

    async def _read(self, q: AuditQuery) -> Found:
        first = day_of(q.since) if q.since is not None else ""
        last = day_of(q.until) if q.until is not None else "9999-12-31"
        selection = Selection(q)
        for day, replicas in sorted((await self._days(first, last)).items(), reverse=True):
            objects: list[tuple[int, str]] = []   # (last event's ns, name)
            for replica in replicas:
                for name in await self.storage.list_files(f"audit/{replica}/{day}/"):
                    m = _SEGMENT.match(name.rsplit("/", 1)[-1])
                    if m:
                        objects.append((int(m.group(2)), name))
            objects.sort()   # taken from the end: the newest last event first
            heap: list[tuple[float, int, AuditEvent]] = []
            n = 0
            while objects or heap:
                # Load every object that may hold an event newer than the newest loaded one.
                while objects and (not heap or objects[-1][0] >= _ns(-heap[0][0])):
                    _, name = objects.pop()
                    for line in (await self.storage.read_file(name) or b"").splitlines():
                        try:
                            event = _decode(line)
                        except (msgspec.DecodeError, msgspec.ValidationError):
                            continue
                        n += 1
                        heapq.heappush(heap, (-event.time, n, event))
                if not heap:
                    break
                if selection.done(heapq.heappop(heap)[2]):
                    return selection.found()
        return selection.found()


def _ns(ts: float) -> int:
    return int(ts * 1e9)


def _newest_first(files: list[tuple[str, Path]]) -> Iterator[AuditEvent]:
    for _, path in files:
        for line in _lines_backwards(path):
            try:
                yield _decode(line)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue  # a line torn by a crash, or written by another version


def _lines_backwards(path: Path) -> Iterator[bytes]:
    """The file's lines, last first, reading blocks from the end (days can be large)."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return  # expired meanwhile
    with f:
        pos = f.seek(0, os.SEEK_END)
        rest = b""
        while pos > 0:
            step = min(_READ_BLOCK, pos)
            pos -= step
            f.seek(pos)
            block = f.read(step) + rest
            lines = block.split(b"\n")
            rest = lines[0]
            for line in reversed(lines[1:]):
                if line:
                    yield line
        if rest:
            yield rest


def _ends_mid_line(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            if f.seek(0, os.SEEK_END) == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except FileNotFoundError:
        return False


