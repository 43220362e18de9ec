"""Blob uploads: monolithic, chunked and streamed, resumable on any replica.

An upload session is a record in etcd (repository, acknowledged offset) and a
file in shared storage. The offset in etcd is the truth: bytes past it in the
file were never acknowledged and are cut off before the next append, so a
crash mid-chunk leaves a session that resumes cleanly. A blob becomes visible
only after its digest is verified against the bytes on disk.

Only one request at a time may write to an upload on a replica: a second
one is refused with 416 before it touches the file, so a rejected chunk can
never overwrite an acknowledged one. (Two replicas writing one upload at the
same instant is a client bug that etcd still orders: the loser gets 416 and
the digest check refuses the blob if its bytes were disturbed.)
"""

from __future__ import annotations

import time
from collections import OrderedDict
from contextlib import contextmanager
from collections.abc import AsyncIterator
from dataclasses import dataclass

from moorage.meta.etcd import EtcdUnavailable
from moorage.meta.records import UploadRecord
from moorage.registry import digest as digests
from moorage.registry.errors import (
    BlobUploadInvalid, BlobUploadUnknown, DigestInvalid, MetadataUnavailable, RangeInvalid, TooLarge,
)
from moorage.registry.service import Registry
from moorage.storage.filesystem import UploadDataLost

Body = AsyncIterator[bytes]

# A body up to this size, declared by Content-Length, is verified in memory
# and written straight to its blob file: one trip to the disk thread instead
# of five, which is most of the cost of a small push.
SMALL_BLOB = 1 << 20

# Hash state of uploads this replica is receiving, so closing an upload
# doesn't re-read it. Bounded; a miss (restart, another replica) re-hashes.
MAX_HASHERS = 4096


@dataclass(frozen=True, slots=True)
class Upload:
    id: str
    repo: str
    offset: int


