"""Metadata writes: each change is one etcd transaction.

Preconditions travel inside the transaction as comparisons (a manifest's
blobs are still linked, an upload has not moved on), so two replicas racing
each other, or a push racing a delete, are ordered by etcd and one of them
wins cleanly. A write is acknowledged only after this replica's index has
applied it, so the writer's next read sees it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from moorage.meta import keys
from moorage.meta.etcd import (
    EtcdClient, TxnResult, cmp_absent, cmp_exists, cmp_mod_revision, cmp_value, op_delete, op_put,
    op_txn,
)
from moorage.meta.index import Index
from moorage.meta.records import BlobRecord, ManifestRecord, Referrer, UploadRecord, decoder, encode

_upload = decoder(UploadRecord)


class MetaStore:
    def __init__(self, client: EtcdClient, index: Index):
        self.client = client
        self.index = index

    async def _txn(self, compare=(), success=(), failure=()) -> TxnResult:
        result = await self.client.txn(compare, success, failure)
        await self.index.wait_applied(result.revision)
        return result

    # -- uploads -----------------------------------------------------------

    async def create_upload(self, upload_id: str, repo: str) -> None:
        now = time.time()
        record = UploadRecord(repo=repo, offset=0, created=now, updated=now)
        await self.client.txn([cmp_absent(keys.upload(upload_id))],
                              [op_put(keys.upload(upload_id), encode(record))])

    async def get_upload(self, upload_id: str) -> tuple[UploadRecord, int] | None:
        kv = await self.client.get(keys.upload(upload_id))
        return (_upload.decode(kv.value), kv.mod_revision) if kv else None

    async def advance_upload(self, upload_id: str, seen_revision: int, record: UploadRecord) -> bool:
        """Record a new offset, unless someone else moved the upload since we read it."""
        key = keys.upload(upload_id)
        result = await self.client.txn([cmp_mod_revision(key, seen_revision)],
                                       [op_put(key, encode(record))])
        return result.succeeded

    async def delete_upload(self, upload_id: str) -> bool:
        key = keys.upload(upload_id)
        result = await self.client.txn([cmp_exists(key)], [op_delete(key)])
        return result.succeeded

    # -- blobs -------------------------------------------------------------

    async def commit_blob(self, repo: str, digest: str, size: int,
                          upload: tuple[str, int] | None = None) -> bool:
        """Record a verified blob and link it into `repo`, closing its upload.

        With `upload` (id, revision seen), nothing happens unless the upload
        is still exactly as we last saw it: a blob is committed once.
        """
        compare, ops = [], [
            op_put(keys.blob(digest), encode(BlobRecord(size=size, created=time.time()))),
            op_put(keys.repo_blob(repo, digest), b""),
        ]
        if upload is not None:
            compare.append(cmp_mod_revision(keys.upload(upload[0]), upload[1]))
            ops.append(op_delete(keys.upload(upload[0])))
        return (await self._txn(compare, ops)).succeeded

    async def mount_blob(self, repo: str, source: str, digest: str) -> bool:
        result = await self._txn(
            [cmp_exists(keys.repo_blob(source, digest)), cmp_exists(keys.blob(digest))],
            [op_put(keys.repo_blob(repo, digest), b"")])
        return result.succeeded

    async def unlink_blob(self, repo: str, digest: str) -> bool:
        key = keys.repo_blob(repo, digest)
        return (await self._txn([cmp_exists(key)], [op_delete(key)])).succeeded

    # -- manifests and tags --------------------------------------------------

    async def put_manifest(self, repo: str, digest: str, record: ManifestRecord,
                           tag: str | None, referrer: Referrer | None) -> bool:
        """Store a manifest record (and tag, and referrer entry) atomically.

        Fails, changing nothing, when a blob or child manifest it references
        is no longer in the repository by the time etcd orders the write.
        """
        compare = [cmp_exists(keys.repo_blob(repo, d)) for d in set(record.blobs)]
        compare += [cmp_exists(keys.manifest(repo, d)) for d in set(record.children)]
        ops = [
            op_put(keys.blob(digest), encode(BlobRecord(size=record.size, created=record.created))),
            op_put(keys.manifest(repo, digest), encode(record)),
        ]
        if tag is not None:
            ops.append(op_put(keys.tag(repo, tag), digest.encode()))
        if referrer is not None and record.subject:
            ops.append(op_put(keys.referrer(repo, record.subject, digest), encode(referrer)))
        return (await self._txn(compare, ops)).succeeded

    async def delete_manifest(self, repo: str, digest: str, record: ManifestRecord,
                              tags: Iterable[str]) -> bool:
        """Delete a manifest, the tags that name it and its referrer entry.

        Each tag goes only if it still names this manifest when etcd orders
        the delete: a tag moved elsewhere meanwhile stays.
        """
        key = keys.manifest(repo, digest)
        ops = [op_delete(key)]
        ops += [op_txn([cmp_value(keys.tag(repo, t), digest.encode())], [op_delete(keys.tag(repo, t))])
                for t in tags]
        if record.subject:
            ops.append(op_delete(keys.referrer(repo, record.subject, digest)))
        return (await self._txn([cmp_exists(key)], ops)).succeeded

    async def delete_tag(self, repo: str, tag: str) -> bool:
        key = keys.tag(repo, tag)
        return (await self._txn([cmp_exists(key)], [op_delete(key)])).succeeded
