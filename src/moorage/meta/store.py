"""The registry's door to etcd: every metadata write, each change one etcd transaction.

Preconditions travel inside the transaction as comparisons (a manifest's
blobs are still linked, an upload has not moved on, a grant's user still
exists), so two replicas racing each other, or a push racing a delete, are
ordered by etcd and one of them wins cleanly. A write is acknowledged only
after this replica's index has applied it, so the writer's next read sees it.

Every method raises MetadataUnavailable when etcd does not answer (`boundary`,
meta/errors.py): nothing above meta/ handles etcd's own errors. Reads of what
the watch keeps in memory are the Index's (meta/index.py) and AccessRecords'
(meta/access.py).
"""

from __future__ import annotations

import enum
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import msgspec

from moorage.meta import keys
from moorage.meta.access import TEAM, USER, decode_user
from moorage.meta.errors import MetadataUnavailable, boundary
from moorage.meta.etcd import (
    KV, EtcdClient, EtcdUnavailable, Event, TxnResult, cmp_absent, cmp_create_revision, cmp_exists, cmp_mod_revision,
    cmp_prefix_unchanged, cmp_value, op_delete, op_get, op_put, op_txn,
)
from moorage.meta.index import Index
from moorage.meta.records import (
    BlobRecord, GrantRecord, ManifestRecord, Referrer, TeamRecord, UploadRecord, UserRecord, VisibilityRecord, decoder,
    encode, encode_note,
)
from moorage.meta.txn_group import TxnGroup
from moorage.meta.webhooks import QueuedEvent, queue_ops

_upload = decoder(UploadRecord)
_blob = decoder(BlobRecord)


TOMBSTONE = b"closed"
# Optimistic writes (read, then compare what was read) retry this often when another writer got in between.
RETRIES = 5


class Change(enum.Enum):
    """How a write that reads before it compares ended."""

    DONE = enum.auto()
    MISSING = enum.auto()      # what it would change does not exist
    CONFLICT = enum.auto()     # it kept changing under the write, RETRIES times
    LAST_ADMIN = enum.auto()   # the user is the cluster's last admin


class BlobBeingCollected(Exception):
    """Garbage collection is deleting this digest's file right now: wait for its
    marker to go, put the file back, and commit again (registry/gc.py says why)."""


class WriteCollected(Exception):
    """Garbage collection took a writer's note for an abandoned write (its grace period
    ran out before the commit) and deletes the object it names: the blob must be sent again."""


@dataclass(frozen=True, slots=True)
class UploadState:
    record: UploadRecord | None   # None: no record (not started, or closed)
    revision: int                 # the key's mod_revision, 0 when absent
    closed: bool


