"""Upload sessions: where an upload stands, and who may continue it.

Starting an upload writes nothing: the session is an id and a signed token
(`_state`, in the Location the client follows, as the reference registry
does) naming the repository and the time. Its first chunk creates its record
in etcd; closing it (blob committed, or cancelled) leaves a tombstone that
outlives every token, so a closed session's URL never comes back to life. A
small push therefore costs one etcd transaction, not three.

While this replica's etcd member is alone, no one else can change a session,
so the sessions it touched are answered from memory (the same reasoning as
the index's `solo`), saving the etcd read before each chunk. With worker
processes, each process counts its session changes in shared memory
(`SessionPeers`, cluster/shared.py), and a cached session is used only while
the counts of its bucket are what they were when it was cached: a chunk
acknowledged by one worker is never answered from another's stale memory.
"""

from __future__ import annotations

import hmac
import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, replace
from typing import Protocol

from moorage.meta.errors import MetadataUnavailable
from moorage.meta.records import UploadRecord
from moorage.meta.store import MetaStore, UploadState
from moorage.registry.errors import BlobUploadUnknown, RangeInvalid
from moorage.storage.base import is_upload_id

# How long a session that never received a chunk stays valid. Tombstones live
# at least this long (the store's lease is twice it, renewed at half-life).
STATE_SECONDS = 3600
MAX_CACHED = 4096


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    repo: str
    offset: int
    created: float
    revision: int   # of its etcd record; 0 while it has none
    state: str      # the token for its Location

    @property
    def location(self) -> str:
        return f"/v2/{self.repo}/blobs/uploads/{self.id}?_state={self.state}"


class SessionPeers(Protocol):
    """The replica's other processes that change sessions (cluster/shared.py)."""

    def session_stamp(self, upload_id: str) -> Hashable | None:
        """What a session cached now stays valid under; None when nothing may be cached
        (the member is not alone)."""

    def session_changed(self, upload_id: str, before: Hashable | None) -> Hashable | None:
        """Count a change this process made to the session; returns the stamp its new state
        is valid under: `before` (taken before the change) with this change counted, so that
        a change by another process in between leaves the new state uncached."""


def _unknown(repo: str, upload_id: str) -> BlobUploadUnknown:
    return BlobUploadUnknown(f"upload {upload_id[:40]} not known in {repo}", {"upload": upload_id[:40]})


