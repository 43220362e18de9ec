"""A small typed etcd v3 client: the one interface Moorage has to its DCS.

It speaks gRPC through the stubs aetcd ships, because aetcd's own client
hides what Moorage needs (response revisions, paged ranges at a revision,
progress-notified watches, learners). Every call has a deadline; gRPC
failures surface as `EtcdUnavailable` so callers can degrade instead of crash.

Every client carries its TLS identity (`EtcdTls`) explicitly: etcd runs with
client-certificate authentication, and a client of another member
(`sibling`) reuses the same identity, so there is no global channel setting
to forget.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from aetcd import rpc

from moorage.metrics import Metrics

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0
# The `op` label of moorage_etcd_request_duration_seconds: what a call asks of etcd.
OPS = ("get", "revision", "range", "put", "txn", "lease", "status", "cluster")
# A gRPC message must fit etcd's request limit (1.5 MiB by default) and ours.
MAX_MESSAGE = 16 << 20


class EtcdUnavailable(Exception):
    """etcd did not answer in time, or has no quorum."""


class EtcdRefused(EtcdUnavailable):
    """etcd refused the request itself (a lease it does not know, too many operations, too
    large): another request may succeed at once. Raised as EtcdUnavailable to callers."""


# The gRPC codes etcd answers a request it refuses for what it holds, not for its own state.
_REFUSALS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                       grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE,
                       grpc.StatusCode.RESOURCE_EXHAUSTED})


class EtcdCompacted(Exception):
    """A watch asked for history etcd has already compacted away."""


@dataclass(frozen=True, slots=True)
class KV:
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int


@dataclass(frozen=True, slots=True)
class Event:
    deleted: bool
    kv: KV


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key that starts with `prefix`."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def _kv(kv) -> KV:
    return KV(kv.key, kv.value, kv.mod_revision, kv.create_revision)


# Operations and comparisons for transactions. Kept as plain request messages
# so a transaction is built in one place and sent in one round trip.

def op_put(key: bytes, value: bytes, lease: int = 0) -> rpc.RequestOp:
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease))


def op_delete(key: bytes, prefix: bool = False) -> rpc.RequestOp:
    req = rpc.DeleteRangeRequest(key=key)
    if prefix:
        req.range_end = prefix_end(key)
    return rpc.RequestOp(request_delete_range=req)


def op_get(key: bytes) -> rpc.RequestOp:
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key))


def op_txn(compare: Sequence, success: Sequence = (), failure: Sequence = ()) -> rpc.RequestOp:
    """A nested transaction: its comparisons decide only its own operations."""
    return rpc.RequestOp(request_txn=rpc.TxnRequest(
        compare=list(compare), success=list(success), failure=list(failure)))


def cmp_value(key: bytes, value: bytes) -> rpc.Compare:
    return rpc.Compare(key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.VALUE, value=value)


def cmp_exists(key: bytes) -> rpc.Compare:
    return rpc.Compare(key=key, result=rpc.Compare.GREATER, target=rpc.Compare.VERSION, version=0)


def cmp_absent(key: bytes) -> rpc.Compare:
    return rpc.Compare(key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.VERSION, version=0)


def cmp_mod_revision(key: bytes, revision: int) -> rpc.Compare:
    return rpc.Compare(key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.MOD,
                       mod_revision=revision)


def cmp_create_revision(key: bytes, revision: int) -> rpc.Compare:
    """The key is the one created at `revision`, however often rewritten since."""
    return rpc.Compare(key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE,
                       create_revision=revision)


def cmp_prefix_unchanged(prefix: bytes, revision: int) -> rpc.Compare:
    """No key under `prefix` was created or modified after `revision` (deletions go unseen)."""
    return rpc.Compare(key=prefix, range_end=prefix_end(prefix), result=rpc.Compare.LESS,
                       target=rpc.Compare.MOD, mod_revision=revision + 1)


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int
    responses: list


@dataclass(frozen=True, slots=True)
class EtcdTls:
    """The files of mutual TLS with etcd: the cluster CA, and this replica's node certificate.

    etcd refuses every client (and peer) without a certificate from the
    cluster CA, so a process on the same machine without one reads nothing.
    """

    ca: Path
    cert: Path
    key: Path

    def credentials(self) -> grpc.ChannelCredentials:
        try:
            return grpc.ssl_channel_credentials(root_certificates=self.ca.read_bytes(),
                                                private_key=self.key.read_bytes(),
                                                certificate_chain=self.cert.read_bytes())
        except OSError as e:
            raise EtcdUnavailable(f"cannot read the etcd TLS files: {e}") from None


def endpoint_of(url: str) -> str:
    """gRPC's `host:port` target for a client URL as etcd lists it (`https://host:port`)."""
    return url.split("://", 1)[-1].rstrip("/")


