"""Upload sessions on S3: pieces any replica appends to, assembled into a blob at commit.

An upload session's bytes are pieces under uploads/<id>/<offset>: each
request appends pieces of up to one part (`part_size`, the memory an upload
in flight holds), written as it receives them, and nothing about the session
lives in a replica: the next request, on any replica, lists the pieces (a
short prefix) and goes on from the acknowledged offset. Pieces past that
offset were never acknowledged (a request that broke off); the chain from 0
is followed only up to the offset, and a later request at that offset
overwrites the first of them. Committing assembles the pieces at the blob's
content address with server-side copies (UploadPartCopy; no byte through the
replica) and reads back only pieces too small to be parts.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from moorage import digest as digests
from moorage.storage.base import is_upload_id
from moorage.storage.errors import UploadDataLost
from moorage.storage.s3.client import S3Client, StoredObject
from moorage.storage.s3.config import MIN_PART
from moorage.storage.s3.multipart import Multipart, Part

COMMIT_CONCURRENCY = 4      # parts copied at once while assembling a blob


def checked(upload_id: str) -> str:
    if not is_upload_id(upload_id):
        raise ValueError(f"bad upload id {upload_id[:40]!r}")
    return upload_id


class UploadSessions:
    """The upload sessions of one bucket and prefix."""

    def __init__(self, client: S3Client, multipart: Multipart):
        self.client = client
        self.multipart = multipart
        self.config = client.config

    def tail_key(self, upload_id: str, offset: int) -> str:
        # Fixed-width hex, so a listing returns a session's pieces in offset order.
        return f"{self.config.prefix}uploads/{checked(upload_id)}/{offset:016x}"

    async def _pieces(self, upload_id: str) -> dict[int, StoredObject]:
        found: dict[int, StoredObject] = {}
        for o in await self.client.list_keys(f"uploads/{checked(upload_id)}/"):
            try:
                found[int(o.key.rsplit("/", 1)[-1], 16)] = o
            except ValueError:
                continue
        return found

    async def _chain(self, upload_id: str, length: int) -> list[tuple[str, int]]:
        """(key, size) of the pieces holding bytes [0, length); UploadDataLost when they don't."""
        if length == 0:
            return []
        pieces, chain, pos = await self._pieces(upload_id), [], 0
        while pos < length:
            piece = pieces.get(pos)
            if piece is None or piece.size == 0 or pos + piece.size > length:
                raise UploadDataLost(f"the object store ({self.config.where}) holds {pos} bytes of upload "
                                     f"{upload_id}, which was at {length}")
            chain.append((self.config.prefix + piece.key, piece.size))
            pos += piece.size
        return chain

    async def open(self, upload_id: str, offset: int, hasher=None) -> "PieceAppender":
        if offset:
            await self._chain(upload_id, offset)   # the acknowledged bytes are all there
        return PieceAppender(self, upload_id, offset, hasher)

    async def _stream_chain(self, chain: list[tuple[str, int]]) -> AsyncIterator[bytes]:
        for key, _ in chain:
            async for data in self.client.stream_key(key):
                yield data

    async def hash(self, upload_id: str, algorithm: str, length: int) -> str:
        h = digests.new_hasher(algorithm)
        async for data in self._stream_chain(await self._chain(upload_id, length)):
            h.update(data)
        return h.hexdigest()

    async def commit(self, upload_id: str, target: str, size: int) -> None:
        """Make bytes [0, size) of the upload the object `target` (the blob's key).

        The pieces stay until `delete`: the blob is a copy, and placing it
        again after a GC sweep copies again.
        """
        chain = await self._chain(upload_id, size)
        if not chain:
            await self.client.put_key(target, b"")
        elif len(chain) == 1:
            await self.client.copy_key(chain[0][0], target)
        elif size < MIN_PART:
            await self.client.put_key(target, b"".join([d async for d in self._stream_chain(chain)]))
        else:
            await self._assemble(upload_id, chain, target)

    async def _assemble(self, upload_id: str, chain: list[tuple[str, int]], target: str) -> None:
        # Parts: a piece of at least MIN_PART on its own is copied by the store;
        # smaller ones are read back and joined until they make a part.
        groups: list[list[tuple[str, int]]] = []
        current: list[tuple[str, int]] = []
        for key, size in chain:
            if not current and size >= MIN_PART:
                groups.append([(key, size)])
                continue
            current.append((key, size))
            if sum(s for _, s in current) >= MIN_PART:
                groups.append(current)
                current = []
        if current:
            groups.append(current)
        mp = self.multipart
        s3id = await mp.create_upload(upload_id, key=target)
        limit = asyncio.Semaphore(COMMIT_CONCURRENCY)

        async def part(number: int, group: list[tuple[str, int]]) -> Part:
            async with limit:
                if len(group) == 1:
                    return await mp.copy_part(upload_id, s3id, number, group[0][0], 0, group[0][1], key=target)
                data = b"".join([d async for d in self._stream_chain(group)])
                return await mp.upload_part(upload_id, s3id, number, data, key=target)
        try:
            try:
                # A failed part cancels the others: none is left running against an aborted upload.
                async with asyncio.TaskGroup() as group:
                    tasks = [group.create_task(part(n, g)) for n, g in enumerate(groups, 1)]
            except BaseExceptionGroup as e:
                raise e.exceptions[0] from None
            await mp.complete_upload(upload_id, s3id, [t.result() for t in tasks], key=target)
        except BaseException:
            await asyncio.shield(mp.abort_upload(upload_id, s3id, key=target))
            raise

    async def delete(self, upload_id: str) -> None:
        try:
            pieces = await self._pieces(upload_id)
        except ValueError:
            return
        await self.client.delete_keys([self.config.prefix + o.key for o in pieces.values()])

    async def listing(self) -> list[tuple[str, int, float]]:
        """(upload id, bytes, newest piece's time) of every session with pieces (uploads/ only)."""
        sessions: dict[str, tuple[int, float]] = {}
        for o in await self.client.list_keys("uploads/"):
            parts = o.key.split("/")
            if len(parts) == 3 and is_upload_id(parts[1]):
                size, stamp = sessions.get(parts[1], (0, 0.0))
                sessions[parts[1]] = (size + o.size, max(stamp, o.modified))
        return [(uid, size, stamp) for uid, (size, stamp) in sessions.items()]