class Sessions:
    def __init__(self, meta: MetaStore, secret: bytes, state_seconds: float = STATE_SECONDS,
                 peers: SessionPeers | None = None):
        # A tombstone's lease is renewed at half-life, so it lives at least half of it: that
        # must outlast every token that could name the closed session.
        if meta.tombstone_seconds / 2 < state_seconds:
            raise ValueError(f"upload tombstones ({meta.tombstone_seconds}s leases) must outlive "
                             f"session tokens ({state_seconds}s)")
        self.meta = meta
        self.index = meta.index
        # Keyed once: a copy per token skips OpenSSL's key setup (measured: 1 µs a token, not 3).
        self._keyed = hmac.new(secret, digestmod="sha256")
        self._state_seconds = state_seconds
        self.peers = peers
        self._cache: OrderedDict[str, tuple[Hashable, UploadState]] = OrderedDict()

    # -- tokens ------------------------------------------------------------

    def _mac(self, repo: str, upload_id: str, created: int) -> str:
        msg = f"{repo}\0{upload_id}\0{created}".encode()
        mac = self._keyed.copy()
        mac.update(msg)
        return mac.hexdigest()[:32]

    def _token(self, repo: str, upload_id: str, created: int) -> str:
        return f"{created:x}.{self._mac(repo, upload_id, created)}"

    def _token_time(self, repo: str, upload_id: str, state: str | None) -> int | None:
        """The creation time a valid, unexpired token vouches for, else None."""
        try:
            created_hex, mac = (state or "").split(".", 1)
            created = int(created_hex, 16)
        except ValueError:
            return None
        if not hmac.compare_digest(mac, self._mac(repo, upload_id, created)):
            return None
        if time.time() - created > self._state_seconds:
            return None
        return created

    # -- the local cache -----------------------------------------------------

    def _stamp(self, upload_id: str) -> Hashable | None:
        if self.peers is not None:
            return self.peers.session_stamp(upload_id)
        return self.index.solo_epoch if self.index.solo else None

    def _cached(self, upload_id: str) -> UploadState | None:
        entry = self._cache.get(upload_id)
        if entry is None:
            return None
        stamp = self._stamp(upload_id)
        if stamp is None or entry[0] != stamp:
            return None
        return entry[1]

    def _remember(self, upload_id: str, state: UploadState, stamp: Hashable | None) -> None:
        if stamp is None:
            self._cache.pop(upload_id, None)
            return
        self._cache[upload_id] = (stamp, state)
        self._cache.move_to_end(upload_id)
        while len(self._cache) > MAX_CACHED:
            self._cache.popitem(last=False)

    def _changed(self, upload_id: str, before: Hashable | None) -> Hashable | None:
        """After this process wrote (or may have written) the session in etcd."""
        if self.peers is not None:
            return self.peers.session_changed(upload_id, before)
        return before

    def forget(self, upload_id: str) -> None:
        """The session was changed here in a way not remembered (or may have been)."""
        self._cache.pop(upload_id, None)
        self._changed(upload_id, None)

    # -- sessions ------------------------------------------------------------

    def new(self, repo: str, upload_id: str) -> Session:
        created = int(time.time())
        # A fresh id: no other process can have cached it, nor changed it.
        self._remember(upload_id, UploadState(None, 0, False), self._stamp(upload_id))
        return Session(upload_id, repo, 0, created, 0, self._token(repo, upload_id, created))

    async def get(self, repo: str, upload_id: str, state: str | None) -> Session:
        if not is_upload_id(upload_id):
            raise _unknown(repo, upload_id)
        found = self._cached(upload_id)
        if found is None:
            # Stamped before the read: a change made while it is in flight leaves it uncached.
            stamp = self._stamp(upload_id)
            found = await self.meta.get_upload(upload_id)
            self._remember(upload_id, found, stamp)
        if found.closed:
            raise _unknown(repo, upload_id)
        if found.record is not None:
            if found.record.repo != repo:
                raise _unknown(repo, upload_id)
            token = self._token(repo, upload_id, int(found.record.created))
            return Session(upload_id, repo, found.record.offset, found.record.created,
                           found.revision, token)
        created = self._token_time(repo, upload_id, state)
        if created is None:
            raise _unknown(repo, upload_id)
        return Session(upload_id, repo, 0, created, 0, state or "")

    async def advance(self, session: Session, offset: int) -> Session:
        """Record that the upload now holds `offset` bytes."""
        record = UploadRecord(repo=session.repo, offset=offset, created=session.created,
                              updated=time.time())
        before = self._stamp(session.id)
        try:
            revision = await self.meta.advance_upload(session.id, session.revision, record)
        except MetadataUnavailable:
            self.forget(session.id)  # it may or may not have been written
            raise
        if revision is None:
            self.forget(session.id)
            raise RangeInvalid("the upload was changed concurrently; resume from its current offset",
                               {"offset": session.offset})
        self._remember(session.id, UploadState(record, revision, False), self._changed(session.id, before))
        return replace(session, offset=offset, revision=revision)

    def committed(self, session: Session, done: bool | None) -> None:
        """The outcome of the commit that closes the session: None when it is unknown
        (etcd did not answer), False when the session had changed meanwhile."""
        self._ended(session, done, "was closed concurrently")

    async def close(self, session: Session) -> None:
        """Close the session without a blob (cancelled, or its digest did not match)."""
        try:
            done = await self.meta.close_upload(session.id, session.revision)
        except MetadataUnavailable:
            self._ended(session, None, "")
            raise
        self._ended(session, done, "was changed concurrently")

    def _ended(self, session: Session, done: bool | None, conflict: str) -> None:
        """Remember a session's tombstone; forget what we knew when the ending failed or is unknown."""
        if not done:
            self.forget(session.id)
            if done is False:
                raise BlobUploadUnknown(f"upload {session.id} {conflict}")
            return
        # A closed session never opens again: whoever else changes the bucket, it stays closed.
        self._changed(session.id, None)
        self._remember(session.id, UploadState(None, 0, True), self._stamp(session.id))
