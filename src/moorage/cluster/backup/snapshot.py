"""The replica's side of a backup: a consistent etcd snapshot, and the blobs it knows.

The admin API (api/backup.py) streams both to `moorage backup`, which may run
on any machine that reaches a replica: it needs no access to etcd or to the
blob storage.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import msgspec

from moorage.cluster.backup.archive import CHUNK
from moorage.meta import keys
from moorage.meta.etcd import EtcdClient, EtcdUnavailable
from moorage.meta.records import BlobRecord, decoder

_blob_record = decoder(BlobRecord)


class Compacted(Exception):
    """etcd no longer holds the revision asked for (compacted away)."""


@dataclass
class Snapshot:
    """A snapshot spooled to an anonymous file (gone when closed), with what the archive records of it."""

    file: IO[bytes]
    size: int
    sha256: str
    revision: int        # every write acknowledged before the backup began is in it
    etcd_version: str
    # Read once the snapshot was taken: the snapshot holds no write newer than
    # this, so blobs listed at `revision` or here cover every blob it knows.
    revision_after: int


async def take_snapshot(client: EtcdClient, spool_dir: Path) -> Snapshot:
    """Spool the local member's snapshot, so its size and hash can be sent before its bytes.

    The linearizable revision read first makes the local member apply
    everything the cluster had committed by then; the snapshot, taken next
    from the same member, therefore holds every acknowledged write up to
    that revision (and any that came after). Nothing is paused: etcd
    snapshots its backend under a read transaction while writes go on.
    """
    revision = await client.revision()
    version = (await client.status()).version
    spool_dir.mkdir(parents=True, exist_ok=True)
    f = tempfile.TemporaryFile(dir=spool_dir)  # 0600, unlinked at once: it holds every secret
    try:
        sha, size, pending = hashlib.sha256(), 0, []
        pending_bytes = 0
        async for chunk in client.snapshot():
            pending.append(chunk)
            pending_bytes += len(chunk)
            if pending_bytes >= CHUNK:
                data = b"".join(pending)
                pending, pending_bytes = [], 0
                sha.update(data)
                size += len(data)
                await asyncio.to_thread(f.write, data)
        data = b"".join(pending)
        sha.update(data)
        size += len(data)
        await asyncio.to_thread(f.write, data)
        await asyncio.to_thread(f.flush)
        f.seek(0)
        return Snapshot(f, size, sha.hexdigest(), revision, version, await client.revision())
    except BaseException:
        f.close()
        raise


async def blobs_between(client: EtcdClient, revision: int, through: int) -> list[dict[str, Any]]:
    """Every blob recorded at `revision` or at `through`, with its size: a snapshot taken between
    the two knows no other (a blob it knows existed at the first or was created by the second)."""
    try:
        _, kvs = await client.range_prefix(keys.BLOB, revision=revision)
        if through != revision:
            _, later = await client.range_prefix(keys.BLOB, revision=through)
            kvs = list({kv.key: kv for kv in [*kvs, *later]}.values())
    except EtcdUnavailable as e:
        if "compacted" in str(e):
            raise Compacted(str(e)) from None
        raise
    blobs = []
    for kv in kvs:
        try:
            blobs.append({"digest": kv.key[len(keys.BLOB):].decode(), "size": _blob_record.decode(kv.value).size})
        except (msgspec.DecodeError, UnicodeDecodeError):
            continue
    return blobs
