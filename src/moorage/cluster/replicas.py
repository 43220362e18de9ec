"""Replica records: who is in the cluster, where to reach them, when last seen.

Each replica writes its record at start and refreshes `seen` every few
seconds; `status` reads them all. Deleting a replica's record is how
`remove` tells a live replica to shut itself down.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec

from moorage import __version__
from moorage.meta import keys
from moorage.meta.etcd import EtcdClient, EtcdUnavailable, cmp_exists, op_delete, op_put

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0


class ReplicaRecord(msgspec.Struct, frozen=True):
    id: str
    url: str
    peer_url: str
    client_url: str
    version: str
    started: float
    seen: float


_decode = msgspec.json.Decoder(ReplicaRecord).decode


async def heartbeat(client: EtcdClient, record: ReplicaRecord) -> None:
    """Write the record now, then refresh `seen` until the record is deleted.

    Returns when someone deleted it (`moorage remove`): a refresh never
    brings a removed replica's record back.
    """
    key = keys.replica(record.id)
    first = True
    while True:
        record = msgspec.structs.replace(record, seen=time.time())
        value = msgspec.json.encode(record)
        try:
            if first:
                await client.put(key, value)
                first = False
            elif not (await client.txn([cmp_exists(key)], [op_put(key, value)])).succeeded:
                return
        except EtcdUnavailable as e:
            log.debug("heartbeat not written", extra={"error": str(e)})
        await asyncio.sleep(HEARTBEAT_SECONDS)


def new_record(replica_id: str, url: str, peer_url: str, client_url: str) -> ReplicaRecord:
    now = time.time()
    return ReplicaRecord(id=replica_id, url=url, peer_url=peer_url, client_url=client_url,
                         version=__version__, started=now, seen=now)


async def record(client: EtcdClient, replica_id: str) -> ReplicaRecord | None:
    kv = await client.get(keys.replica(replica_id), serializable=True)
    if kv is None:
        return None
    try:
        return _decode(kv.value)
    except msgspec.DecodeError:
        return None


def moved(old: ReplicaRecord | None, new: ReplicaRecord) -> dict[str, tuple[str, str]]:
    """The addresses that differ between a replica's previous record and its new one."""
    if old is None:
        return {}
    return {f: (getattr(old, f), getattr(new, f)) for f in ("url", "peer_url", "client_url")
            if getattr(old, f) != getattr(new, f)}


async def all_records(client: EtcdClient) -> dict[str, ReplicaRecord]:
    # Serializable: the local member answers even without quorum, which is
    # when an admin most needs to see the replicas.
    _, kvs = await client.range_prefix(keys.REPLICA, serializable=True)
    out = {}
    for kv in kvs:
        try:
            record = _decode(kv.value)
        except msgspec.DecodeError:
            continue
        out[record.id] = record
    return out


async def forget(client: EtcdClient, replica_id: str) -> None:
    await client.txn([], [op_delete(keys.replica(replica_id))])
