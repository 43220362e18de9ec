"""Group commit: transactions that arrive while one is in flight go to etcd together in the next.

Every etcd transaction costs the same whatever it holds: a gRPC round trip, a
raft proposal, a WAL fsync, and one watch message to every process watching
(each worker's index, the replica's own). Concurrent pushes each commit one
small transaction, so under load that fixed cost is most of etcd's work and a
good share of the workers'. Sent together, N transactions pay it once. A
transaction that finds none in flight is sent at once: no writer waits for a
batch to fill.

Transactions go together only when one joint transaction means the same as
sending them one after another in any order: each compares and writes single
keys (no ranges, reads or nested transactions), and none writes a key that
another compares or writes. The joint transaction holds every comparison; if
one fails, nothing is written, and each member is sent again alone, to succeed
or fail on its own, with its own failure reads; so is each member of a joint
transaction etcd refuses for what one of them holds. A member that overlaps an
earlier waiting one waits for the next round, so writes to one key keep their
order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from moorage.meta.etcd import EtcdClient, EtcdRefused, EtcdUnavailable, TxnResult

# etcd's own limits are far above these (cluster/etcd_member.py: --max-txn-ops, which
# bounds the comparisons and the operations of a transaction each, and --max-request-bytes);
# these keep one joint request, and its wait, small. A member over them goes alone.
MAX_MEMBERS = 64
MAX_OPS = 2000
MAX_BYTES = 1 << 20


@dataclass(slots=True)
class _Member:
    compare: list
    success: list
    failure: list
    compared: frozenset[bytes]
    written: frozenset[bytes]
    size: int
    done: asyncio.Future


def _keys(compare: Sequence, success: Sequence) -> tuple[frozenset[bytes], frozenset[bytes], int] | None:
    """The keys a transaction compares and writes, and its size; None when it may not join others."""
    compared, written, size = set(), set(), 0
    for c in compare:
        if c.range_end:
            return None
        compared.add(c.key)
        size += len(c.key) + len(c.value)
    for op in success:
        kind = op.WhichOneof("request")
        if kind == "request_put":
            key = op.request_put.key
            size += len(key) + len(op.request_put.value)
        elif kind == "request_delete_range" and not op.request_delete_range.range_end:
            key = op.request_delete_range.key
            size += len(key)
        else:
            return None
        if key in written:
            return None  # etcd refuses a transaction that writes one key twice
        written.add(key)
    return frozenset(compared), frozenset(written), size


class TxnGroup:
    def __init__(self, client: EtcdClient):
        self.client = client
        self._waiting: list[_Member] = []
        self._sending: asyncio.Task | None = None

    async def txn(self, compare: Sequence = (), success: Sequence = (), failure: Sequence = ()) -> TxnResult:
        """EtcdClient.txn's meaning, sent with whatever other transactions are waiting."""
        found = _keys(compare, success)
        if found is None or not success:
            return await self.client.txn(compare, success, failure)
        done = asyncio.get_running_loop().create_future()
        self._waiting.append(_Member(list(compare), list(success), list(failure), *found, done))
        if self._sending is None:
            self._sending = asyncio.create_task(self._send())
        return await done

    def _take(self) -> list[_Member]:
        """The longest run of waiting members, oldest first, that may go together."""
        compared: set[bytes] = set()
        written: set[bytes] = set()
        size = compares = ops = taken = 0
        for m in self._waiting:
            if taken and (taken >= MAX_MEMBERS or size + m.size > MAX_BYTES
                          or compares + len(m.compare) > MAX_OPS or ops + len(m.success) > MAX_OPS
                          or m.written & written or m.written & compared or m.compared & written):
                break
            compared |= m.compared
            written |= m.written
            size += m.size
            compares += len(m.compare)
            ops += len(m.success)
            taken += 1
        batch, self._waiting = self._waiting[:taken], self._waiting[taken:]
        return batch

    async def _send(self) -> None:
        batch: list[_Member] = []
        try:
            while self._waiting:
                batch = self._take()
                if len(batch) == 1:
                    await self._alone(batch[0])
                else:
                    await self._together(batch)
        finally:
            self._sending = None
            # Cancelled (the process is stopping): no writer waits forever for an answer.
            cut_off, self._waiting = batch + self._waiting, []
            for m in cut_off:
                _fail(m, EtcdUnavailable("the write was cut off: the process is stopping"))

    async def _alone(self, m: _Member) -> None:
        try:
            _settle(m, await self.client.txn(m.compare, m.success, m.failure))
        except Exception as e:  # noqa: BLE001 - the writer raises it, as if it had sent alone
            _fail(m, e)

    async def _together(self, batch: list[_Member]) -> None:
        joint: TxnResult | None = None
        try:
            joint = await self.client.txn([c for m in batch for c in m.compare],
                                          [op for m in batch for op in m.success])
        except EtcdRefused:
            pass   # refused for what one member holds (a lease etcd no longer knows)
        except Exception as e:  # noqa: BLE001 - each writer raises it, as if it had sent alone
            for m in batch:
                _fail(m, e)
            return
        if joint is None or not joint.succeeded:
            # Refused, or some comparison failed and etcd does not say whose: each on its own.
            await asyncio.gather(*(self._alone(m) for m in batch))
            return
        at = 0
        for m in batch:
            _settle(m, TxnResult(True, joint.revision, joint.responses[at:at + len(m.success)]))
            at += len(m.success)


def _settle(m: _Member, result: TxnResult) -> None:
    if not m.done.done():  # its writer may have been cancelled meanwhile
        m.done.set_result(result)


def _fail(m: _Member, error: Exception) -> None:
    if not m.done.done():
        m.done.set_exception(error)
