"""What repositories hold: manifests, tags, blobs, referrers, and the catalog of them.

Reads come from the replica's index after one shared `sync()`; writes are
metadata transactions whose preconditions etcd checks (MetaStore), a
manifest's body placed as a blob first (Placement). Nothing here knows
HTTP: the api layer turns results and RegistryErrors into responses.
"""

from __future__ import annotations

import bisect
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from moorage.meta.index import Repo
from moorage.meta.records import BlobRecord, ManifestRecord, Referrer
from moorage.meta.store import MetaStore
from moorage import digest as digests
from moorage.registry import manifests
from moorage.registry.errors import BlobUnknown, DigestInvalid, ManifestBlobUnknown, ManifestUnknown, NameUnknown, TooLarge
from moorage.registry.limits import Limits
from moorage.registry.names import check_digest, check_tag, is_valid_tag
from moorage.registry.placement import Placement
from moorage.registry.webhooks import Notifier, RequestInfo
from moorage.storage.base import BlobDriver


@dataclass(frozen=True, slots=True)
class BlobBody:
    """A stored blob's bytes as the api sends them: its local file when the driver
    keeps one (sendfile, a memory map), else the driver's stream."""

    digest: str
    size: int
    path: Path | None
    chunks: Callable[[int, int | None], AsyncIterator[bytes]]   # (start, end) -> the bytes [start, end)
    url: str | None = None   # where the client fetches it itself (an object store's presigned URL)


class BodyCache:
    """Manifest bodies by digest, bounded in bytes, least recently used out.

    Manifests are immutable, so a cached body never goes stale.
    """

    def __init__(self, max_bytes: int = 64 << 20):
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._max = max_bytes

    def get(self, digest: str) -> bytes | None:
        body = self._items.get(digest)
        if body is not None:
            self._items.move_to_end(digest)
        return body

    def put(self, digest: str, body: bytes) -> None:
        if len(body) > self._max // 8 or digest in self._items:
            return
        self._items[digest] = body
        self._bytes += len(body)
        while self._bytes > self._max:
            _, old = self._items.popitem(last=False)
            self._bytes -= len(old)


def page(items: list[str], n: int | None, last: str | None, max_page: int) -> tuple[list[str], bool]:
    """Lexically sorted `items` after `last`, at most `n`; and whether more remain."""
    start = bisect.bisect_right(items, last) if last else 0
    limit = max_page if n is None else min(n, max_page)
    chosen = items[start:start + limit]
    return chosen, start + len(chosen) < len(items)


