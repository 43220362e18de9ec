"""A new cluster of one from a checked backup archive.

Restore builds it with etcd's own `etcdctl snapshot restore`, which checks
the snapshot's hash and rewrites the membership to the one new member under
a new cluster token, keeping every key and revision. The old replicas'
records and the upload sessions in flight (their data is not in the
archive) are then deleted with the member running, as emergency-repair
does; the replica itself starts with `moorage serve`. Unlike
emergency-repair, it needs none of the old replicas' disks.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec

from moorage.cluster import pki, repair
from moorage.cluster.addresses import url_host
from moorage.cluster.backup.archive import (
    CA_CERT, CA_KEY, SNAPSHOT, BackupError, Checked, Progress, copy_checked, read_member,
)
from moorage.cluster.backup.blobs import restore_blobs
from moorage.cluster.identity import Identity
from moorage.meta import keys
from moorage.meta.etcd import EtcdClient, EtcdUnavailable, op_delete, op_put
from moorage.meta.records import BlobRecord, decoder, encode
from moorage.storage.drivers import storage_at

LEADER_SECONDS = 20.0
RELOCATE_BATCH = 128   # records per transaction, far below etcd's --max-txn-ops

_blob = decoder(BlobRecord)


@dataclass(frozen=True)
class Restored:
    revision: int          # the new cluster starts from it
    dropped: list[str]     # the old replicas, whose records are gone
    written: int           # blobs put into the storage...
    present: int           # ...and those that were there already


def restore(checked: Checked, data_dir: Path, identity: Identity,
            blob_progress: Callable[[int], Progress] | None = None) -> Restored:
    """Restore a checked archive into an empty `data_dir` as replica `identity`, its blobs into the
    identity's storage (a directory or an object store, through its driver)
    (`blob_progress(total bytes)` gives what to tell of their progress, when they begin).

    Its replica.json is written last: a data directory without one holds no finished restore.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    install_ca(checked, data_dir)
    pki.ensure_node_cert(pki.Paths(data_dir), pki.replica_names(identity.advertise))
    snapshot = data_dir / "restore.snapshot"
    with open(snapshot, "wb") as out:
        for name, f in read_member(checked, [SNAPSHOT]):
            copy_checked(f, out, name, checked)
    restore_snapshot(snapshot, identity, repair.etcd_data_dir(data_dir))
    snapshot.unlink()
    progress = None
    if checked.blobs and blob_progress:
        progress = blob_progress(sum(checked.files[n]["size"] for n in checked.blobs))
    restored = asyncio.run(_rebuild(checked, data_dir, identity, progress))
    identity.save(data_dir)
    return restored


async def _rebuild(checked: Checked, data_dir: Path, identity: Identity, progress: Progress | None) -> Restored:
    """With the restored etcd member running: forget the old cluster, put the blobs back, and
    point the records of those the driver put elsewhere than before at where they are now
    (an upload completed in place has a location of its own, BlobRecord.location)."""
    etcd = repair.member(data_dir, identity)
    await etcd.start()
    client = EtcdClient(etcd.endpoint, etcd.tls)
    try:
        revision, dropped = await forget_old_cluster(client)
        written = present = 0
        if checked.blobs:
            storage = storage_at(identity.storage_dir, identity.s3)
            try:
                await storage.open()
                await storage.probe()
                records = await blob_records(client)
                written, present, moved = await restore_blobs(
                    checked, storage, progress, {d: r.location for d, r in records.items()})
            finally:
                await storage.close()
            revision = max(revision, await relocate(client, records, moved))
        return Restored(revision, dropped, written, present)
    finally:
        await client.close()
        await etcd.stop()


async def blob_records(client: EtcdClient) -> dict[str, BlobRecord]:
    _, kvs = await client.range_prefix(keys.BLOB)
    return {kv.key[len(keys.BLOB):].decode(): _blob.decode(kv.value) for kv in kvs}


async def relocate(client: EtcdClient, records: dict[str, BlobRecord], moved: dict[str, str]) -> int:
    """Rewrite the records of blobs now at another location; the newest revision (0: none)."""
    revision = 0
    items = [(d, loc) for d, loc in moved.items() if d in records]
    for i in range(0, len(items), RELOCATE_BATCH):
        result = await client.txn([], [op_put(keys.blob(d), encode(msgspec.structs.replace(records[d], location=loc)))
                                       for d, loc in items[i:i + RELOCATE_BATCH]])
        revision = result.revision
    return revision


def etcd_version() -> str:
    """The installed etcd's version, as `etcd --version` prints it."""
    binary = shutil.which("etcd")
    if binary is None:
        raise BackupError("the etcd binary is not installed (Debian package etcd-server); `make install` "
                          "installs it")
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    m = re.search(r"etcd Version:\s*(\S+)", out.stdout)
    return m.group(1) if m else "0.0.0"


def restore_snapshot(snapshot: Path, identity: Identity, etcd_dir: Path) -> None:
    """`etcdctl snapshot restore`: a data directory whose only member is this replica, under a new token.

    etcdctl checks the hash etcd appended to the snapshot and keeps every
    key and revision; the membership it writes is what `serve` then starts.
    """
    etcdctl = shutil.which("etcdctl")
    if etcdctl is None:
        raise BackupError("etcdctl is not installed (Debian package etcd-client); restore needs it")
    peer = f"https://{url_host(identity.advertise)}:{identity.etcd_peer_port}"
    cmd = [etcdctl, "snapshot", "restore", str(snapshot), "--name", identity.replica_id,
           "--data-dir", str(etcd_dir), "--initial-cluster", f"{identity.replica_id}={peer}",
           "--initial-cluster-token", identity.cluster_token, "--initial-advertise-peer-urls", peer]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "ETCDCTL_API": "3"})
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise BackupError(f"etcdctl snapshot restore failed: {last[:300]}")
    os.chmod(etcd_dir, 0o700)


async def forget_old_cluster(client: EtcdClient) -> tuple[int, list[str]]:
    """Delete the old replicas' records and the upload sessions in flight, once the lone member leads.

    The old replicas are not part of the new cluster; the uploads' data
    lived in the old storage, outside the archive. Returns the revision the
    new cluster starts from and the replica ids dropped.
    """
    deadline = time.monotonic() + LEADER_SECONDS
    while True:
        try:
            _, records = await client.range_prefix(keys.REPLICA)
            dropped = sorted(kv.key[len(keys.REPLICA):].decode(errors="replace") for kv in records)
            result = await client.txn([], [op_delete(keys.REPLICA, prefix=True),
                                           op_delete(keys.UPLOAD, prefix=True)])
            return result.revision, dropped
        except EtcdUnavailable as e:
            if time.monotonic() > deadline:
                raise BackupError(f"the restored etcd member accepted no write within {LEADER_SECONDS:.0f}s "
                                  f"({e}); see DATA_DIR/etcd.log") from None
            await asyncio.sleep(0.2)


def install_ca(checked: Checked, data_dir: Path) -> None:
    pems = {}
    for name, f in read_member(checked, (CA_CERT, CA_KEY)):
        buf = io.BytesIO()
        copy_checked(f, buf, name, checked)
        pems[name] = buf.getvalue()
    try:
        pki.install_ca(pki.Paths(data_dir), pems[CA_CERT], pems[CA_KEY])
    except pki.PkiError as e:
        raise BackupError(f"the archive's cluster CA cannot be used: {e}") from None
