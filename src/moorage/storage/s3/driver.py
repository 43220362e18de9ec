"""S3Driver: the BlobDriver (storage/base.py) on a bucket, over the client and upload sessions.

What the layers above see of S3. A blob lives where its record says: at its
content address (`blobs/<algorithm>/<2 hex>/<hex>`: manifests, small blobs)
or at the key its upload session completed in place (`blobs/u/<upload id>`,
the record's `location`); either way it is found through etcd, never by
listing. Upload sessions are uploads.py's; files beside the blobs (the audit
log, the join proof) are objects under their own names; GC lists only
`uploads/` and the multipart uploads in progress under `blobs/`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Sequence

from moorage import digest as digests
from moorage.storage.base import checked_name
from moorage.storage.errors import ObjectMissing, StorageMisconfigured
from moorage.storage.s3.client import S3Client
from moorage.storage.s3.config import S3Config
from moorage.storage.s3.multipart import Multipart
from moorage.storage.s3.uploads import PartAppender, UploadSessions, session_of, upload_of


class S3Driver:
    """Blobs and upload sessions in one bucket, under one prefix.

    Use as `async with S3Driver(config) as driver:`, or `await open()` /
    `await close()`; the client (its connection pool) lives in between.
    """

    name = "s3"
    lists_blobs = False   # GC never lists blobs/: writers note each write in etcd first (registry/placement.py)

    def __init__(self, config: S3Config):
        self.config = config
        self.client = S3Client(config)
        self.multipart = Multipart(self.client)
        self.uploads = UploadSessions(self.client, self.multipart)

    # -- life ------------------------------------------------------------------

    async def open(self) -> "S3Driver":
        await self.client.open()
        return self

    async def close(self) -> None:
        await self.client.close()

    async def __aenter__(self) -> "S3Driver":
        return await self.open()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def probe(self) -> None:
        """Write, read back and delete a small object: what a replica must be able
        to do before it serves. Raises StorageMisconfigured or StorageUnavailable
        with the one sentence an operator needs."""
        c = self.client
        key = f"{self.config.prefix}probe/{uuid.uuid4().hex}"
        data = os.urandom(64)
        await c.put_key(key, data)
        try:
            if await c.read_key(key) != data:
                raise StorageMisconfigured(f"{self.config.where} returned other bytes than were written "
                                           f"to {c.relative(key)}")
        finally:
            await c.delete_keys([key])
        if await c.head_key(key) is not None:
            raise StorageMisconfigured(f"{self.config.where} still has {c.relative(key)} after deleting it")

    # -- blobs by digest -----------------------------------------------------------

    def blob_key(self, digest: str) -> str:
        algorithm, hexdigest = digests.parse(digest)  # a ValueError (DigestError) for anything else
        return f"{self.config.prefix}blobs/{algorithm}/{hexdigest[:2]}/{hexdigest}"

    def key(self, digest: str, location: str = "") -> str:
        """The blob's object: its record's location, else its content address."""
        if location:
            return self.uploads.location_key(upload_of(location))
        return self.blob_key(digest)

    def local_path(self, digest: str, location: str = "") -> None:
        return None

    async def exists(self, digest: str, location: str = "") -> int | None:
        return await self.client.head_key(self.key(digest, location))

    async def write(self, digest: str, data: bytes | bytearray | memoryview) -> None:
        """Store a blob whose digest the caller has verified. Same digest, same
        bytes: a concurrent twin overwriting it is harmless."""
        await self.client.put_key(self.blob_key(digest), data)

    async def read(self, digest: str, location: str = "") -> bytes:
        return await self.client.read_key(self.key(digest, location))

    def stream(self, digest: str, start: int = 0, end: int | None = None,
               location: str = "") -> AsyncIterator[bytes]:
        return self.client.stream_key(self.key(digest, location), start, end)

    async def delete(self, digest: str, location: str = "") -> None:
        await self.client.delete_keys([self.key(digest, location)])

    async def delete_many(self, blobs: Sequence[tuple[str, str]]) -> None:
        await self.client.delete_keys([self.key(d, location) for d, location in blobs])

    async def presign(self, digest: str, seconds: int | None = None, location: str = "") -> str:
        return await self.client.presign_key(self.key(digest, location), seconds)

    async def redirect_url(self, digest: str, location: str = "") -> str | None:
        return await self.presign(digest, location=location)

    # -- uploads (uploads.py) ------------------------------------------------------------

    def new_upload_id(self) -> str:
        return uuid.uuid4().hex

    async def open_upload(self, upload_id: str, offset: int, hasher=None) -> PartAppender:
        return await self.uploads.open(upload_id, offset, hasher)

    async def hash_upload(self, upload_id: str, algorithm: str, length: int) -> str:
        return await self.uploads.hash(upload_id, algorithm, length)

    def upload_location(self, upload_id: str, size: int) -> str:
        return self.uploads.location_for(upload_id, size)

    async def commit_upload(self, upload_id: str, digest: str, keep: bool = False, size: int = 0) -> str:
        """Make bytes [0, size) of the upload the blob `digest` (verified by the caller): its
        multipart upload completed in place, or (under 5 MiB) its tail at the content address.
        The session's states stay (`keep` or not) until `delete_upload`."""
        return await self.uploads.commit(upload_id, size, lambda: self.blob_key(digest))

    async def delete_upload(self, upload_id: str, unrecorded: bool = False) -> None:
        await self.uploads.delete(upload_id, unrecorded)

    # -- the join proof: an object under cluster/ ----------------------------------------

    @staticmethod
    def _proof_name(name: str) -> str:
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"bad proof name {name[:40]!r}")
        return f"cluster/{name}"

    async def write_proof(self, name: str, data: bytes) -> None:
        await self.put_file(self._proof_name(name), data)

    async def read_proof(self, name: str) -> bytes | None:
        return await self.read_file(self._proof_name(name))

    # -- files beside the blobs (the audit log) ----------------------------------------------

    def _file_key(self, name: str) -> str:
        return self.config.prefix + checked_name(name)

    async def put_file(self, name: str, data: bytes) -> None:
        await self.client.put_key(self._file_key(name), data)

    async def read_file(self, name: str) -> bytes | None:
        try:
            return await self.client.read_key(self._file_key(name))
        except ObjectMissing:
            return None

    async def list_files(self, prefix: str) -> list[str]:
        return await self.client.list_level(checked_name(prefix), dirs=False)

    async def list_dirs(self, prefix: str) -> list[str]:
        return await self.client.list_level(checked_name(prefix), dirs=True)

    async def delete_files(self, names: list[str]) -> None:
        await self.client.delete_keys([self._file_key(n) for n in names])

    # -- garbage collection ----------------------------------------------------------------

    async def blob_files(self) -> list[tuple[str, int, float]]:
        """Nothing: blobs are found through etcd, never by listing blobs/ (which grows with
        the registry; GC must not take days on object storage)."""
        return []

    async def upload_files(self) -> list[tuple[str, int, float]]:
        return await self.uploads.listing()

    async def tmp_files(self) -> list[tuple[str, int, float, str]]:
        """Multipart uploads in progress (ListMultipartUploads lists those, not objects): upload
        sessions' under blobs/u/<upload id>, and any a retried start or a crash left behind."""
        out = []
        for u in await self.multipart.list_uploads("blobs/"):
            key = self.client.relative(u.key)
            out.append((f"{key}?{u.s3_upload_id}", 0, u.initiated, session_of(key)))
        return out

    async def delete_tmp(self, name: str) -> None:
        key, _, s3id = name.partition("?")
        if key.startswith("blobs/") and s3id:
            await self.multipart.abort_upload("", s3id, key=self.config.prefix + key)

    async def clock_offset(self) -> float:
        return await self.client.clock_offset()