class PieceAppender:
    """Appends to an upload session as pieces of up to one part, hashing on the way.

    A full piece goes out while the next one fills (one request in flight):
    receiving and sending overlap, and an upload holds at most two pieces.
    """

    def __init__(self, sessions: UploadSessions, upload_id: str, offset: int, hasher=None):
        self.sessions = sessions
        self.upload_id = upload_id
        self.offset = offset
        self._written = offset
        self._buffer = bytearray()
        self._hasher = hasher
        self._sending: asyncio.Task | None = None

    async def write(self, chunk: bytes) -> None:
        if self._hasher is not None:
            self._hasher.update(chunk)
        self._buffer += chunk
        self.offset += len(chunk)
        if len(self._buffer) >= self.sessions.config.part_size:
            await self._flush()

    async def _flush(self) -> None:
        await self._sent()
        if self._buffer:
            data, self._buffer = self._buffer, bytearray()
            key = self.sessions.tail_key(self.upload_id, self._written)
            self._written += len(data)
            self._sending = asyncio.create_task(self.sessions.client.put_key(key, data))

    async def _sent(self) -> None:
        sending, self._sending = self._sending, None
        if sending is not None:
            await sending

    async def finish(self) -> int:
        await self._flush()
        await self._sent()
        return self.offset

    async def abort(self) -> None:
        self._buffer = bytearray()
        if self._sending is not None:
            self._sending.cancel()
            try:
                await self._sent()
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the request is failing already
                pass