class Repositories:
    def __init__(self, meta: MetaStore, storage: BlobDriver, placement: Placement, limits: Limits,
                 notifier: Notifier | None = None):
        # The cluster setting storage.redirect (kept current by api/server.py).
        self.redirect = True
        self.meta = meta
        self.notifier = notifier  # webhook events (registry/webhooks.py); None: none are sent
        self.index = meta.index
        self.storage = storage
        self.placement = placement
        self.limits = limits
        self.bodies = BodyCache()

    # -- reads ---------------------------------------------------------------

    async def _repo(self, name: str) -> Repo | None:
        await self.index.sync()
        return self.index.repos.get(name)

    async def manifest(self, repo_name: str, reference: str) -> tuple[str, ManifestRecord]:
        repo = await self._repo(repo_name)
        if digests.is_digest(reference):
            check_digest(reference)
            digest = reference
        else:
            # A tag that could never exist is simply not found (the spec and
            # its conformance suite want 404 here; only a PUT is malformed).
            digest = repo.tags.get(reference) if repo and is_valid_tag(reference) else None
        record = repo.manifests.get(digest) if repo and digest else None
        if record is None:
            raise ManifestUnknown(f"manifest {reference} not found in {repo_name}",
                                  {"name": repo_name, "reference": reference})
        return digest, record

    def pulled(self, repo_name: str, reference: str, digest: str, record: ManifestRecord,
               request: RequestInfo | None) -> None:
        """A manifest GET answered: an event for the endpoints that want pulls (none: nothing at all)."""
        notifier = self.notifier
        if notifier is not None and notifier.store.pulls:
            notifier.pulled(repo_name, digest, record.media_type, record.size,
                            None if digests.is_digest(reference) else reference, request)

    def _location(self, digest: str) -> str:
        """Where the storage keeps the blob, as its record says ("": its content address)."""
        record = self.index.blobs.get(digest)
        return record.location if record is not None else ""

    async def manifest_body(self, digest: str) -> bytes:
        body = self.bodies.get(digest)
        if body is None:
            body = await self.storage.read(digest, self._location(digest))
            self.bodies.put(digest, body)
        return body

    async def small_blob(self, digest: str, max_bytes: int) -> bytes | None:
        """A small blob's bytes (an image's configuration, to show); None when unknown or larger."""
        record = self.index.blobs.get(digest)
        if record is None or record.size > max_bytes:
            return None
        return await self.storage.read(digest, record.location)

    async def blob(self, repo_name: str, digest: str) -> BlobRecord:
        check_digest(digest)
        repo = await self._repo(repo_name)
        record = self.index.blobs.get(digest) if repo and digest in repo.blobs else None
        if record is None:
            raise BlobUnknown(f"blob {digest} not found in {repo_name}", {"digest": digest})
        return record

    async def blob_body(self, digest: str, size: int | None = None) -> BlobBody:
        """The stored bytes of a recorded blob (of `size`, as recorded); BlobUnknown when its data
        is missing. On an object store with redirects on, a presigned URL instead: signed here,
        without a request to the store (a missing object is then the store's 404)."""
        location = self._location(digest)
        chunks = partial(self.storage.stream, digest, location=location)
        if self.redirect and size is not None:
            url = await self.storage.redirect_url(digest, location)
            if url is not None:
                return BlobBody(digest, size, None, chunks, url)
        size = await self.storage.exists(digest, location)
        if size is None:
            raise BlobUnknown(f"blob {digest} is recorded but its data is missing", {"digest": digest})
        return BlobBody(digest, size, self.storage.local_path(digest, location), chunks)

    async def tags(self, repo_name: str, n: int | None, last: str | None) -> tuple[list[str], bool]:
        repo = await self._repo(repo_name)
        if repo is None:
            raise NameUnknown(f"repository {repo_name} not known", {"name": repo_name})
        return page(repo.sorted_tags(), n, last, self.limits.max_page)

    async def catalog(self, n: int | None, last: str | None,
                      visible: Callable[[str], bool] | None = None) -> tuple[list[str], bool]:
        """A page of repository names; `visible` filters before paging, so pages stay full."""
        await self.index.sync()
        repos = self.index.sorted_repos()
        if visible is not None:
            repos = [r for r in repos if visible(r)]
        return page(repos, n, last, self.limits.max_page)

    async def referrers(self, repo_name: str, digest: str, artifact_type: str | None
                        ) -> list[Referrer]:
        check_digest(digest)
        repo = await self._repo(repo_name)
        found = list(repo.referrers.get(digest, {}).values()) if repo else []
        if artifact_type is not None:
            found = [r for r in found if r.artifact_type == artifact_type]
        return sorted(found, key=lambda r: r.digest)

    # -- writes --------------------------------------------------------------

    async def put_manifest(self, repo_name: str, reference: str, content_type: str | None,
                           body: bytes, pushed_by: str | None = None,
                           request: RequestInfo | None = None) -> tuple[str, str | None]:
        """Validate and store a manifest pushed by `pushed_by`; returns its digest and subject.
        The webhook events of the push (`request`: what they say of it) are stored with it."""
        if len(body) > self.limits.max_manifest_bytes:
            raise TooLarge(f"manifest over {self.limits.max_manifest_bytes} bytes",
                           {"size": len(body), "limit": self.limits.max_manifest_bytes})
        tag = None
        if digests.is_digest(reference):
            algorithm, _ = check_digest(reference)
            digest = digests.of(body, algorithm)
            if digest != reference:
                raise DigestInvalid("manifest body does not match its digest",
                                    {"expected": reference, "actual": digest})
        else:
            tag = check_tag(reference)
            digest = digests.of(body)
        parsed = manifests.parse(body, content_type)
        record = ManifestRecord(
            media_type=parsed.media_type, size=len(body), created=time.time(),
            blobs=parsed.blobs, children=parsed.children, subject=parsed.subject,
            artifact_type=parsed.artifact_type, annotations=parsed.annotations, pushed_by=pushed_by)
        await self._check_references(repo_name, record)
        self.bodies.put(digest, body)
        events = self.notifier.pushed(repo_name, digest, parsed.media_type, len(body), tag, request) \
            if self.notifier is not None else []
        if not await self.placement.manifest(repo_name, digest, body, record, tag, parsed.referrer(digest, len(body)),
                                             events):
            # A reference vanished between our check and etcd's: say which.
            await self._check_references(repo_name, record)
            raise ManifestBlobUnknown("a referenced blob was deleted while the manifest was pushed")
        return digest, parsed.subject

    async def _check_references(self, repo_name: str, record: ManifestRecord) -> None:
        repo = await self._repo(repo_name)
        linked = repo.blobs if repo else set()
        known = repo.manifests if repo else {}
        missing = [d for d in record.blobs if d not in linked]
        missing += [d for d in record.children if d not in known]
        if missing:
            raise ManifestBlobUnknown(f"manifest references {len(missing)} unknown blob(s) or manifest(s)",
                                      {"digests": missing[:20]})

    async def delete_manifest(self, repo_name: str, reference: str, request: RequestInfo | None = None) -> None:
        notifier = self.notifier
        if not digests.is_digest(reference):
            events = notifier.deleted(repo_name, None, reference, request) if notifier is not None else []
            if not is_valid_tag(reference) or not await self.meta.delete_tag(repo_name, reference, events):
                raise ManifestUnknown(f"tag {reference} not found in {repo_name}",
                                      {"name": repo_name, "reference": reference})
            return
        digest, record = await self.manifest(repo_name, reference)
        repo = self.index.repos.get(repo_name)
        tags = [t for t, d in repo.tags.items() if d == digest] if repo else []
        events = notifier.deleted(repo_name, digest, None, request) if notifier is not None else []
        if not await self.meta.delete_manifest(repo_name, digest, record, tags, events):
            raise ManifestUnknown(f"manifest {reference} not found in {repo_name}")

    async def delete_blob(self, repo_name: str, digest: str) -> None:
        check_digest(digest)
        if not await self.meta.unlink_blob(repo_name, digest):
            raise BlobUnknown(f"blob {digest} not found in {repo_name}", {"digest": digest})

    async def mount(self, repo_name: str, digest: str, source: str) -> bool:
        """Link a blob from another repository; False when it is not there."""
        repo = await self._repo(source)
        if repo is None or digest not in repo.blobs:
            return False
        return await self.meta.mount_blob(repo_name, source, digest)