class EtcdClient:
    def __init__(self, endpoint: str, tls: EtcdTls | None, timeout: float = DEFAULT_TIMEOUT,
                 on_write: Callable[[int], None] | None = None, metrics: Metrics | None = None):
        """`tls` None speaks plaintext: only for tests that show etcd refuses it. `on_write` hears
        the revision of every write etcd acknowledged, before the caller does (meta/index.py's
        peers: read-your-writes across a replica's processes). With `metrics`, every call is
        timed (moorage_etcd_request_duration_seconds, by op)."""
        self.endpoint = endpoint
        self.tls = tls
        self.timeout = timeout
        self.on_write = on_write
        self.metrics = metrics
        self._seconds = {op: metrics.etcd_seconds.labels(op) for op in OPS} if metrics is not None else None
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        if tls is None:
            self._channel = grpc.aio.insecure_channel(endpoint, options=options)
        else:
            self._channel = grpc.aio.secure_channel(endpoint, tls.credentials(), options=options)
        self._kv = rpc.KVStub(self._channel)
        self._watch = rpc.WatchStub(self._channel)
        self._cluster = rpc.ClusterStub(self._channel)
        self._maintenance = rpc.MaintenanceStub(self._channel)
        self._lease = rpc.LeaseStub(self._channel)

    def sibling(self, url: str, timeout: float | None = None) -> "EtcdClient":
        """A client of another member (by its client URL), with this client's TLS identity."""
        return EtcdClient(endpoint_of(url), self.tls, timeout or self.timeout, self.metrics)

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, op: str, method, request, timeout: float | None = None):
        started = time.perf_counter()
        try:
            return await method(request, timeout=timeout or self.timeout)
        except grpc.aio.AioRpcError as e:
            kind = EtcdRefused if e.code() in _REFUSALS else EtcdUnavailable
            raise kind(f"etcd at {self.endpoint}: {e.code().name}: {e.details()}") from e
        except asyncio.TimeoutError as e:  # pragma: no cover - grpc reports DEADLINE_EXCEEDED
            raise EtcdUnavailable(f"etcd at {self.endpoint}: timed out") from e
        finally:
            if self._seconds is not None:
                self._seconds[op].observe(time.perf_counter() - started)

    async def get(self, key: bytes, serializable: bool = False) -> KV | None:
        resp = await self._call("get", self._kv.Range, rpc.RangeRequest(key=key, serializable=serializable))
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def revision(self) -> int:
        """The cluster's current revision, read linearizably (one ReadIndex round)."""
        resp = await self._call("revision", self._kv.Range, rpc.RangeRequest(key=b"\0", count_only=True))
        return resp.header.revision

    async def range_prefix(self, prefix: bytes, revision: int = 0, page: int = 1000,
                           serializable: bool = False) -> tuple[int, list[KV]]:
        """Every key under `prefix` at one revision, fetched page by page."""
        end = prefix_end(prefix)
        key, out = prefix, []
        while True:
            resp = await self._call("range", self._kv.Range, rpc.RangeRequest(
                key=key, range_end=end, limit=page, revision=revision, serializable=serializable))
            revision = revision or resp.header.revision
            out.extend(_kv(kv) for kv in resp.kvs)
            if not resp.more or not resp.kvs:
                return revision, out
            key = resp.kvs[-1].key + b"\0"

    async def range_pages(self, prefix: bytes, revision: int, page: int = 5000) -> AsyncIterator[list]:
        """Every key under `prefix` at `revision`, one page of raw KeyValues at a time,
        for a reader that keeps less than the whole range (garbage collection's mark)."""
        end = prefix_end(prefix)
        key = prefix
        while True:
            resp = await self._call("range", self._kv.Range, rpc.RangeRequest(
                key=key, range_end=end, limit=page, revision=revision))
            if resp.kvs:
                yield resp.kvs
            if not resp.more or not resp.kvs:
                return
            key = resp.kvs[-1].key + b"\0"

    async def put(self, key: bytes, value: bytes) -> int:
        resp = await self._call("put", self._kv.Put, rpc.PutRequest(key=key, value=value))
        self._wrote(resp.header.revision)
        return resp.header.revision

    async def txn(self, compare: Sequence = (), success: Sequence = (), failure: Sequence = ()
                  ) -> TxnResult:
        resp = await self._call("txn", self._kv.Txn, rpc.TxnRequest(
            compare=list(compare), success=list(success), failure=list(failure)))
        self._wrote(resp.header.revision)
        return TxnResult(resp.succeeded, resp.header.revision, list(resp.responses))

    async def watch_prefix(self, prefix: bytes, start_revision: int
                           ) -> AsyncIterator[tuple[int, list[Event]]]:
        """Yield (revision, events) from `start_revision` on, forever; first (0, []) once the
        watch is in place.

        With progress notification on, an empty batch says every event up to
        its revision has been delivered; that is what lets readers prove the
        in-memory index is current.
        """
        create = rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
            key=prefix, range_end=prefix_end(prefix), start_revision=start_revision,
            progress_notify=True))
        requests: asyncio.Queue = asyncio.Queue()
        await requests.put(create)

        async def request_iter():
            while True:
                item = await requests.get()
                if item is None:
                    return
                yield item

        call = self._watch.Watch(request_iter())
        try:
            async for resp in call:
                if resp.compact_revision:
                    raise EtcdCompacted(f"history before {resp.compact_revision} is compacted")
                if resp.canceled:
                    raise EtcdUnavailable(f"watch canceled: {resp.cancel_reason}")
                if resp.created and not resp.events:
                    # The watch is in place (revision 0: nothing is known delivered yet; the
                    # events from start_revision on follow).
                    yield 0, []
                    continue
                events = [Event(ev.type == rpc.Event.DELETE, _kv(ev.kv)) for ev in resp.events]
                if resp.fragment:
                    continue  # never requested; fragments would need reassembly
                yield resp.header.revision, events
        except grpc.aio.AioRpcError as e:
            raise EtcdUnavailable(f"watch on {self.endpoint}: {e.code().name}: {e.details()}") from e
        finally:
            await requests.put(None)
            call.cancel()

    async def grant_lease(self, ttl: int) -> int:
        resp = await self._call("lease", self._lease.LeaseGrant, rpc.LeaseGrantRequest(TTL=ttl))
        if resp.error:
            raise EtcdUnavailable(f"lease grant refused: {resp.error}")
        return resp.ID

    async def keep_alive(self, lease: int) -> int:
        """Renew a lease once; returns its new TTL (0: it has expired, everything under it is gone)."""
        call = self._lease.LeaseKeepAlive(iter([rpc.LeaseKeepAliveRequest(ID=lease)]),
                                          timeout=self.timeout)
        try:
            async for resp in call:
                return resp.TTL
        except grpc.aio.AioRpcError as e:
            raise EtcdUnavailable(f"lease keep-alive on {self.endpoint}: {e.code().name}") from e
        finally:
            call.cancel()
        return 0

    async def revoke_lease(self, lease: int) -> None:
        """End a lease now, deleting every key under it."""
        resp = await self._call("lease", self._lease.LeaseRevoke, rpc.LeaseRevokeRequest(ID=lease))
        self._wrote(resp.header.revision)

    def _wrote(self, revision: int) -> None:
        if self.on_write is not None:
            self.on_write(revision)

    async def status(self):
        return await self._call("status", self._maintenance.Status, rpc.StatusRequest())

    async def snapshot(self, timeout: float = 3600.0) -> AsyncIterator[bytes]:
        """The member's backend as etcd's Maintenance.Snapshot streams it, chunk by chunk.

        It is one consistent view of the whole keyspace, taken without
        stopping anything; etcd appends a sha256 of the data as its last 32
        bytes, which `etcdctl snapshot restore` checks. A long deadline, not
        the usual few seconds: a large database takes a while to stream.
        """
        call = self._maintenance.Snapshot(rpc.SnapshotRequest(), timeout=timeout)
        try:
            async for resp in call:
                if resp.blob:
                    yield resp.blob
        except grpc.aio.AioRpcError as e:
            raise EtcdUnavailable(f"snapshot from {self.endpoint}: {e.code().name}: {e.details()}") from e
        finally:
            call.cancel()

    async def call_cluster(self, method: str, request):
        """A Cluster service call (MemberAdd, MemberPromote, MemberRemove)."""
        return await self._call("cluster", getattr(self._cluster, method), request)

    async def members(self):
        resp = await self._call("cluster", self._cluster.MemberList, rpc.MemberListRequest())
        return list(resp.members)
