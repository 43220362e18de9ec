"""Upload sessions on S3: one multipart upload per session, completed in place at commit.

A session's bytes go to a multipart upload at a key of its own
(`blobs/u/<upload id>`), a part (`part_size`) at a time as requests bring
them; committing completes it there and the blob record points at that key
(meta/records.py BlobRecord.location), so no byte is copied after it
arrived. The content address is used only by sessions too small for a part
(under 5 MiB): their bytes are read back and written there whole.

Nothing about a session lives in a replica: sessions hop between replicas
and worker processes between any two requests. Each request ends by writing
the session's state at its new offset, `uploads/<id>/at-<offset>`: the
multipart upload's id, the parts sent so far (number, ETag, size: SeaweedFS
lists every version of a part sent twice, so the parts are never taken from
ListParts) and the tail, the bytes after the last part (less than 5 MiB, S3's
smallest part). The next request, on any replica, reads the state at the
acknowledged offset, sends the tail in front of its own bytes and goes on;
states past that offset were never acknowledged (a request that broke off),
and parts such a request sent are sent again under the same numbers (the
last one wins, and its ETag is the one recorded).
"""

from __future__ import annotations

import asyncio
import re
from typing import Callable

import msgspec

from moorage import digest as digests
from moorage.storage.base import is_upload_id
from moorage.storage.errors import ObjectMissing, UploadDataLost, UploadInvalid
from moorage.storage.s3.client import S3Client
from moorage.storage.s3.config import MIN_PART
from moorage.storage.s3.multipart import Multipart, Part

_LOCATION = re.compile(r"^blobs/u/([0-9a-f]{32})$")
_HEADER = 4   # bytes of the state's header length


def checked(upload_id: str) -> str:
    if not is_upload_id(upload_id):
        raise ValueError(f"bad upload id {upload_id[:40]!r}")
    return upload_id


def session_of(key: str) -> str:
    """The upload id whose session a key is the location of, "" for any other key."""
    m = _LOCATION.match(key)
    return m.group(1) if m else ""


def upload_of(location: str) -> str:
    """The upload id a session's own location names; ValueError for anything else
    (a location comes from etcd: it never names a key outside blobs/u/)."""
    upload = session_of(location)
    if not upload:
        raise ValueError(f"bad blob location {location[:60]!r}")
    return upload


class SessionState(msgspec.Struct, array_like=True):
    """Where a session stands at one offset; the tail's bytes follow it in the same object."""

    s3_upload_id: str = ""                       # "" until the first part
    parts: list[tuple[int, str, int]] = []       # (number, ETag, size)
    previous: int = 0                            # the offset of the state this one replaced

    def part_list(self) -> list[Part]:
        return [Part(n, etag, size) for n, etag, size in self.parts]


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(SessionState).decode


