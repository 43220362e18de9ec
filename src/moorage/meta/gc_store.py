"""Garbage collection's metadata: the snapshot it marks from, its sweep transactions,
its lock and its run records. The collector's reasoning is in registry/gc.py.

Every sweep transaction compares that this run still holds the lock, so a
collector that lost its lease (and may be running beside its successor)
changes nothing more. Like MetaStore's, every method raises
MetadataUnavailable when etcd does not answer.
"""

from __future__ import annotations

import secrets
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from moorage.meta import keys
from moorage.meta.errors import boundary
from moorage.meta.etcd import (
    EtcdClient, Event, cmp_absent, cmp_mod_revision, cmp_prefix_unchanged, cmp_value, op_delete, op_get, op_put,
)
from moorage.meta.index import Index
from moorage.meta.records import BlobRecord, ManifestRecord, UploadRecord, decode_note, decoder, encode, encode_note
from moorage.meta.store import TOMBSTONE
from moorage.meta.webhooks import QueuedEvent, queue_ops

_blob = decoder(BlobRecord)
_manifest = decoder(ManifestRecord)
_upload = decoder(UploadRecord)

# Runs whose summaries are kept; older ones are deleted as new ones start.
KEEP_RUNS = 100
# Operations per sweep transaction: one round trip for many items, far below
# etcd's limits (--max-txn-ops, request size).
BATCH_OPS = 256


class GcRun(msgspec.Struct, kw_only=True):
    """One run's progress while it goes, its summary once it is done."""

    id: str
    replica: str
    trigger: str                 # "admin" or "schedule"
    dry_run: bool = False
    state: str = "running"       # running, done, failed, abandoned
    phase: str = "starting"      # mark, manifests, blobs, links, uploads, orphans, done
    started: float = 0.0
    finished: float | None = None
    revision: int = 0            # the etcd revision it marked at
    manifests_kept: int = 0
    manifests_swept: int = 0
    blobs_kept: int = 0
    # Unreferenced blobs kept only because they are younger than gc.grace_seconds,
    # and when the first and the last of them become collectable (epoch seconds).
    blobs_young: int = 0
    bytes_young: int = 0
    young_collectable_from: float | None = None
    young_collectable_until: float | None = None
    blobs_swept: int = 0
    links_swept: int = 0
    uploads_swept: int = 0
    orphans_swept: int = 0
    tmp_swept: int = 0
    bytes_freed: int = 0
    conflicts: int = 0           # items kept because a push or delete raced the sweep
    error: str | None = None


_run = decoder(GcRun)


def watch_runs(index: Index, callback: Callable[[GcRun], None]) -> None:
    """Call `callback` with every GC run record written, from any replica, as the index's watch
    delivers it (those already there when it loads included)."""
    def event(ev: Event) -> None:
        if not ev.deleted:
            try:
                callback(_run.decode(ev.kv.value))
            except msgspec.DecodeError:
                pass
    index.subscribe(keys.GC_RUN, event)


def gc_note(run_id: str, digest: str) -> bytes:
    """A run's note of an object it is deleting: a writer's note (keys.GC_WRITING) by the run."""
    return keys.gc_writing(digest, f"gc-{run_id}")


def new_run_id() -> str:
    """Sortable by start time, unique across replicas."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


@dataclass(slots=True)
class Snapshot:
    """The registry's metadata at one revision, as the collector marks it."""

    revision: int
    blobs: dict[str, tuple[BlobRecord, int]] = field(default_factory=dict)            # digest: (record, mod)
    links: dict[str, list[tuple[str, int]]] = field(default_factory=lambda: defaultdict(list))  # digest: [(repo, mod)]
    manifests: dict[str, dict[str, tuple[ManifestRecord, int]]] = field(
        default_factory=lambda: defaultdict(dict))                                    # repo: digest: (record, mod)
    tagged: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))     # repo: digests tagged
    uploads: dict[str, tuple[UploadRecord | None, int]] = field(default_factory=dict)  # id: (None: closed, mod)
    # Writers' notes of objects about to be written (MetaStore.intend):
    # digest: [(key, mod, time, location: "" for the content address)]
    intents: dict[str, list[tuple[bytes, int, float, str]]] = field(default_factory=lambda: defaultdict(list))


@dataclass(frozen=True, slots=True)
class Unit:
    """One item's sweep: it happens whole or not at all."""

    compare: tuple
    ops: tuple


