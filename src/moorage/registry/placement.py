"""Putting a blob file in place and committing its record, safely against a GC sweep.

A writer places the file first and commits the etcd record second; a GC
sweep of the same digest commits first (deleting the record, leaving a
marker) and deletes the file second. `Placement` is the writer's half of the
protocol registry/gc.py explains: a commit refused because a marker is
present waits for the marker to go and places the file again; a commit that
succeeded after a marker came and went since the file was placed checks the
file and puts it back if the sweep took it.

On a store GC never lists (an object store: listing blobs/ would make GC
as slow as the registry is big), a file a writer placed and never recorded
(its commit refused, or the replica died in between) would stay forever. So
there the writer first notes its intent in etcd (MetaStore.intend: one put),
places, and commits in a transaction that also deletes the note; GC takes a
note older than the grace period whose digest has no record for an orphan,
and deletes its object the way it deletes any orphan file (gc.py). A store
GC lists (`lists_blobs`, the filesystem) finds such files itself and pays no
put.

An upload the driver completes at a location of its own (S3: a multipart
upload completed in place, `BlobDriver.upload_location`) needs none of the
placing again: no sweep can touch a key no record named before this commit.
Its writer notes the location first, completes the upload there, and commits
comparing that its note is still there (else GC took the write for an
abandoned one, and the push fails); the first record of a digest keeps its
location, and a later writer of the same digest deletes its own object.

It calls only downwards: the blob driver to place a file, MetaStore to
commit; what to place and what to commit are its arguments.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TypeVar

from moorage.backoff import Backoff
from moorage.meta.records import ManifestRecord, Referrer
from moorage.meta.store import BlobBeingCollected, MetaStore, WriteCollected
from moorage.meta.webhooks import QueuedEvent
from moorage.registry.errors import Unavailable
from moorage.storage.base import BlobDriver

T = TypeVar("T")
log = logging.getLogger(__name__)

# A marker lives for one file deletion, or until its collector's lease expires
# (registry/gc.py: LOCK_TTL) if the collector died: wait a little longer than that.
MARKER_WAIT_SECONDS = 30.0
ATTEMPTS = 5


class Placement:
    def __init__(self, meta: MetaStore, storage: BlobDriver):
        self.meta = meta
        self.storage = storage

    async def blob(self, repo: str, digest: str, size: int, *, data: bytes | None = None,
                   upload: str | None = None, session: tuple[str, int] | None = None) -> bool:
        """Place a verified blob, from `data` or from the data of `upload` (which stays, to be
        placed again from), and record it in `repo`; with `session` (id, revision seen) its upload
        session closes in the same transaction. False when the session had changed meanwhile."""
        if upload is not None:
            location = self.storage.upload_location(upload, size)
            if location:
                return await self._at_own_location(repo, digest, size, upload, location, session)
        place = partial(self.storage.write, digest, data) if data is not None \
            else partial(self.storage.commit_upload, upload, digest, keep=True, size=size)
        return await place_and_commit(self.meta, self.storage, digest, place,
                                      partial(self.meta.commit_blob, repo, digest, size, session))

    async def _at_own_location(self, repo: str, digest: str, size: int, upload: str, location: str,
                               session: tuple[str, int] | None) -> bool:
        meta, storage = self.meta, self.storage
        intent = await meta.intend(digest, location=location)
        await storage.commit_upload(upload, digest, keep=True, size=size)
        for _ in range(ATTEMPTS):
            try:
                held = await meta.commit_blob_at(repo, digest, size, location, intent, session)
            except BlobBeingCollected:
                # A sweep of an older record of the digest, whose object is another: only wait.
                log.info("blob commit waited for a GC sweep", extra={"digest": digest})
                await _wait_marker_gone(meta, digest)
                continue
            except WriteCollected:
                await storage.delete(digest, location)   # in case GC deleted it before it was complete
                raise Unavailable(f"blob {digest} took longer to commit than garbage collection's grace "
                                  "period; push it again") from None
            if held != location:
                # Another upload's object is the blob (or the session moved on): ours goes, then its note.
                await storage.delete(digest, location)
                await meta.drop_intent(intent)
            return held is not None
        raise Unavailable(f"blob {digest} is being garbage-collected again and again; push it again")

    async def manifest(self, repo: str, digest: str, body: bytes, record: ManifestRecord, tag: str | None,
                       referrer: Referrer | None, events: Sequence[QueuedEvent] = ()) -> bool:
        """Store a manifest's body as a blob and its record (tag, referrer entry); False when a blob or
        manifest it names left the repository before etcd ordered the write."""
        return await place_and_commit(self.meta, self.storage, digest, partial(self.storage.write, digest, body),
                                      partial(self.meta.put_manifest, repo, digest, record, tag, referrer, events))


async def place_and_commit(meta: MetaStore, storage: BlobDriver, digest: str,
                           place: Callable[[], Awaitable[None]], commit: Callable[..., Awaitable[T]]) -> T:
    """Run `place` (write the file) then `commit` (the etcd transaction that records it), which
    takes `intent=` the key of the writer's note when the store needs one (else None)."""
    intent: bytes | None = None
    for _ in range(ATTEMPTS):
        placed_after = meta.applied()
        if not storage.lists_blobs:
            # Again on each attempt: a sweep that claimed the digest deleted the note with the object.
            intent = await meta.intend(digest, intent)
        await place()
        try:
            result = await commit(intent=intent)
        except BlobBeingCollected:
            log.info("blob commit waited for a GC sweep", extra={"digest": digest})
            await _wait_marker_gone(meta, digest)
            continue
        if meta.file_may_be_collected(placed_after) and await storage.exists(digest) is None:
            log.info("blob file placed again after a GC sweep", extra={"digest": digest})
            await place()
        return result
    raise Unavailable(f"blob {digest} is being garbage-collected again and again; push it again")


async def _wait_marker_gone(meta: MetaStore, digest: str) -> None:
    deadline = time.monotonic() + MARKER_WAIT_SECONDS
    backoff = Backoff(0.02, 0.5)
    while time.monotonic() < deadline:
        if not await meta.collecting(digest):
            return
        await backoff.sleep()
    raise Unavailable(f"blob {digest} is still being garbage-collected; push it again")