class Uploads:
    def __init__(self, registry: Registry):
        self.registry = registry
        self.meta = registry.meta
        self.storage = registry.storage
        self.limits = registry.limits
        self._hashers: OrderedDict[str, object] = OrderedDict()
        self._writing: set[str] = set()

    @contextmanager
    def _exclusive(self, upload_id: str):
        if upload_id in self._writing:
            raise RangeInvalid("another request is writing to this upload; resume from its offset")
        self._writing.add(upload_id)
        try:
            yield
        finally:
            self._writing.discard(upload_id)

    async def start(self, repo: str) -> Upload:
        upload_id = self.storage.new_upload_id()
        try:
            await self.meta.create_upload(upload_id, repo)
        except EtcdUnavailable as e:
            raise MetadataUnavailable(f"metadata store unavailable, uploads are refused: {e}") from None
        return Upload(upload_id, repo, 0)

    async def _session(self, repo: str, upload_id: str) -> tuple[UploadRecord, int]:
        try:
            found = await self.meta.get_upload(upload_id)
        except EtcdUnavailable as e:
            raise MetadataUnavailable(f"metadata store unavailable: {e}") from None
        if found is None or found[0].repo != repo:
            raise BlobUploadUnknown(f"upload {upload_id} not known in {repo}", {"upload": upload_id})
        return found

    async def status(self, repo: str, upload_id: str) -> Upload:
        record, _ = await self._session(repo, upload_id)
        return Upload(upload_id, repo, record.offset)

    async def append(self, repo: str, upload_id: str, body: Body,
                     start: int | None = None, length: int | None = None) -> Upload:
        """Append a chunk. `start` (from Content-Range) must be the current offset."""
        with self._exclusive(upload_id):
            return await self._append(repo, upload_id, body, start, length)

    async def _append(self, repo: str, upload_id: str, body: Body,
                      start: int | None, length: int | None) -> Upload:
        record, revision = await self._session(repo, upload_id)
        offset = await self._write(upload_id, record.offset, body, start, length)
        if offset != record.offset:
            updated = UploadRecord(repo=repo, offset=offset, created=record.created, updated=time.time())
            try:
                advanced = await self.meta.advance_upload(upload_id, revision, updated)
            except EtcdUnavailable as e:
                self._hashers.pop(upload_id, None)
                raise MetadataUnavailable(f"metadata store unavailable: {e}") from None
            if not advanced:
                self._hashers.pop(upload_id, None)
                raise RangeInvalid("the upload was changed concurrently; resume from its current offset",
                                   {"offset": record.offset})
        return Upload(upload_id, repo, offset)

    async def _write(self, upload_id: str, offset: int, body: Body,
                     start: int | None, length: int | None) -> int:
        if start is not None and start != offset:
            raise RangeInvalid(f"chunk starts at {start}, the upload is at {offset}",
                               {"offset": offset, "start": start})
        if length is not None and offset + length > self.limits.max_blob_bytes:
            raise TooLarge(f"blob over {self.limits.max_blob_bytes} bytes")
        hasher = self._hasher(upload_id, offset)
        try:
            appender = await self.storage.open_upload(upload_id, offset, hasher)
        except UploadDataLost as e:
            raise BlobUploadInvalid(f"{e}; start the upload again") from None
        try:
            async for chunk in body:
                await appender.write(chunk)
                if appender.offset > self.limits.max_blob_bytes:
                    raise TooLarge(f"blob over {self.limits.max_blob_bytes} bytes")
            written = appender.offset - offset
            if length is not None and written != length:
                raise BlobUploadInvalid(f"chunk has {written} bytes, its range says {length}")
            new_offset = await appender.finish()
        except BaseException:
            await appender.abort()
            self._hashers.pop(upload_id, None)
            raise
        if hasher is not None:
            self._hashers[upload_id] = (hasher, new_offset)
        return new_offset

    def _hasher(self, upload_id: str, offset: int):
        """A sha256 hasher positioned at `offset`, or None if we don't hold one."""
        held = self._hashers.pop(upload_id, None)
        if held is not None and held[1] == offset:
            return held[0]
        if offset == 0:
            while len(self._hashers) >= MAX_HASHERS:
                self._hashers.popitem(last=False)
            return digests.new_hasher("sha256")
        return None

    async def finish(self, repo: str, upload_id: str, digest: str, body: Body | None,
                     start: int | None = None, length: int | None = None,
                     size: int | None = None) -> str:
        """Close an upload with an optional last chunk; verify; commit the blob.

        `size` is the body's declared length, when the request declared one.
        """
        with self._exclusive(upload_id):
            return await self._finish(repo, upload_id, digest, body, start, length, size)

    async def _finish(self, repo: str, upload_id: str, digest: str, body: Body | None,
                      start: int | None, length: int | None, size: int | None) -> str:
        algorithm, hexdigest = digests.parse(digest)
        record, revision = await self._session(repo, upload_id)
        offset = record.offset
        if body is not None and offset == 0 and start in (None, 0) and size is not None \
                and size <= SMALL_BLOB:
            data = await _read_all(body)
            if length is not None and len(data) != length:
                raise BlobUploadInvalid(f"chunk has {len(data)} bytes, its range says {length}")
            try:
                return await self._store_small(repo, digest, data, (upload_id, revision))
            except DigestInvalid:
                await self._close(upload_id)
                raise
        if body is not None:
            offset = await self._write(upload_id, offset, body, start, length)
        held = self._hashers.pop(upload_id, None)
        if algorithm == "sha256" and held is not None and held[1] == offset:
            actual = held[0].hexdigest()
        else:
            actual = await self.storage.hash_upload(upload_id, algorithm, offset)
        if actual != hexdigest:
            # Nothing was committed; the session is closed and its data dropped.
            await self._close(upload_id)
            raise DigestInvalid("uploaded content does not match the digest",
                                {"expected": digest, "actual": f"{algorithm}:{actual}"})
        await self.storage.commit_upload(upload_id, digest)
        try:
            committed = await self.meta.commit_blob(repo, digest, offset, (upload_id, revision))
        except EtcdUnavailable as e:
            raise MetadataUnavailable(f"metadata store unavailable: {e}") from None
        if not committed:
            raise BlobUploadUnknown(f"upload {upload_id} was closed concurrently")
        return digest

    async def _store_small(self, repo: str, digest: str, data: bytes,
                           upload: tuple[str, int] | None) -> str:
        algorithm, hexdigest = digests.parse(digest)
        actual = digests.new_hasher(algorithm)
        actual.update(data)
        if actual.hexdigest() != hexdigest:
            raise DigestInvalid("uploaded content does not match the digest",
                                {"expected": digest, "actual": f"{algorithm}:{actual.hexdigest()}"})
        await self.storage.write(digest, data)
        try:
            committed = await self.meta.commit_blob(repo, digest, len(data), upload)
        except EtcdUnavailable as e:
            raise MetadataUnavailable(f"metadata store unavailable: {e}") from None
        if not committed:
            raise BlobUploadUnknown(f"upload {upload[0] if upload else ''} was closed concurrently")
        return digest

    async def monolithic(self, repo: str, digest: str, body: Body, length: int | None) -> str:
        """A whole blob in one request: no session is recorded at all."""
        algorithm, hexdigest = digests.parse(digest)
        if length is not None and length <= SMALL_BLOB:
            return await self._store_small(repo, digest, await _read_all(body), None)
        upload_id = self.storage.new_upload_id()
        hasher = digests.new_hasher(algorithm)
        if length is not None and length > self.limits.max_blob_bytes:
            raise TooLarge(f"blob over {self.limits.max_blob_bytes} bytes")
        appender = await self.storage.open_upload(upload_id, 0, hasher)
        try:
            async for chunk in body:
                await appender.write(chunk)
                if appender.offset > self.limits.max_blob_bytes:
                    raise TooLarge(f"blob over {self.limits.max_blob_bytes} bytes")
            size = await appender.finish()
            if hasher.hexdigest() != hexdigest:
                raise DigestInvalid("uploaded content does not match the digest",
                                    {"expected": digest, "actual": f"{algorithm}:{hasher.hexdigest()}"})
            await self.storage.commit_upload(upload_id, digest)
        except BaseException:
            await appender.abort()
            await self.storage.delete_upload(upload_id)
            raise
        try:
            await self.meta.commit_blob(repo, digest, size)
        except EtcdUnavailable as e:
            raise MetadataUnavailable(f"metadata store unavailable: {e}") from None
        return digest

    async def cancel(self, repo: str, upload_id: str) -> None:
        await self._session(repo, upload_id)
        await self._close(upload_id)

    async def _close(self, upload_id: str) -> None:
        self._hashers.pop(upload_id, None)
        try:
            await self.meta.delete_upload(upload_id)
        except EtcdUnavailable as e:
            raise MetadataUnavailable(f"metadata store unavailable: {e}") from None
        await self.storage.delete_upload(upload_id)


async def _read_all(body: Body) -> bytes:
    """A body already known to be small (Content-Length checked by the caller)."""
    data = bytearray()
    async for chunk in body:
        data += chunk
    return bytes(data)
