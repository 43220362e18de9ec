"""The parent's watch relayed to its workers (cluster/index_relay.py), against a real etcd.

A parent Index watches and relays; a worker Index follows it through a queue
that keeps the channel's order and its msgpack encoding. Each test breaks when
its rule does: a follower that loads before it is on the list misses changes,
one that ignores a reload keeps deleted keys, one that applies a split batch
frame by frame shows half a transaction.
"""

from __future__ import annotations

import asyncio
import secrets

import msgspec
import pytest

from moorage.cluster.index_relay import BATCH, FRAME_BYTES, HEALTH, Follower, WatchRelay
from moorage.meta import keys
from moorage.meta.etcd import EtcdClient, EtcdUnavailable, op_delete, op_put
from moorage.meta.index import Index

from conftest import Registry, scratch

pytestmark = pytest.mark.cluster


class Pair:
    """A parent index that watches, relaying to a follower index, as cluster/workers.py wires them."""

    def __init__(self, client: EtcdClient):
        self.client = client
        self.parent = Index(client)
        self.worker = Index(client)
        self.follower = Follower(self.worker)
        self.following = False
        self.sent: list[dict] = []
        # By the worker, each with its watch health after it and how many tags `watching` it showed.
        self.handled: list[tuple[dict, bool, int]] = []
        self.watching = ""
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.parent.relay = WatchRelay(self._send)
        self._tasks: list[asyncio.Task] = []

    def _shown(self) -> int:
        repo = self.worker.repos.get(self.watching)
        return len(repo.tags) if repo is not None else 0

    def _send(self, message: dict) -> None:
        if self.following:
            self.sent.append(message)
            self._queue.put_nowait(msgspec.msgpack.encode(message))

    async def _ask(self) -> None:
        await asyncio.sleep(0)   # a call's round trip: the parent answers in a task of its own
        self.following = True

    async def _read(self) -> None:
        while True:
            message = msgspec.msgpack.decode(await self._queue.get())
            await self.follower.handle(message)
            self.handled.append((message, self.worker.watch_healthy, self._shown()))

    async def start_parent(self) -> None:
        await self.parent.load()
        self._tasks.append(asyncio.create_task(self.parent.watch()))

    async def start_worker(self) -> None:
        self._tasks.append(asyncio.create_task(self._read()))
        await self.follower.start(self._ask)

    async def until(self, done, what: str, timeout: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not done():
            assert asyncio.get_running_loop().time() < deadline, f"not within {timeout:.0f} s: {what}"
            await asyncio.sleep(0.01)

    async def settled(self, revision: int, timeout: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while self.parent.applied < revision or self.worker.applied < revision or not self._queue.empty():
            assert asyncio.get_running_loop().time() < deadline, \
                f"parent at {self.parent.applied}, worker at {self.worker.applied}, waiting for {revision}"
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def view(index: Index, names: set[str]) -> dict:
    return {name: (sorted(r.blobs), dict(r.tags)) for name, r in index.repos.items() if name in names}


def run(reg: Registry, scenario) -> None:
    async def main() -> None:
        client = reg.etcd_client()
        pair = Pair(client)
        try:
            await scenario(pair, f"relay-{secrets.token_hex(4)}")
        finally:
            await pair.stop()
            await client.close()
    asyncio.run(main())


@pytest.fixture(scope="module")
def alone(request):
    reg = Registry(scratch(request, "relay") / "data", extra_args=["--workers", "1"]).start()
    yield reg
    reg.stop()


def link(repo: str, digest: str) -> bytes:
    return keys.REPO + f"{repo}@blob/{digest}".encode()


def test_a_worker_that_starts_while_writes_go_on_misses_none(alone):
    async def scenario(pair: Pair, name: str) -> None:
        await pair.start_parent()
        repos = {f"{name}/r{i}" for i in range(4)}
        last = 0

        async def writer(repo: str) -> None:
            nonlocal last
            for n in range(60):
                digest = f"sha256:{n:064x}"
                last = max(last, await pair.client.put(link(repo, digest), b""))
                if n % 3 == 0:
                    last = max(last, await pair.client.put(keys.REPO + f"{repo}@tag/t{n % 7}".encode(),
                                                           digest.encode()))
                if n % 5 == 0:
                    last = max(last, (await pair.client.txn(
                        success=[op_put(link(repo, f"sha256:{n:064x}"), b"again")])).revision)
                await asyncio.sleep(0.01)   # writing for about a second: the worker joins in the middle
        writers = [asyncio.create_task(writer(r)) for r in sorted(repos)]
        await asyncio.sleep(0.3)
        await pair.start_worker()
        assert not all(w.done() for w in writers), "the writers were done before the worker joined"
        await asyncio.gather(*writers)
        await pair.settled(last)
        assert len(view(pair.parent, repos)) == 4
        assert view(pair.worker, repos) == view(pair.parent, repos)
        assert pair.worker.watch_healthy
    run(alone, scenario)


def test_a_reload_of_the_parent_reloads_the_worker(alone):
    """Changes the parent's watch never saw (it fell behind compaction, and reloaded) reach the
    worker through its own reload."""
    async def scenario(pair: Pair, name: str) -> None:
        await pair.start_parent()
        await pair.start_worker()
        repo = f"{name}/gone"
        digest = "sha256:" + "ab" * 32
        await pair.settled(await pair.client.put(link(repo, digest), b""))
        assert view(pair.worker, {repo}) == {repo: ([digest], {})}
        # The watch stops, the link goes while it is away, then the view is reloaded.
        await pair.stop()
        pair._tasks = []
        await pair.client.txn(success=[op_delete(link(repo, digest))])
        await pair.parent.load()
        assert repo not in pair.parent.repos
        pair._tasks.append(asyncio.create_task(pair._read()))
        pair._tasks.append(asyncio.create_task(pair.parent.watch()))
        await pair.settled(pair.parent.applied)
        assert view(pair.worker, {repo}) in ({}, {repo: ([], {})})
        # And the relay goes on after it.
        await pair.settled(await pair.client.put(link(repo, digest), b""))
        assert view(pair.worker, {repo}) == {repo: ([digest], {})}
    run(alone, scenario)


def test_a_batch_too_big_for_one_frame_is_applied_whole(alone):
    async def scenario(pair: Pair, name: str) -> None:
        await pair.start_parent()
        await pair.start_worker()
        repo = pair.watching = f"{name}/big"
        value = b"x" * (FRAME_BYTES // 2 + 1)
        tags = [f"t{i}" for i in range(5)]
        result = await pair.client.txn(success=[op_put(keys.REPO + f"{repo}@tag/{t}".encode(), value)
                                                for t in tags])
        await pair.settled(result.revision)
        frames = [m for m in pair.sent if m["t"] == BATCH and any(e[2] == result.revision for e in m["e"])]
        assert len(frames) >= 3 and all(m.get("more") for m in frames[:-1]) and not frames[-1].get("more")
        assert max(len(msgspec.msgpack.encode(m)) for m in frames) < 2 * FRAME_BYTES
        assert pair.worker.repos[repo].tags.keys() == set(tags)
        assert [shown for message, _, shown in pair.handled
                if message["t"] == BATCH and any(e[2] == result.revision for e in message["e"])
                ] == [0] * (len(frames) - 1) + [len(tags)], "the worker showed part of one transaction"
        assert pair.worker.applied >= result.revision
    run(alone, scenario)


def test_the_parents_watch_going_down_and_up_is_the_workers(alone):
    """The parent's watch stream breaks (as when its connection to etcd does), then comes back:
    the worker's watch health follows the parent's, and the relay goes on."""
    async def scenario(pair: Pair, name: str) -> None:
        real = pair.client.watch_prefix
        breaks = asyncio.Event()

        async def breakable(prefix: bytes, start: int):
            async for item in real(prefix, start):
                if breaks.is_set():
                    breaks.clear()
                    raise EtcdUnavailable("the stream broke (the test broke it)")
                yield item
        pair.client.watch_prefix = breakable
        await pair.start_parent()
        await pair.start_worker()
        assert pair.worker.watch_healthy
        await pair.until(lambda: pair.parent.watch_healthy, "the parent's watch in place")  # what breaks works
        breaks.set()
        revision = await pair.client.put(link(f"{name}/r", "sha256:" + "ab" * 32), b"")
        await pair.settled(revision)
        states = [healthy for _, healthy, _ in pair.handled]
        assert False in states and states[-1], states
        healths = [m["ok"] for m in pair.sent if m["t"] == HEALTH]
        assert False in healths and True in healths[healths.index(False):], healths
        assert f"{name}/r" in pair.worker.repos, "the change that met the break, delivered after it"
    run(alone, scenario)
