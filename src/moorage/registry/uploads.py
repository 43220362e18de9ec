"""Blob uploads: monolithic, chunked and streamed, resumable on any replica.

An upload's data is a file in shared storage; where it stands is its session
(`sessions.py`). The acknowledged offset is the truth: bytes past it in the
file were never acknowledged and are cut off before the next append, so a
crash mid-chunk leaves a session that resumes cleanly. (A chunk's offset is
recorded while its last bytes are written, `append`: a crash in those few
milliseconds leaves the record ahead of the file, and the next append says
to start the upload again.) A blob becomes visible only after its digest is
verified against the bytes received.

Only one request at a time may write to an upload on a replica: a second
one is refused with 416 before it touches the file, so a rejected chunk can
never overwrite an acknowledged one. (Two replicas writing one upload at the
same instant is a client bug that etcd still orders: the loser gets 416 and
the digest check refuses the blob if its bytes were disturbed.)
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import contextmanager

from moorage import digest as digests
from moorage.meta.errors import MetadataUnavailable
from moorage.cluster.upload_locks import WriterLocks
from moorage.metrics import Metrics
from moorage.registry.errors import BlobUploadInvalid, DigestInvalid, RangeInvalid, TooLarge
from moorage.registry.limits import Limits
from moorage.registry.names import check_digest
from moorage.registry.placement import Placement
from moorage.registry.sessions import Session, Sessions
from moorage.storage.base import BlobDriver
from moorage.storage.errors import UploadDataLost

Body = AsyncIterator[bytes]

# A body up to this size, declared by Content-Length, is verified in memory
# and written straight to its blob file: one trip to the disk thread instead
# of five, which is most of the cost of a small push.
SMALL_BLOB = 1 << 20

# Hash state of uploads this replica is receiving, so closing an upload
# doesn't re-read it. Bounded; a miss (restart, another replica) re-hashes.
MAX_HASHERS = 4096


class Uploads:
    def __init__(self, storage: BlobDriver, sessions: Sessions, placement: Placement, limits: Limits,
                 writers: WriterLocks | None = None, metrics: Metrics | None = None):
        """`writers`: with worker processes, the lock that keeps one writer per upload across them."""
        self.storage = storage
        self.writers = writers
        self.metrics = metrics
        self.sessions = sessions
        self.placement = placement
        self.limits = limits
        self._hashers: OrderedDict[str, tuple[object, int]] = OrderedDict()
        self._writing: set[str] = set()

    @contextmanager
    def _exclusive(self, upload_id: str):
        if upload_id in self._writing or (self.writers is not None and not self.writers.acquire(upload_id)):
            raise RangeInvalid("another request is writing to this upload; resume from its offset")
        self._writing.add(upload_id)
        try:
            with self._receiving():
                yield
        finally:
            self._writing.discard(upload_id)
            if self.writers is not None:
                self.writers.release(upload_id)

    @contextmanager
    def _receiving(self):
        """An upload request in progress on this replica (moorage_uploads_in_progress)."""
        if self.metrics is None:
            yield
            return
        self.metrics.uploads_in_progress.inc()
        try:
            yield
        finally:
            self.metrics.uploads_in_progress.dec()

    def _received(self, size: int) -> None:
        if self.metrics is not None and size > 0:
            self.metrics.pushed_bytes.inc(size)

    def start(self, repo: str) -> Session:
        return self.sessions.new(repo, self.storage.new_upload_id())

    async def status(self, repo: str, upload_id: str, state: str | None) -> Session:
        return await self.sessions.get(repo, upload_id, state)

    async def append(self, repo: str, upload_id: str, state: str | None, body: Body,
                     start: int | None = None, length: int | None = None) -> Session:
        """Append a chunk. `start` (from Content-Range) must be the current offset."""
        with self._exclusive(upload_id):
            session = await self.sessions.get(repo, upload_id, state)
            advancing: asyncio.Future[Session] | None = None

            def received(offset: int) -> None:
                # The whole body is here: its offset is recorded while its last bytes are still
                # being hashed and written, so etcd's fsync overlaps the disk's (measured: about
                # 1 ms of an 8 MiB PATCH's 6-7). Undone below if those bytes fail.
                nonlocal advancing
                advancing = asyncio.ensure_future(self.sessions.advance(session, offset))
            try:
                await self._write(session, body, start, length, received)
            except BaseException:
                if advancing is not None:
                    await self._undo(session, advancing)
                raise
            if advancing is None:   # an empty chunk
                return session
            try:
                return await advancing
            except (RangeInvalid, MetadataUnavailable):
                self._hashers.pop(upload_id, None)
                raise

    async def _undo(self, session: Session, advancing: asyncio.Future[Session]) -> None:
        """Put a session recorded ahead of bytes that then failed back where it was, so the client
        can send them again (if etcd cannot be reached for this, the next append finds the bytes
        missing and says to start again: never a blob with them missing, the digest check sees to it)."""
        try:
            moved = await asyncio.shield(advancing)
        except Exception:  # noqa: BLE001 - not recorded, or not known to be: advance forgot it
            return
        try:
            await self.sessions.advance(moved, session.offset)
        except (RangeInvalid, MetadataUnavailable):
            pass

    async def finish(self, repo: str, upload_id: str, state: str | None, digest: str,
                     body: Body | None, start: int | None = None, length: int | None = None,
                     size: int | None = None) -> str:
        """Close an upload with an optional last chunk; verify; commit the blob.

        `size` is the body's declared length, when the request declared one.
        """
        algorithm, hexdigest = check_digest(digest)
        with self._exclusive(upload_id):
            session = await self.sessions.get(repo, upload_id, state)
            if (body is not None and session.offset == 0 and start in (None, 0)
                    and size is not None and size <= SMALL_BLOB):
                data = await _read_all(body)
                self._received(len(data))
                if length is not None and len(data) != length:
                    raise BlobUploadInvalid(f"chunk has {len(data)} bytes, its range says {length}")
                try:
                    _verify(digest, algorithm, hexdigest, data)
                except DigestInvalid:
                    await self._close(session)
                    raise
                await self._commit(session, digest, len(data), data=data)
                return digest
            offset = session.offset
            if body is not None:
                offset = await self._write(session, body, start, length)
            held = self._hashers.pop(upload_id, None)
            if algorithm == "sha256" and held is not None and held[1] == offset:
                actual = held[0].hexdigest()
            else:
                actual = await self.storage.hash_upload(upload_id, algorithm, offset)
            if actual != hexdigest:
                # Nothing was committed; the session is closed and its data dropped.
                await self._close(session)
                raise _mismatch(digest, algorithm, actual)
            await self._commit(session, digest, offset)
            await self.storage.delete_upload(upload_id)
            return digest

    async def monolithic(self, repo: str, digest: str, body: Body, size: int | None) -> str:
        """A whole blob in one request (POST ?digest=): no session at all."""
        with self._receiving():
            return await self._monolithic(repo, digest, body, size)

    async def _monolithic(self, repo: str, digest: str, body: Body, size: int | None) -> str:
        algorithm, hexdigest = check_digest(digest)
        if size is not None and size > self.limits.max_blob_bytes:
            raise TooLarge(f"blob over {self.limits.max_blob_bytes} bytes")
        upload_id = data = None
        if size is not None and size <= SMALL_BLOB:
            data = await _read_all(body)
            self._received(len(data))
            _verify(digest, algorithm, hexdigest, data)
            size = len(data)
        else:
            upload_id = self.storage.new_upload_id()
            hasher = digests.new_hasher(algorithm)
            try:
                size = await self._receive(upload_id, 0, body, None, hasher)
                if hasher.hexdigest() != hexdigest:
                    raise _mismatch(digest, algorithm, hasher.hexdigest())
            except BaseException:
                await self.storage.delete_upload(upload_id, unrecorded=True)
                raise
        try:
            await self.placement.blob(repo, digest, size, data=data, upload=upload_id)
        finally:
            if upload_id is not None:
                await self.storage.delete_upload(upload_id)
        return digest

    async def _commit(self, session: Session, digest: str, size: int, data: bytes | None = None) -> None:
        """Place the verified blob (from `data`, else from the upload's data, which stays until
        the commit: a GC sweep may make us place it twice) and record it, closing the session."""
        try:
            done = await self.placement.blob(session.repo, digest, size, data=data,
                                             upload=None if data is not None else session.id,
                                             session=(session.id, session.revision))
        except MetadataUnavailable:
            self.sessions.committed(session, None)
            raise
        self.sessions.committed(session, done)

    async def cancel(self, repo: str, upload_id: str, state: str | None) -> None:
        with self._exclusive(upload_id):
            await self._close(await self.sessions.get(repo, upload_id, state))

    async def _close(self, session: Session) -> None:
        self._hashers.pop(session.id, None)
        await self.sessions.close(session)
        await self.storage.delete_upload(session.id, unrecorded=True)

    # -- receiving bytes -------------------------------------------------

    async def _write(self, session: Session, body: Body, start: int | None,
                     length: int | None, received: Callable[[int], None] | None = None) -> int:
        """Append a request body at the session's offset; returns the new offset. `received` hears
        the new offset once the body is all read, before its last bytes are written."""
        offset = session.offset
        if start is not None and start != offset:
            raise RangeInvalid(f"chunk starts at {start}, the upload is at {offset}",
                               {"offset": offset, "start": start})
        hasher = self._hasher(session.id, offset)
        try:
            new_offset = await self._receive(session.id, offset, body, length, hasher, received)
        except BaseException:
            self._hashers.pop(session.id, None)
            raise
        if hasher is not None:
            self._hashers[session.id] = (hasher, new_offset)
        return new_offset

    async def _receive(self, upload_id: str, offset: int, body: Body, length: int | None,
                       hasher, received: Callable[[int], None] | None = None) -> int:
        """Stream `body` into the upload's file at `offset`, within the blob size limit."""
        limit = self.limits.max_blob_bytes
        if length is not None and offset + length > limit:
            raise TooLarge(f"blob over {limit} bytes")
        try:
            appender = await self.storage.open_upload(upload_id, offset, hasher)
        except UploadDataLost as e:
            raise BlobUploadInvalid(f"{e}; start the upload again") from None
        try:
            async for chunk in body:
                await appender.write(chunk)
                if appender.offset > limit:
                    raise TooLarge(f"blob over {limit} bytes")
            if length is not None and appender.offset - offset != length:
                raise BlobUploadInvalid(f"chunk has {appender.offset - offset} bytes, "
                                        f"its range says {length}")
            if received is not None and appender.offset != offset:
                received(appender.offset)
            return await appender.finish()
        except BaseException:
            await appender.abort()
            raise
        finally:
            self._received(appender.offset - offset)

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


def _verify(digest: str, algorithm: str, hexdigest: str, data: bytes) -> None:
    actual = digests.new_hasher(algorithm)
    actual.update(data)
    if actual.hexdigest() != hexdigest:
        raise _mismatch(digest, algorithm, actual.hexdigest())


def _mismatch(digest: str, algorithm: str, actual: str) -> DigestInvalid:
    return DigestInvalid("uploaded content does not match the digest",
                         {"expected": digest, "actual": f"{algorithm}:{actual}"})


async def _read_all(body: Body) -> bytes:
    """A body already known to be small (Content-Length checked by the caller)."""
    data = bytearray()
    async for chunk in body:
        data += chunk
    return bytes(data)
