"""Group commit (meta/txn_group.py) against a real etcd: transactions that wait together go in one,
and each still means what it meant alone (its own comparisons, its own failure reads, its order)."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from moorage.meta.etcd import EtcdClient, EtcdUnavailable, cmp_absent, cmp_value, op_delete, op_get, op_put
from moorage.meta.txn_group import TxnGroup

from conftest import Registry

pytestmark = pytest.mark.cluster


def run(reg: Registry, scenario) -> None:
    async def main() -> None:
        client = reg.etcd_client()
        try:
            await scenario(client, TxnGroup(client), f"/test-group/{secrets.token_hex(4)}/".encode())
        finally:
            await client.close()
    asyncio.run(main())


def test_concurrent_transactions_share_one_revision(registry):
    async def scenario(client: EtcdClient, group: TxnGroup, root: bytes) -> None:
        keys = [root + b"k%d" % i for i in range(20)]
        results = await asyncio.gather(*(group.txn([cmp_absent(k)], [op_put(k, k), op_put(k + b"-2", b"x")])
                                         for k in keys))
        assert all(r.succeeded for r in results)
        assert len({r.revision for r in results}) == 1, "the 20 waiting writes were not sent together"
        assert all(len(r.responses) == 2 and r.responses[0].HasField("response_put") for r in results)
        for k in keys:
            kv = await client.get(k)
            assert kv is not None and kv.value == k and kv.mod_revision == results[0].revision
    run(registry, scenario)


def test_a_failed_comparison_fails_only_its_own_transaction(registry):
    async def scenario(client: EtcdClient, group: TxnGroup, root: bytes) -> None:
        taken = root + b"taken"
        await client.put(taken, b"someone")
        others = [root + b"free%d" % i for i in range(8)]
        loser, *winners = await asyncio.gather(
            group.txn([cmp_absent(taken)], [op_put(taken, b"me")], [op_get(taken)]),
            *(group.txn([cmp_absent(k)], [op_put(k, b"v")], [op_get(k)]) for k in others))
        assert not loser.succeeded
        assert loser.responses[0].response_range.kvs[0].value == b"someone", "its own failure read"
        assert (await client.get(taken)).value == b"someone"
        assert all(w.succeeded for w in winners)
        assert [(await client.get(k)).value for k in others] == [b"v"] * len(others)
    run(registry, scenario)


def test_writes_to_one_key_keep_their_order(registry):
    """Two writes of one key, or a write and a comparison of it, never go in one transaction:
    etcd refuses a key written twice, and a comparison would see the key before the write."""
    async def scenario(client: EtcdClient, group: TxnGroup, root: bytes) -> None:
        key = root + b"k"
        first, second, compared = await asyncio.gather(
            group.txn([], [op_put(key, b"1")]),
            group.txn([], [op_put(key, b"2")]),
            group.txn([cmp_value(key, b"2")], [op_put(root + b"saw-2", b"yes")]))
        assert first.succeeded and second.succeeded and compared.succeeded
        assert first.revision < second.revision <= compared.revision
        assert (await client.get(key)).value == b"2"
        assert (await client.get(root + b"saw-2")).value == b"yes"
    run(registry, scenario)


def test_ranges_and_large_writes_go_alone(registry):
    async def scenario(client: EtcdClient, group: TxnGroup, root: bytes) -> None:
        await client.put(root + b"p/a", b"1")
        await client.put(root + b"p/b", b"1")
        deleted, put = await asyncio.gather(group.txn([], [op_delete(root + b"p/", prefix=True)]),
                                            group.txn([], [op_put(root + b"q", b"1")]))
        assert deleted.succeeded and deleted.responses[0].response_delete_range.deleted == 2
        assert put.succeeded and deleted.revision != put.revision
        # A write over etcd's request limit goes alone, so only its own writer sees it refused.
        results = await asyncio.gather(group.txn([], [op_put(root + b"r1", b"1")]),
                                       group.txn([], [op_put(root + b"r2", b"1")]),
                                       group.txn([], [op_put(root + b"r3", b"x" * (11 << 20))]),
                                       group.txn([], [op_put(root + b"r4", b"1")]),
                                       return_exceptions=True)
        assert isinstance(results[2], EtcdUnavailable)
        assert all(r.succeeded for i, r in enumerate(results) if i != 2)
    run(registry, scenario)


def test_many_comparisons_are_split_below_etcds_limit(registry):
    """A manifest's write compares every blob it names: 30 such writes waiting together hold more
    comparisons than etcd takes in one transaction (--max-txn-ops), so they go in several."""
    async def scenario(client: EtcdClient, group: TxnGroup, root: bytes) -> None:
        results = await asyncio.gather(*(
            group.txn([cmp_absent(root + b"m%d/blob%d" % (i, j)) for j in range(400)],
                      [op_put(root + b"m%d" % i, b"v")])
            for i in range(30)))
        assert all(r.succeeded for r in results)
        assert 1 < len({r.revision for r in results}) < 30, "neither one joint transaction nor none"
    run(registry, scenario)


def test_a_stopping_process_answers_every_waiting_writer(registry):
    """The sending task cancelled (the process stops) with writes in flight and waiting: each
    writer hears that its write was cut off, none waits forever."""
    async def scenario(client: EtcdClient, group: TxnGroup, root: bytes) -> None:
        writes = [asyncio.ensure_future(group.txn([], [op_put(root + b"k%d" % i, b"v")])) for i in range(10)]
        await asyncio.sleep(0)  # every write is waiting
        await asyncio.sleep(0)  # and the first batch is on its way to etcd
        assert group._sending is not None
        group._sending.cancel()
        results = await asyncio.wait_for(asyncio.gather(*writes, return_exceptions=True), 5)
        assert all(isinstance(r, EtcdUnavailable) and "cut off" in str(r) for r in results), results
    run(registry, scenario)


def test_a_write_etcd_refuses_fails_alone(registry):
    """A put under a lease etcd does not know makes etcd refuse the whole joint transaction:
    each member is then sent alone, and only that one fails."""
    async def scenario(client: EtcdClient, group: TxnGroup, root: bytes) -> None:
        others = [root + b"k%d" % i for i in range(6)]
        results = await asyncio.gather(
            *(group.txn([], [op_put(k, b"v")]) for k in others[:3]),
            group.txn([], [op_put(root + b"leased", b"v", lease=0x7EADBEEF)]),
            *(group.txn([], [op_put(k, b"v")]) for k in others[3:]),
            return_exceptions=True)
        assert isinstance(results[3], EtcdUnavailable) and "lease" in str(results[3]), results[3]
        assert all(r.succeeded for i, r in enumerate(results) if i != 3), results
        assert [(await client.get(k)).value for k in others] == [b"v"] * len(others)
    run(registry, scenario)
