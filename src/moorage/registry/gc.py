"""Online garbage collection: mark from one etcd revision, sweep item by item through etcd.

What is garbage
    - manifests that are neither tagged, nor a child of a kept index, nor a
      referrer of a kept subject; untagged ones only when
      `gc.untagged_after_seconds` is set, and only once older than that
      (people pin images by digest);
    - blobs (layers, configs, manifest bodies) that no kept manifest of any
      repository uses, older than `gc.grace_seconds` (BlobRecord.created is
      rewritten by every upload and mount, so "older" means "not linked lately");
    - repository links to a blob that no kept manifest of that repository uses
      (same grace), and links to blobs that have no record;
    - upload sessions idle longer than `gc.upload_max_age_seconds`, their data,
      and files in uploads/ and tmp/ left by crashes, as old;
    - blob files without a record (a crash between placing and committing),
      older than the grace period: found by listing them where the store
      allows (the filesystem), else by their writers' notes in etcd
      (registry/placement.py): a note older than the grace period whose digest
      has no record names an object a refused commit or a crash left behind;
      one naming a location of its own (an S3 upload completed in place) names
      an object no record points at, whatever the digest's record says.

Why a push racing a sweep is safe
    Mark reads the registry at one revision M. Each sweep is one etcd
    transaction that compares every key the decision rests on is unchanged
    since M: the blob record's and each link's mod_revision (a blob sweep), the
    manifest's and, by range, the repository's tags and manifests (a manifest
    sweep). Every write that starts to use a blob rewrites one of those keys:
    an upload commit and a mount rewrite the blob record, a manifest put
    rewrites the links of the blobs it uses (and compares they exist). So etcd
    orders the two: if the push's transaction comes first the sweep's compare
    fails and the blob is kept; if the sweep's comes first the push's compare
    (the link exists) fails and the client sees MANIFEST_BLOB_UNKNOWN /
    BLOB_UNKNOWN and uploads again. Nothing a manifest acknowledged before,
    during or after the run needs is ever deleted from etcd.

Why the file is safe too
    A writer places the blob file first (rename) and commits its record
    second; the sweep commits first and deletes the file second, so a file a
    writer placed between the two could be deleted under a record committed
    after. The sweep's transaction therefore also puts a marker
    /moorage/gc/deleting/<digest> (under the collector's lease), deletes the
    file, then deletes the marker. A writer's commit compares the marker is
    absent (else waits for it to go and places the file again,
    registry/placement.py). Thus if a sweep's transaction precedes a commit
    that succeeded, so did the marker's deletion, and with it the file
    deletion: the only file deletion that can hit a committed blob happened
    before its commit. The writer notes the index's revision R before placing
    the file; after committing (which waits for the index to apply the
    commit), a marker event after R means a sweep came and went in between, so
    it checks the file and places it again if it is gone. Markers never seen
    (a watch reload, an unapplied write) count as such an event. A collector
    that dies leaves markers that vanish with its lease.

Deleting objects beside the sweep
    An object store deletes slowly (SeaweedFS spends about 0.4 ms of CPU per
    object) and on its own cores, so a step's objects are deleted while the
    sweep goes on to the next step's transaction, up to DELETE_CONCURRENCY
    steps at once. Each step's markers go only once its own objects are gone,
    as above. The run waits for every deletion in flight, even after one
    failed (a request cancelled half way may still be carried out by the
    store), before it ends and its lease, with the markers, goes. On a store GC
    never lists (S3) the sweep's transaction also notes each object it is to
    delete, as a writer notes one it is to write, under no lease: if the run
    dies or the store fails before the object is gone, no record names it any
    more, and the next run collects it by that note.

One collector at a time
    A run holds /moorage/gc/lock under a lease it keeps alive; every sweep
    transaction compares the lock still names the run, so a collector that
    lost its lease changes nothing more. Runs are idempotent: an interrupted
    one leaves only items not yet swept, which the next run finds again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from moorage.meta.gc_store import GcRun, GcStore, Snapshot, Unit
from moorage.meta.records import ManifestRecord
from moorage.meta.store import MetaStore
from moorage.storage.base import BlobDriver

log = logging.getLogger(__name__)

# Items per sweep step: between steps the run reports progress and pauses for
# `gc.debug_delay_ms`.
STEP = 200
REPORT_SECONDS = 0.5
# Steps whose objects are being deleted while the sweep goes on (memory: their digests only).
DELETE_CONCURRENCY = 4
# Objects sized at once before a step deletes them (an object store answers each HEAD in a
# round trip of its own: one at a time, a step of 200 took 200 of them).
SIZE_CONCURRENCY = 16


@dataclass(frozen=True, slots=True)
class Policy:
    grace_seconds: float = 3600
    untagged_after_seconds: float | None = None
    upload_max_age_seconds: float = 86400
    delay_ms: int = 0
    dry_run: bool = False


@dataclass(slots=True)
class Marked:
    """What the mark phase decided."""

    garbage_manifests: dict[str, list[list[str]]]  # repo: levels of digests, indexes before children
    kept: dict[str, set[str]]                    # repo: manifests kept


def mark_manifests(snap: Snapshot, policy: Policy, now: float) -> Marked:
    """Kept manifests per repository: tagged ones (and, per policy, untagged ones), the
    children of kept indexes and the referrers of kept subjects, transitively."""
    garbage: dict[str, list[str]] = {}
    kept_all: dict[str, set[str]] = {}
    for repo, manifests in snap.manifests.items():
        if policy.untagged_after_seconds is None:
            roots = set(manifests)
        else:
            cutoff = now - policy.untagged_after_seconds
            roots = {d for d in snap.tagged.get(repo, ()) if d in manifests}
            roots |= {d for d, (rec, _) in manifests.items() if rec.created > cutoff}
        referrers: dict[str, list[str]] = defaultdict(list)
        for d, (rec, _) in manifests.items():
            if rec.subject:
                referrers[rec.subject].append(d)
        kept: set[str] = set()
        stack = list(roots)
        while stack:
            d = stack.pop()
            if d in kept or d not in manifests:
                continue
            kept.add(d)
            stack.extend(manifests[d][0].children)
            stack.extend(referrers.get(d, ()))
        kept_all[repo] = kept
        if len(kept) < len(manifests):
            garbage[repo] = _levels({d: manifests[d][0] for d in manifests if d not in kept})
    return Marked(garbage, kept_all)


def _levels(records: dict[str, ManifestRecord]) -> list[list[str]]:
    """Garbage manifests in levels: no index shares a level with its children, and every
    index comes in an earlier level, so a child is swept only after its indexes."""
    children_in = {d: [c for c in rec.children if c in records] for d, rec in records.items()}
    parents: dict[str, int] = defaultdict(int)
    for kids in children_in.values():
        for c in kids:
            parents[c] += 1
    level = sorted(d for d in records if not parents[d])
    levels, seen = [], set()
    while level:
        levels.append(level)
        seen.update(level)
        following = []
        for d in level:
            for c in children_in[d]:
                parents[c] -= 1
                if not parents[c]:
                    following.append(c)
        level = sorted(set(following))
    rest = sorted(set(records) - seen)  # a cycle (impossible with digests): one at a time
    return levels + [[d] for d in rest]


class Deletions:
    """Object deletions that run beside the sweep, at most `limit` at once.

    A failure is raised by the next `start` or by `check`; `wait` never
    raises, so a run that fails still waits for every deletion it started."""

    def __init__(self, limit: int):
        self._slots = asyncio.Semaphore(limit)
        self._tasks: set[asyncio.Task] = set()
        self._failure: BaseException | None = None

    async def start(self, work: Callable[[], Awaitable[None]]) -> None:
        self.check()
        await self._slots.acquire()
        task = asyncio.create_task(self._run(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, work: Callable[[], Awaitable[None]]) -> None:
        try:
            await work()
        except BaseException as e:
            if self._failure is None:
                self._failure = e
        finally:
            self._slots.release()

    async def wait(self) -> None:
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    def check(self) -> None:
        if self._failure is not None:
            raise self._failure


class Collector:
    """One run: mark, then sweep manifests, blobs, links, uploads and orphan files."""

    def __init__(self, gc_store: GcStore, meta: MetaStore, storage: BlobDriver, run: GcRun, lease: int,
                 policy: Policy, report: Callable[[GcRun], Awaitable[None]],
                 closed: Callable[[str], None] = lambda upload_id: None,
                 now: Callable[[], float] = time.time):
        self.gcs = gc_store
        self.meta = meta
        self.storage = storage
        self.run = run
        self.lease = lease
        self.policy = policy
        self._report = report
        self._closed = closed   # tells this replica's sessions an upload is over (they cache while solo)
        # Records carry their writers' clocks: ages are measured against the slowest clock of
        # the cluster (cluster/clock.py), so a replica whose clock runs ahead collects nothing early.
        self._now = now
        self._reported = 0.0
        self._deletions = Deletions(DELETE_CONCURRENCY)

    async def progress(self, force: bool = False) -> None:
        if force or time.monotonic() - self._reported >= REPORT_SECONDS:
            self._reported = time.monotonic()
            await self._report(self.run)

    async def _step(self) -> None:
        await self.progress()
        if self.policy.delay_ms:
            await asyncio.sleep(self.policy.delay_ms / 1000)

    async def _apply(self, units: list[Unit]) -> list[bool]:
        if self.policy.dry_run:
            return [True] * len(units)
        done = await self.gcs.apply(units)
        self.run.conflicts += done.count(False)
        return done

    async def collect(self) -> GcRun:
        run, policy = self.run, self.policy
        now = self._now()
        # Files carry the storage's clock: their ages are measured on its scale.
        file_now = time.time() + await self.storage.clock_offset()
        await self._phase("mark")
        snap = await self.gcs.snapshot()
        run.revision = snap.revision
        marked = mark_manifests(snap, policy, now)
        run.manifests_kept = sum(map(len, marked.kept.values()))

        await self._phase("manifests")
        survivors = await self._sweep_manifests(snap, marked)
        kept = {repo: marked.kept.get(repo, set()) | survivors.get(repo, set()) for repo in snap.manifests}

        live: set[str] = set()
        used: dict[str, set[str]] = defaultdict(set)   # repo: blobs its kept manifests use
        for repo, digests in kept.items():
            for d in digests:
                rec = snap.manifests[repo][d][0]
                live.add(d)
                live.update(rec.blobs)
                used[repo].update(rec.blobs)
        run.blobs_kept = sum(1 for d in snap.blobs if d in live)

        cutoff = now - policy.grace_seconds
        young = [rec for d, (rec, _) in snap.blobs.items() if d not in live and rec.created > cutoff]
        if young:
            # When, on this replica's clock (ages run on the slowest one's, `now`).
            late = time.time() - now + policy.grace_seconds
            run.blobs_young, run.bytes_young = len(young), sum(rec.size for rec in young)
            run.young_collectable_from = min(rec.created for rec in young) + late
            run.young_collectable_until = max(rec.created for rec in young) + late
        try:
            await self._phase("blobs")
            swept = await self._sweep_blobs(snap, live, cutoff)
            await self._phase("links")
            await self._sweep_links(snap, live, used, cutoff)
            await self._phase("uploads")
            await self._sweep_uploads(snap, now - policy.upload_max_age_seconds,
                                      file_now - policy.upload_max_age_seconds)
            await self._phase("orphans")
            await self._sweep_orphans(snap, swept, file_now - policy.grace_seconds)
            await self._sweep_intents(snap, swept, cutoff)
        finally:
            await self._deletions.wait()
        self._deletions.check()
        run.phase = "done"
        return run

    async def _phase(self, name: str) -> None:
        self.run.phase = name
        await self.progress(force=True)
        if self.policy.delay_ms:
            await asyncio.sleep(self.policy.delay_ms / 1000)

    async def _sweep_manifests(self, snap: Snapshot, marked: Marked) -> dict[str, set[str]]:
        """Delete garbage manifests, parents first; returns those that must stay after all
        (their sweep lost a race, or an index above them stayed)."""
        survivors: dict[str, set[str]] = defaultdict(set)
        for repo, levels in marked.garbage_manifests.items():
            manifests = snap.manifests[repo]
            stay = survivors[repo]
            named: set[str] = set()   # children of indexes that stay
            for level in levels:
                for i in range(0, len(level), STEP):
                    chunk = [d for d in level[i:i + STEP] if d not in named]
                    stay.update(d for d in level[i:i + STEP] if d in named)
                    units = [self.gcs.manifest_unit(self.run.id, snap.revision, repo, d, *manifests[d])
                             for d in chunk]
                    for d, ok in zip(chunk, await self._apply(units)):
                        if ok:
                            self.run.manifests_swept += 1
                        else:
                            stay.add(d)
                    await self._step()
                named.update(c for d in level if d in stay for c in manifests[d][0].children)
        # What a manifest that stays names stays too, down the whole tree.
        for repo, stay in survivors.items():
            stack = [c for d in stay for c in snap.manifests[repo][d][0].children]
            while stack:
                d = stack.pop()
                if d in snap.manifests[repo] and d not in stay:
                    stay.add(d)
                    stack.extend(snap.manifests[repo][d][0].children)
        return survivors

    async def _sweep_blobs(self, snap: Snapshot, live: set[str], cutoff: float) -> set[str]:
        candidates = [d for d, (rec, _) in snap.blobs.items() if d not in live and rec.created <= cutoff]
        swept: set[str] = set()
        noted = not self.storage.lists_blobs   # a leftover would never be listed: note each object
        for i in range(0, len(candidates), STEP):
            chunk = candidates[i:i + STEP]
            units = [self.gcs.blob_unit(self.run.id, self.lease, d, snap.blobs[d][1], snap.links.get(d, ()),
                                        snap.blobs[d][0].location if noted else None)
                     for d in chunk]
            gone = [d for d, ok in zip(chunk, await self._apply(units)) if ok]
            await self._delete_files(gone, [snap.blobs[d][0].location for d in gone], noted=noted)
            swept.update(gone)
            self.run.blobs_swept += len(gone)
            self.run.bytes_freed += sum(snap.blobs[d][0].size for d in gone)
            await self._step()
        return swept

    async def _delete_files(self, digests: list[str], locations: list[str] | None = None,
                            noted: bool = False) -> None:
        """Files whose records (or absence of one) a sweep transaction just settled, under
        markers, each where its record said (`locations`; else the content address); the
        markers go only once the files are gone. Started here, carried out beside the sweep
        (Deletions). `noted`: the sweep noted them (GcStore.blob_unit); the notes go too."""
        if digests and not self.policy.dry_run:
            blobs = list(zip(digests, locations or [""] * len(digests)))

            async def delete() -> None:
                await self.storage.delete_many(blobs)
                await self.gcs.clear_markers(digests, self.run.id if noted else None)
            await self._deletions.start(delete)

    async def _sweep_links(self, snap: Snapshot, live: set[str], used: dict[str, set[str]],
                           cutoff: float) -> None:
        units, count = [], 0
        for d, links in snap.links.items():
            blob = snap.blobs.get(d)
            if blob is not None and (d not in live or blob[0].created > cutoff):
                continue  # swept with its blob, or young
            for repo, mod in links:
                if blob is None or d not in used.get(repo, ()):
                    units.append(self.gcs.link_unit(self.run.id, repo, d, mod, blob[1] if blob else 0))
        for i in range(0, len(units), STEP):
            count = sum(await self._apply(units[i:i + STEP]))
            self.run.links_swept += count
            await self._step()

    async def _sweep_uploads(self, snap: Snapshot, cutoff: float, file_cutoff: float) -> None:
        idle = [(uid, mod) for uid, (rec, mod) in snap.uploads.items() if rec is not None and rec.updated <= cutoff]
        active = {uid for uid, (rec, _) in snap.uploads.items() if rec is not None and rec.updated > cutoff}
        for uid, mod in idle:
            if self.policy.dry_run or await self.meta.close_upload(uid, mod):
                self.run.uploads_swept += 1
                self.run.bytes_freed += snap.uploads[uid][0].offset
                if not self.policy.dry_run:
                    self._closed(uid)
                    # Closed by us, so never committed: what hashing made at its own key goes too.
                    await self.storage.delete_upload(uid, unrecorded=True)
            else:
                self.run.conflicts += 1
            await self.progress()
        closed = {uid for uid, _ in idle}
        for uid, size, stamp in await self.storage.upload_files():
            if uid not in active and uid not in closed and stamp <= file_cutoff:
                if not self.policy.dry_run:
                    await self.storage.delete_upload(uid)
                self.run.uploads_swept += 1
                self.run.bytes_freed += size
        for name, size, stamp, session in await self.storage.tmp_files():
            if stamp <= file_cutoff and session not in active:   # an active session's stays
                if not self.policy.dry_run:
                    await self.storage.delete_tmp(name)
                self.run.tmp_swept += 1
                self.run.bytes_freed += size

    async def _sweep_intents(self, snap: Snapshot, swept: set[str], cutoff: float) -> None:
        """Writers' notes older than `cutoff`. A digest with a record keeps its object (its sweep
        takes it): only the note goes. One without (or whose record this run swept), and no
        younger note (a writer still at work), is an orphan: claimed like a listed one, with
        the notes deleted in the claim unless a writer noted a new write since the mark."""
        stale: list[Unit] = []
        orphans: list[tuple[str, list[bytes]]] = []
        own: list[tuple[Unit, str, str]] = []   # notes of objects at a location of their own
        for d, all_notes in snap.intents.items():
            own += [(self.gcs.intent_unit(self.run.id, key, mod), d, location)
                    for key, mod, stamp, location in all_notes if location and stamp <= cutoff]
            notes = [note for note in all_notes if not note[3]]
            old = [(key, mod) for key, mod, stamp, _ in notes if stamp <= cutoff]
            if not old:
                continue
            if d in snap.blobs and d not in swept:
                stale += [self.gcs.intent_unit(self.run.id, key, mod) for key, mod in old]
            elif len(old) == len(notes):
                orphans.append((d, [key for key, _ in old]))
        for i in range(0, len(stale), STEP):
            await self._apply(stale[i:i + STEP])
            await self._step()
        for i in range(0, len(orphans), STEP):
            chunk = orphans[i:i + STEP]
            units = [self.gcs.orphan_unit(self.run.id, self.lease, d, notes, snap.revision) for d, notes in chunk]
            claimed = [d for (d, _), ok in zip(chunk, await self._apply(units)) if ok]
            # The object may never have been written (a crash before it was): only what is there counts.
            sizes = await self._sizes([(d, "") for d in claimed])
            await self._delete_files(claimed)
            self.run.orphans_swept += sum(size is not None for size in sizes)
            self.run.bytes_freed += sum(size or 0 for size in sizes)
            await self._step()
        for i in range(0, len(own), STEP):
            # A note claimed (deleted unchanged) stops its writer's commit (it compares the note
            # is there), so its object will never be a record's: deleted with no marker.
            chunk = own[i:i + STEP]
            claimed_own = [(d, location) for (_, d, location), ok
                           in zip(chunk, await self._apply([unit for unit, _, _ in chunk])) if ok]
            sizes = await self._sizes(claimed_own)
            if claimed_own and not self.policy.dry_run:
                await self.storage.delete_many(claimed_own)
            self.run.orphans_swept += sum(size is not None for size in sizes)
            self.run.bytes_freed += sum(size or 0 for size in sizes)
            await self._step()

    async def _sizes(self, blobs: list[tuple[str, str]]) -> list[int | None]:
        """Each blob's size where it is stored (None: not there), SIZE_CONCURRENCY asked at once."""
        slots = asyncio.Semaphore(SIZE_CONCURRENCY)

        async def size(digest: str, location: str) -> int | None:
            async with slots:
                return await self.storage.exists(digest, location)
        found = await asyncio.gather(*(size(d, location) for d, location in blobs), return_exceptions=True)
        for result in found:
            if isinstance(result, BaseException):
                raise result
        return found  # type: ignore[return-value]

    async def _sweep_orphans(self, snap: Snapshot, swept: set[str], cutoff: float) -> None:
        files = [(d, size) for d, size, stamp in await self.storage.blob_files()
                 if d not in snap.blobs and d not in swept and stamp <= cutoff]
        for i in range(0, len(files), STEP):
            chunk = files[i:i + STEP]
            units = [self.gcs.orphan_unit(self.run.id, self.lease, d) for d, _ in chunk]
            gone = [(d, size) for (d, size), ok in zip(chunk, await self._apply(units)) if ok]
            await self._delete_files([d for d, _ in gone])
            self.run.orphans_swept += len(gone)
            self.run.bytes_freed += sum(size for _, size in gone)
            await self._step()