class MetaStore:
    def __init__(self, client: EtcdClient, index: Index, tombstone_seconds: float = 7200):
        self.client = client
        # Writes go through the group (meta/txn_group.py): concurrent pushes share etcd round trips.
        self._group = TxnGroup(client)
        self.index = index
        self.tombstone_seconds = tombstone_seconds
        self._lease: tuple[int, float] | None = None
        # GC deletion markers seen by the watch: the newest revision one came or went,
        # and the newest write acknowledged before the index applied it.
        self.marker_revision = 0
        self._unapplied = 0
        index.subscribe(keys.GC_DELETING, self._marker_event, self._markers_reloaded)

    async def _txn(self, compare=(), success=(), failure=()) -> TxnResult:
        result = await self._group.txn(compare, success, failure)
        if not await self.index.wait_applied(result.revision):
            self._unapplied = max(self._unapplied, result.revision)
        return result

    # -- garbage collection's deletion markers (registry/gc.py has the argument) --

    def _marker_event(self, event: Event) -> None:
        self.marker_revision = max(self.marker_revision, event.kv.mod_revision)

    def _markers_reloaded(self) -> None:
        # Markers that came and went while the watch was behind are unseen: count
        # them as newer than anything placed before the reload.
        self.marker_revision = max(self.marker_revision, self.index.applied + 1)

    def applied(self) -> int:
        """The newest revision this replica's index has applied: a writer notes it before it places a file."""
        return self.index.applied

    def file_may_be_collected(self, placed_after: int) -> bool:
        """Whether a GC sweep may have deleted a blob file placed after the index
        had applied `placed_after` (then the writer checks and puts it back)."""
        return self.marker_revision > placed_after or self.index.applied < self._unapplied

    @boundary
    async def collecting(self, digest: str) -> bool:
        return await self.client.get(keys.gc_deleting(digest)) is not None

    async def _committed(self, digest: str, result: TxnResult) -> bool:
        """A write that compared the digest's GC marker absent: raise if that is why it failed."""
        if not result.succeeded and result.responses and result.responses[-1].response_range.kvs:
            raise BlobBeingCollected(digest)
        return result.succeeded

    # -- uploads -----------------------------------------------------------
    #
    # An upload's key is absent until its first chunk (the session lives in a
    # signed token until then), holds an UploadRecord while data arrives, and
    # ends as a leased tombstone so a closed session's URL stays dead until
    # every token that could name it has expired. A compare on the key's
    # mod_revision (0 when absent) orders every change.

    @boundary
    async def get_upload(self, upload_id: str) -> UploadState:
        kv = await self.client.get(keys.upload(upload_id))
        if kv is None:
            return UploadState(None, 0, False)
        if kv.value == TOMBSTONE:
            return UploadState(None, kv.mod_revision, True)
        return UploadState(_upload.decode(kv.value), kv.mod_revision, False)

    @boundary
    async def advance_upload(self, upload_id: str, seen_revision: int, record: UploadRecord
                             ) -> int | None:
        """Record a new offset unless the upload changed since `seen_revision`;
        returns the record's new revision, or None when it had changed."""
        key = keys.upload(upload_id)
        # Upload records are not read from the index, so no need to wait for it.
        result = await self._group.txn([cmp_mod_revision(key, seen_revision)],
                                       [op_put(key, encode(record))])
        return result.revision if result.succeeded else None

    @boundary
    async def close_upload(self, upload_id: str, seen_revision: int) -> bool:
        key = keys.upload(upload_id)
        return (await self._with_tombstone(
            lambda lease: self._group.txn([cmp_mod_revision(key, seen_revision)],
                                          [op_put(key, TOMBSTONE, lease)]))).succeeded

    async def _tombstone_lease(self) -> int:
        now = time.monotonic()
        if self._lease is None or now - self._lease[1] > self.tombstone_seconds / 2:
            self._lease = (await self.client.grant_lease(int(self.tombstone_seconds)), now)
        return self._lease[0]

    async def _with_tombstone(self, txn):
        """Run a transaction that writes a tombstone under the current lease."""
        try:
            return await txn(await self._tombstone_lease())
        except EtcdUnavailable:
            self._lease = None  # a lease etcd no longer knows fails every put under it
            raise

    @boundary
    async def secret(self, name: str) -> bytes:
        """A cluster-wide random secret, created by whichever replica asks first."""
        key = keys.secret(name)
        await self._group.txn([cmp_absent(key)], [op_put(key, secrets.token_bytes(32))])
        kv = await self.client.get(key)
        assert kv is not None
        return kv.value

    # -- blobs -------------------------------------------------------------

    @boundary
    async def intend(self, digest: str, key: bytes | None = None, location: str = "") -> bytes:
        """Note that an object is about to be written at `digest`'s content address, or at
        `location` (at `key`, the same writer's earlier note, or a new one), before it is: the
        commit that records the blob deletes the note in its own transaction, so a note that
        outlives the grace period names an object a refused commit or a crash left behind
        (registry/gc.py collects it). Not read from the index: no wait for it."""
        key = key or keys.gc_writing(digest, secrets.token_hex(6))
        await self._group.txn([], [op_put(key, encode_note(time.time(), location))])
        return key

    @boundary
    async def drop_intent(self, key: bytes) -> None:
        """A writer's note whose object the writer deleted itself."""
        await self._group.txn([], [op_delete(key)])

    @boundary
    async def commit_blob(self, repo: str, digest: str, size: int,
                          upload: tuple[str, int] | None = None, intent: bytes | None = None) -> bool:
        """Record a verified blob and link it into `repo`, closing its upload (and deleting
        the writer's `intent`, MetaStore.intend).

        With `upload` (id, revision seen), nothing happens unless the upload
        is still exactly as we last saw it: a blob is committed once.
        """
        ops = [
            op_put(keys.blob(digest), encode(BlobRecord(size=size, created=time.time()))),
            op_put(keys.repo_blob(repo, digest), b""),
        ]
        if intent is not None:
            ops.append(op_delete(intent))
        marker = keys.gc_deleting(digest)
        if upload is None:
            return await self._committed(digest, await self._txn([cmp_absent(marker)], ops, [op_get(marker)]))
        key = keys.upload(upload[0])
        return await self._committed(digest, await self._with_tombstone(lambda lease: self._txn(
            [cmp_mod_revision(key, upload[1]), cmp_absent(marker)], ops + [op_put(key, TOMBSTONE, lease)],
            [op_get(marker)])))

    @boundary
    async def commit_blob_at(self, repo: str, digest: str, size: int, location: str, intent: bytes,
                             upload: tuple[str, int] | None = None) -> str | None:
        """Record a verified blob whose bytes are at `location`, a key of this writer's own
        noted by `intent`, as `commit_blob` does. The first such record keeps its location:
        when a record is there already it is rewritten (dated now, linked into `repo`) with
        its own location, and the writer's note stays until the writer has deleted its object.
        Returns the location the record holds; None when the upload had changed meanwhile.
        WriteCollected when GC took the note (and so the object) first."""
        blob, marker = keys.blob(digest), keys.gc_deleting(digest)
        # The location to record, and the record's create_revision (None: absent): rewrites keep
        # a record's location, so a record the same since its creation still has the one read.
        held, seen = location, None
        for _ in range(RETRIES):
            compare = [cmp_absent(marker), cmp_exists(intent),
                       cmp_absent(blob) if seen is None else cmp_create_revision(blob, seen)]
            ops = [op_put(blob, encode(BlobRecord(size=size, created=time.time(), location=held))),
                   op_put(keys.repo_blob(repo, digest), b"")]
            if held == location:
                ops.append(op_delete(intent))
            failure = [op_get(marker), op_get(intent), op_get(blob)]
            if upload is None:
                result = await self._txn(compare, ops, failure)
            else:
                key = keys.upload(upload[0])
                result = await self._with_tombstone(lambda lease: self._txn(
                    [cmp_mod_revision(key, upload[1]), *compare], ops + [op_put(key, TOMBSTONE, lease)], failure))
            if result.succeeded:
                return held
            found_marker, found_intent, found_blob = (r.response_range.kvs for r in result.responses)
            if found_marker:
                raise BlobBeingCollected(digest)
            if not found_intent:
                raise WriteCollected(digest)
            if found_blob and found_blob[0].create_revision != seen:
                seen, held = found_blob[0].create_revision, _blob.decode(found_blob[0].value).location
            elif not found_blob and seen is not None:
                seen, held = None, location   # a sweep took the record between two tries
            else:
                return None   # the record is as compared: the upload changed
        raise MetadataUnavailable(f"the record of blob {digest} kept changing under its commit")

    @boundary
    async def mount_blob(self, repo: str, source: str, digest: str) -> bool:
        # The blob record is written again (and dated now) so that a GC sweep that
        # marked it before this mount sees it changed and keeps it. It keeps its location:
        # compared to be the record read (its value, else the same since its creation), so a
        # record a sweep replaced meanwhile (whose object may be another) is never copied.
        found = self.index.blobs.get(digest)
        if found is None:
            return False
        blob, link = keys.blob(digest), keys.repo_blob(source, digest)
        same: object = cmp_value(blob, encode(found))
        for _ in range(RETRIES):
            result = await self._txn(
                [cmp_exists(link), same],
                [op_put(keys.repo_blob(repo, digest), b""),
                 op_put(blob, encode(BlobRecord(size=found.size, created=time.time(), location=found.location)))],
                [op_get(blob), op_get(link)])
            if result.succeeded:
                return True
            kvs, linked = (r.response_range.kvs for r in result.responses)
            if not kvs or not linked:
                return False
            found, same = _blob.decode(kvs[0].value), cmp_create_revision(blob, kvs[0].create_revision)
        return False

    @boundary
    async def unlink_blob(self, repo: str, digest: str) -> bool:
        key = keys.repo_blob(repo, digest)
        return (await self._txn([cmp_exists(key)], [op_delete(key)])).succeeded

    # -- manifests and tags --------------------------------------------------

    @boundary
    async def put_manifest(self, repo: str, digest: str, record: ManifestRecord,
                           tag: str | None, referrer: Referrer | None, events: Sequence[QueuedEvent] = (),
                           intent: bytes | None = None) -> bool:
        """Store a manifest record (and tag, and referrer entry, and the webhook events telling of
        it) atomically, deleting the writer's `intent` (MetaStore.intend).

        Fails, changing nothing, when a blob or child manifest it references
        is no longer in the repository by the time etcd orders the write.
        """
        compare = [cmp_exists(keys.repo_blob(repo, d)) for d in set(record.blobs)]
        compare += [cmp_exists(keys.manifest(repo, d)) for d in set(record.children)]
        marker = keys.gc_deleting(digest)
        compare.append(cmp_absent(marker))
        ops = [
            op_put(keys.blob(digest), encode(BlobRecord(size=record.size, created=record.created))),
            op_put(keys.manifest(repo, digest), encode(record)),
        ]
        # Touching the links it uses makes a GC sweep that marked them before now fail.
        ops += [op_put(keys.repo_blob(repo, d), b"") for d in set(record.blobs)]
        if tag is not None:
            ops.append(op_put(keys.tag(repo, tag), digest.encode()))
        if referrer is not None and record.subject:
            ops.append(op_put(keys.referrer(repo, record.subject, digest), encode(referrer)))
        ops += queue_ops(events)
        if intent is not None:
            ops.append(op_delete(intent))
        return await self._committed(digest, await self._txn(compare, ops, [op_get(marker)]))

    @boundary
    async def delete_manifest(self, repo: str, digest: str, record: ManifestRecord,
                              tags: Iterable[str], events: Sequence[QueuedEvent] = ()) -> bool:
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
        ops += queue_ops(events)
        return (await self._txn([cmp_exists(key)], ops)).succeeded

    @boundary
    async def delete_tag(self, repo: str, tag: str, events: Sequence[QueuedEvent] = ()) -> bool:
        key = keys.tag(repo, tag)
        return (await self._txn([cmp_exists(key)], [op_delete(key), *queue_ops(events)])).succeeded

    # -- users, teams, grants, visibility and console sessions ----------------------
    #
    # registry/access.py and registry/users.py decide and validate; meta/access.py
    # keeps what these write in memory. Each write is acknowledged once this
    # replica's index has applied it (read-your-writes).

    async def _changed(self, compare: Iterable = (), success: Iterable = ()) -> bool:
        result = await self._group.txn(list(compare), list(success))
        if result.succeeded:
            await self.index.wait_applied(result.revision)
        return result.succeeded

    @boundary
    async def user_exists(self, name: str) -> bool:
        """Read from etcd, not the watch's copy: for the answer to a write that failed."""
        return await self.client.get(keys.user(name)) is not None

    @boundary
    async def team_exists(self, name: str) -> bool:
        return await self.client.get(keys.team(name)) is not None

    @boundary
    async def add_user(self, name: str, record: UserRecord) -> bool:
        """Create a user; False when the name is taken."""
        return await self._changed([cmp_absent(keys.user(name))], [op_put(keys.user(name), encode(record))])

    @boundary
    async def set_password_hash(self, name: str, password_hash: str) -> Change:
        key = keys.user(name)
        for _ in range(RETRIES):
            kv = await self.client.get(key)
            if kv is None:
                return Change.MISSING
            record = msgspec.structs.replace(decode_user(kv.value), password_hash=password_hash)
            if await self._changed([cmp_mod_revision(key, kv.mod_revision)], [op_put(key, encode(record))]):
                return Change.DONE
        return Change.CONFLICT

    @boundary
    async def remove_user(self, name: str) -> Change:
        """Delete a user with its memberships and grants, in one transaction; never the last cluster admin."""
        key = keys.user(name)
        for _ in range(RETRIES):
            kv = await self.client.get(key)
            if kv is None:
                return Change.MISSING
            compare = [cmp_mod_revision(key, kv.mod_revision)]
            if decode_user(kv.value).admin:
                other = await self._other_admin(name)
                if other is None:
                    return Change.LAST_ADMIN
                # Two admins removing each other at once: one of these compares fails.
                compare.append(cmp_mod_revision(other.key, other.mod_revision))
            ops = [op_delete(key), op_delete(keys.memberships(name), prefix=True),
                   op_delete(keys.user_grants(name), prefix=True)]
            if await self._changed(compare, ops):
                return Change.DONE
        return Change.CONFLICT

    async def _other_admin(self, name: str) -> KV | None:
        _, kvs = await self.client.range_prefix(keys.USER)
        for kv in kvs:
            if kv.key != keys.user(name):
                try:
                    if decode_user(kv.value).admin:
                        return kv
                except msgspec.DecodeError:
                    continue
        return None

    @boundary
    async def add_team(self, name: str, record: TeamRecord) -> bool:
        """Create a team; False when the name is taken."""
        return await self._changed([cmp_absent(keys.team(name))], [op_put(keys.team(name), encode(record))])

    @boundary
    async def remove_team(self, name: str) -> Change:
        """Delete a team, its memberships and its grants in one transaction."""
        for _ in range(RETRIES):
            revision, kvs = await self.client.range_prefix(keys.MEMBER)
            members = [kv.key for kv in kvs if (keys.split_pair(kv.key, keys.MEMBER) or ("", ""))[1] == name]
            # A membership added after our read fails the range compare, so none is left behind.
            if await self._changed(
                    [cmp_exists(keys.team(name)), cmp_prefix_unchanged(keys.MEMBER, revision)],
                    [op_delete(keys.team(name)), op_delete(keys.team_grants(name), prefix=True)]
                    + [op_delete(k) for k in members]):
                return Change.DONE
            if await self.client.get(keys.team(name)) is None:
                return Change.MISSING
        return Change.CONFLICT

    @boundary
    async def add_member(self, team: str, user: str) -> bool:
        """False when the team or the user does not exist."""
        return await self._changed([cmp_exists(keys.team(team)), cmp_exists(keys.user(user))],
                                   [op_put(keys.member(user, team), b"")])

    @boundary
    async def remove_member(self, team: str, user: str) -> bool:
        """False when the user is not a member of the team."""
        key = keys.member(user, team)
        return await self._changed([cmp_exists(key)], [op_delete(key)])

    @staticmethod
    def _grant_keys(kind: str, name: str, pattern: str) -> tuple[bytes, bytes]:
        """The grant's key and its subject's (a user or a team)."""
        if kind == USER:
            return keys.user_grant(name, pattern), keys.user(name)
        assert kind == TEAM, kind
        return keys.team_grant(name, pattern), keys.team(name)

    @boundary
    async def put_grant(self, kind: str, name: str, pattern: str, role: str) -> bool:
        """Give the user or team `role` on `pattern`; False when it does not exist."""
        key, subject = self._grant_keys(kind, name, pattern)
        return await self._changed([cmp_exists(subject)], [op_put(key, encode(GrantRecord(role=role)))])

    @boundary
    async def delete_grant(self, kind: str, name: str, pattern: str) -> bool:
        """False when there was no such grant."""
        key, _ = self._grant_keys(kind, name, pattern)
        return await self._changed([cmp_exists(key)], [op_delete(key)])

    @boundary
    async def set_visibility(self, pattern: str, public: bool | None) -> None:
        """None forgets the pattern's setting (the next broader pattern decides)."""
        key = keys.visibility(pattern)
        await self._changed([], [op_delete(key)] if public is None
                            else [op_put(key, encode(VisibilityRecord(public=public)))])

    @boundary
    async def revoke_session(self, session_id: str, seconds: int) -> None:
        """A signed-out console session, for `seconds` (then its key's lease ends and it goes by itself)."""
        lease = await self.client.grant_lease(max(int(seconds), 1))
        await self._changed([], [op_put(keys.session_revoked(session_id), b"", lease)])