class UploadSessions:
    """The upload sessions of one bucket and prefix."""

    def __init__(self, client: S3Client, multipart: Multipart):
        self.client = client
        self.multipart = multipart
        self.config = client.config

    # -- keys ------------------------------------------------------------------------

    @staticmethod
    def location(upload_id: str) -> str:
        """The session's own key (relative to the prefix), where its blob is completed."""
        return f"blobs/u/{checked(upload_id)}"

    def location_key(self, upload_id: str) -> str:
        return self.config.prefix + self.location(upload_id)

    def state_key(self, upload_id: str, offset: int) -> str:
        # Fixed-width hex, so a listing returns a session's states in offset order.
        return f"{self.config.prefix}uploads/{checked(upload_id)}/at-{offset:016x}"

    # -- state -----------------------------------------------------------------------

    async def state(self, upload_id: str, offset: int) -> tuple[SessionState, bytes]:
        """The state and tail at an acknowledged offset; UploadDataLost when they are not there."""
        if offset == 0:
            return SessionState(), b""
        lost = UploadDataLost(f"the object store ({self.config.where}) has no state of upload {upload_id} "
                              f"at {offset} bytes")
        try:
            data = await self.client.read_key(self.state_key(upload_id, offset))
        except ObjectMissing:
            raise lost from None
        try:
            length = int.from_bytes(data[:_HEADER], "big")
            state = _decode(data[_HEADER:_HEADER + length])
        except (msgspec.DecodeError, ValueError):
            raise lost from None
        tail = data[_HEADER + length:]
        if sum(size for _, _, size in state.parts) + len(tail) != offset:
            raise lost
        return state, tail

    async def save(self, upload_id: str, offset: int, state: SessionState, tail: bytes | bytearray) -> None:
        header = _encode(state)
        await self.client.put_key(self.state_key(upload_id, offset),
                                  len(header).to_bytes(_HEADER, "big") + header + tail)

    async def open(self, upload_id: str, offset: int, hasher=None) -> "PartAppender":
        state, tail = await self.state(upload_id, offset)
        appender = PartAppender(self, upload_id, offset, state, tail, hasher)
        if state.previous:
            # The offset is acknowledged, so the state before it is spent: dropped while this
            # request receives (one left by a failure here is deleted with the session).
            appender.cleanup = asyncio.create_task(self.client.delete_keys([self.state_key(upload_id, state.previous)]))
        return appender

    # -- the end of a session --------------------------------------------------------

    async def _complete(self, upload_id: str, size: int) -> tuple[SessionState, bytes]:
        """Complete the session's multipart upload at its own key (the tail its last part).
        Done twice (hashing, then committing) it finds the object already there."""
        state, tail = await self.state(upload_id, size)
        if not state.parts:
            return state, tail
        key, mp, parts = self.location_key(upload_id), self.multipart, state.part_list()
        try:
            if tail:
                parts.append(await mp.upload_part(upload_id, state.s3_upload_id, len(parts) + 1, tail, key=key))
            await mp.complete_upload(upload_id, state.s3_upload_id, parts, key=key)
        except UploadInvalid as e:
            if e.code != "NoSuchUpload" or await self.client.head_key(key) != size:
                raise
        return state, tail

    async def hash(self, upload_id: str, algorithm: str, length: int) -> str:
        """Parts of a multipart upload in progress cannot be read: a session that has any is
        completed at its own key first, and read back from there."""
        state, tail = await self._complete(upload_id, length)
        h = digests.new_hasher(algorithm)
        if state.parts:
            async for data in self.client.stream_key(self.location_key(upload_id)):
                h.update(data)
        else:
            h.update(tail)
        return h.hexdigest()

    def location_for(self, upload_id: str, size: int) -> str:
        """A session of at least a part's minimum always has parts (each request sends its
        tail as a part once it is that big); smaller ones have only a tail."""
        return self.location(upload_id) if size >= MIN_PART else ""

    async def commit(self, upload_id: str, size: int, content_key: Callable[[], str]) -> str:
        """Make bytes [0, size) of the session a blob; returns its location ("" for `content_key`)."""
        state, tail = await self._complete(upload_id, size)
        if state.parts:
            return self.location(upload_id)
        await self.client.put_key(content_key(), tail)
        return ""

    async def delete(self, upload_id: str, unrecorded: bool = False) -> None:
        """Drop the session's states; with `unrecorded`, its multipart uploads and its own key too."""
        try:
            prefix = f"uploads/{checked(upload_id)}/"
        except ValueError:
            return
        keys = [self.config.prefix + o.key for o in await self.client.list_keys(prefix)]
        if unrecorded:
            key = self.location_key(upload_id)
            for u in await self.multipart.list_uploads(self.location(upload_id)):
                if u.key == key:
                    await self.multipart.abort_upload(upload_id, u.s3_upload_id, key=key)
            keys.append(key)
        await self.client.delete_keys(keys)

    async def listing(self) -> list[tuple[str, int, float]]:
        """(upload id, bytes, newest state's time) of every session with states (uploads/ only)."""
        sessions: dict[str, tuple[int, float]] = {}
        for o in await self.client.list_keys("uploads/"):
            parts = o.key.split("/")
            if len(parts) == 3 and is_upload_id(parts[1]):
                size, stamp = sessions.get(parts[1], (0, 0.0))
                sessions[parts[1]] = (size + o.size, max(stamp, o.modified))
        return [(uid, size, stamp) for uid, (size, stamp) in sessions.items()]


class PartAppender:
    """Appends to an upload session a part at a time, hashing on the way.

    A full part goes out while the next one fills (one part in flight):
    receiving and sending overlap, and an upload holds at most two parts.
    """

    def __init__(self, sessions: UploadSessions, upload_id: str, offset: int, state: SessionState,
                 tail: bytes, hasher=None):
        self.sessions = sessions
        self.upload_id = upload_id
        self.offset = offset
        self._opened = offset
        self._state = state
        self._parts = state.part_list()
        self._buffer = bytearray(tail)   # hashed already, by the requests that brought it
        self._hasher = hasher
        self._sending: asyncio.Task | None = None
        self.cleanup: asyncio.Task | None = None

    async def write(self, chunk: bytes) -> None:
        if self._hasher is not None:
            self._hasher.update(chunk)
        self._buffer += chunk
        self.offset += len(chunk)
        if len(self._buffer) >= self.sessions.config.part_size:
            await self._send()

    async def _send(self) -> None:
        await self._sent()
        data, self._buffer = self._buffer, bytearray()
        s = self.sessions
        if not self._state.s3_upload_id:
            self._state.s3_upload_id = await s.multipart.create_upload(self.upload_id, key=s.location_key(self.upload_id))
        self._sending = asyncio.create_task(s.multipart.upload_part(
            self.upload_id, self._state.s3_upload_id, len(self._parts) + 1, data, key=s.location_key(self.upload_id)))

    async def _sent(self) -> None:
        sending, self._sending = self._sending, None
        if sending is not None:
            self._parts.append(await sending)

    async def finish(self) -> int:
        """Send what makes a part, save the state (and the tail) at the new offset."""
        if self.offset == self._opened:
            await self._cleaned()
            return self.offset
        if len(self._buffer) >= MIN_PART:
            await self._send()
        await self._sent()
        state = SessionState(self._state.s3_upload_id, [(p.number, p.etag, p.size) for p in self._parts],
                             previous=self._opened)
        await self.sessions.save(self.upload_id, self.offset, state, self._buffer)
        await self._cleaned()
        return self.offset

    async def _cleaned(self) -> None:
        cleanup, self.cleanup = self.cleanup, None
        if cleanup is not None:
            try:
                await cleanup
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - a spent state left is harmless
                pass

    async def abort(self) -> None:
        self._buffer = bytearray()
        if self._sending is not None:
            self._sending.cancel()
            try:
                await self._sent()
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the request is failing already
                pass
        await self._cleaned()