class GcStore:
    def __init__(self, client: EtcdClient, index: Index):
        self.client = client
        # A sweep is acknowledged once this replica's index has applied it, as MetaStore's
        # writes are: alone in its cluster a replica reads blobs from the index without asking
        # etcd (Index.sync), so a blob HEAD just after a sweep must already say 404.
        self.index = index

    # -- the snapshot --------------------------------------------------------

    @boundary
    async def snapshot(self) -> Snapshot:
        """Read page by page and decoded as it comes: memory holds the decoded records only."""
        snap = Snapshot(await self.client.revision())
        names: dict[str, str] = {}   # one string per repository name, however many keys name it
        async for page in self.client.range_pages(keys.BLOB, snap.revision):
            for kv in page:
                snap.blobs[kv.key[len(keys.BLOB):].decode()] = (_blob.decode(kv.value), kv.mod_revision)
        async for page in self.client.range_pages(keys.REPO, snap.revision):
            for kv in page:
                rk = keys.parse_repo_key(kv.key)
                if rk is None:
                    continue
                repo = names.setdefault(rk.repo, rk.repo)
                if rk.kind == "blob":
                    snap.links[rk.name].append((repo, kv.mod_revision))
                elif rk.kind == "manifest":
                    snap.manifests[repo][rk.name] = (_manifest.decode(kv.value), kv.mod_revision)
                elif rk.kind == "tag":
                    snap.tagged[repo].add(kv.value.decode())
        async for page in self.client.range_pages(keys.UPLOAD, snap.revision):
            for kv in page:
                record = None if kv.value == TOMBSTONE else _upload.decode(kv.value)
                snap.uploads[kv.key[len(keys.UPLOAD):].decode()] = (record, kv.mod_revision)
        async for page in self.client.range_pages(keys.GC_WRITING, snap.revision):
            for kv in page:
                digest, _, _ = kv.key[len(keys.GC_WRITING):].decode().partition("/")
                snap.intents[digest].append((kv.key, kv.mod_revision, *decode_note(kv.value)))
        return snap

    # -- sweep units -----------------------------------------------------------

    @staticmethod
    def manifest_unit(run_id: str, revision: int, repo: str, digest: str, record: ManifestRecord,
                      mod: int) -> Unit:
        """Delete a manifest unless it changed, a tag moved, or a manifest arrived in its repository
        (an index that could name it) since the mark."""
        ops = [op_delete(keys.manifest(repo, digest))]
        if record.subject:
            ops.append(op_delete(keys.referrer(repo, record.subject, digest)))
        return Unit((cmp_value(keys.GC_LOCK, run_id.encode()), cmp_mod_revision(keys.manifest(repo, digest), mod),
                     cmp_prefix_unchanged(keys.tags(repo), revision),
                     cmp_prefix_unchanged(keys.repo_manifests(repo), revision)),
                    tuple(ops))

    @staticmethod
    def blob_unit(run_id: str, lease: int, digest: str, mod: int, links: Sequence[tuple[str, int]],
                  note: str | None = None) -> Unit:
        """Delete a blob record and its links unless any changed since the mark (an upload,
        a mount, a manifest that uses it all rewrite one), leaving a deletion marker. With
        `note` (the record's location), also a note of the object to delete, dated long ago and
        under no lease: on a store GC never lists, an object whose deletion a dead or failed run
        never finished is then collected by the next run, as a crashed writer's is."""
        compare = [cmp_value(keys.GC_LOCK, run_id.encode()), cmp_mod_revision(keys.blob(digest), mod)]
        compare += [cmp_mod_revision(keys.repo_blob(repo, digest), m) for repo, m in links]
        ops = [op_delete(keys.blob(digest))] + [op_delete(keys.repo_blob(repo, digest)) for repo, _ in links]
        ops.append(op_put(keys.gc_deleting(digest), b"", lease))
        if note is not None:
            ops.append(op_put(gc_note(run_id, digest), encode_note(0.0, note)))
        return Unit(tuple(compare), tuple(ops))

    @staticmethod
    def link_unit(run_id: str, repo: str, digest: str, link_mod: int, blob_mod: int) -> Unit:
        """Unlink a blob from a repository none of whose manifests uses it (blob_mod 0: no record)."""
        return Unit((cmp_value(keys.GC_LOCK, run_id.encode()), cmp_mod_revision(keys.repo_blob(repo, digest), link_mod),
                     cmp_mod_revision(keys.blob(digest), blob_mod)),
                    (op_delete(keys.repo_blob(repo, digest)),))

    @staticmethod
    def orphan_unit(run_id: str, lease: int, digest: str, intents: Sequence[bytes] = (),
                    revision: int = 0) -> Unit:
        """Claim a file that has no record, unless a record has appeared; with `intents` (the
        writers' notes that named it at the mark, `revision`), also unless a writer noted a new
        write since, and delete those notes."""
        compare = [cmp_value(keys.GC_LOCK, run_id.encode()), cmp_absent(keys.blob(digest))]
        ops = [op_put(keys.gc_deleting(digest), b"", lease)]
        if intents:
            compare.append(cmp_prefix_unchanged(keys.gc_writing_prefix(digest), revision))
            ops += [op_delete(k) for k in intents]
        return Unit(tuple(compare), tuple(ops))

    @staticmethod
    def intent_unit(run_id: str, key: bytes, mod: int) -> Unit:
        """Delete a writer's stale note: of a digest that has a record (whose sweep takes the
        object), or naming a location of its own, whose object no record names while the note
        is there (MetaStore.commit_blob_at), and which GC then deletes."""
        return Unit((cmp_value(keys.GC_LOCK, run_id.encode()), cmp_mod_revision(key, mod)), (op_delete(key),))

    @boundary
    async def apply(self, units: Sequence[Unit]) -> list[bool]:
        """Each unit's outcome. Many go in one transaction; if that one loses a race,
        each is tried on its own, so one conflict costs only its own item."""
        out: list[bool] = []
        newest = 0   # the newest revision a sweep committed at
        batch: list[Unit] = []
        # A comparison several units share (the lock, a repository's tags) is made once per
        # transaction: keyed by its encoding, as protobuf messages do not hash.
        compare: dict[bytes, Any] = {}
        ops = 0
        for unit in units:
            mine = {c.SerializeToString(): c for c in unit.compare}
            new = sum(k not in compare for k in mine)
            if batch and ops + len(unit.ops) + len(compare) + new > BATCH_OPS:
                done, revision = await self._apply_batch(batch, list(compare.values()))
                out, newest = out + done, max(newest, revision)
                batch, compare, ops = [], {}, 0
            batch.append(unit)
            compare.update(mine)
            ops += len(unit.ops)
        if batch:
            done, revision = await self._apply_batch(batch, list(compare.values()))
            out, newest = out + done, max(newest, revision)
        await self.index.wait_applied(newest)
        return out

    async def _apply_batch(self, batch: list[Unit], compare: list) -> tuple[list[bool], int]:
        """Each unit's outcome, and the newest revision one committed at (0: none did)."""
        result = await self.client.txn(compare, [o for u in batch for o in u.ops])
        if result.succeeded:
            return [True] * len(batch), result.revision
        if len(batch) == 1:
            return [False], 0
        results = [await self.client.txn(u.compare, u.ops) for u in batch]
        return [r.succeeded for r in results], max((r.revision for r in results if r.succeeded), default=0)

    @boundary
    async def clear_markers(self, digests: Sequence[str], noted_by: str | None = None) -> None:
        """Delete the markers of objects now deleted, and with `noted_by` (a run id) that run's
        notes of them (blob_unit)."""
        ops = [op_delete(keys.gc_deleting(d)) for d in digests]
        if noted_by is not None:
            ops += [op_delete(gc_note(noted_by, d)) for d in digests]
        for i in range(0, len(ops), BATCH_OPS):
            await self.client.txn([], ops[i:i + BATCH_OPS])

    # -- the lock --------------------------------------------------------------

    @boundary
    async def acquire(self, run: GcRun, ttl: int) -> tuple[int | None, str | None]:
        """(lease, None) when this run now holds the lock; (None, holder's run id) otherwise."""
        lease = await self.client.grant_lease(ttl)
        result = await self.client.txn(
            [cmp_absent(keys.GC_LOCK)],
            [op_put(keys.GC_LOCK, run.id.encode(), lease), op_put(keys.gc_run(run.id), encode(run))],
            [op_get(keys.GC_LOCK)])
        if result.succeeded:
            return lease, None
        await self.client.revoke_lease(lease)
        kvs = result.responses[0].response_range.kvs
        return None, kvs[0].value.decode() if kvs else "?"

    @boundary
    async def release(self, run_id: str, lease: int) -> None:
        """Let go of the lock; revoking the lease also drops any marker left behind."""
        await self.client.txn([cmp_value(keys.GC_LOCK, run_id.encode())], [op_delete(keys.GC_LOCK)])
        await self.client.revoke_lease(lease)

    @boundary
    async def keep_alive(self, lease: int) -> int:
        """Renew the lock's lease; its new TTL (0: it has expired, and the lock with it)."""
        return await self.client.keep_alive(lease)

    @boundary
    async def holder(self) -> str | None:
        kv = await self.client.get(keys.GC_LOCK)
        return kv.value.decode() if kv else None

    # -- run records -----------------------------------------------------------

    @boundary
    async def save(self, run: GcRun, events: Sequence[QueuedEvent] = ()) -> None:
        """Write a run's record (with the webhook events telling of its end, in one transaction)."""
        if events:
            await self.client.txn([], [op_put(keys.gc_run(run.id), encode(run)), *queue_ops(events)])
        else:
            await self.client.put(keys.gc_run(run.id), encode(run))

    @boundary
    async def run(self, run_id: str) -> GcRun | None:
        kv = await self.client.get(keys.gc_run(run_id))
        return _run.decode(kv.value) if kv else None

    @boundary
    async def runs(self) -> list[GcRun]:
        """Every kept run, oldest first."""
        _, kvs = await self.client.range_prefix(keys.GC_RUN)
        return [_run.decode(kv.value) for kv in kvs]

    @boundary
    async def prune(self, runs: list[GcRun]) -> None:
        old = runs[:max(len(runs) - KEEP_RUNS, 0)]
        if old:
            await self.client.txn([], [op_delete(keys.gc_run(r.id)) for r in old])
