"""Worker processes (issue 12): one replica, N processes serving, as one.

Which worker served a request: `/health` names it ("worker": its pid); the
replica hands each new connection to the worker with the fewest open ones,
so a client that holds one connection open and opens a second reaches the
other worker of two.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from conftest import ADMIN_PASSWORD, Registry, scratch, wait_for
from moorage.cluster.shared import Shared
from oci import (OCI_MANIFEST, finish_upload, make_image, new_repo, patch_chunk, pull_blob, push_blob,
                 push_image, range_end, sha256, start_upload)

pytestmark = pytest.mark.cluster

WORKERS = ["--workers", "2"]


def worker_of(client: httpx.Client) -> int:
    r = client.get("/health")
    assert r.status_code == 200, r.text
    return r.json()["worker"]


def one_connection(registry: Registry, local_address: str | None = None, **kw) -> httpx.Client:
    """A client that keeps one connection (from `local_address`, if given)."""
    transport = httpx.HTTPTransport(verify=registry.ssl_context(), local_address=local_address,
                                    limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
    return registry.client(transport=transport, **kw)


@contextlib.contextmanager
def two_workers(registry: Registry, **kw) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    """Two clients, each on one keep-alive connection, served by different workers."""
    a = one_connection(registry, **kw)
    try:
        wa = worker_of(a)
        for _ in range(10):
            b = one_connection(registry, **kw)
            try:
                if worker_of(b) != wa:
                    yield a, b
                    return
            finally:
                b.close()
        raise AssertionError("ten new connections all reached the worker of the first")
    finally:
        a.close()


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def replica_with(tmp_path):
    """A replica of the test's own, started with the given options; killed if still running."""
    started: list[Registry] = []

    def start(extra_args: list[str]) -> Registry:
        reg = Registry(tmp_path / f"data{len(started)}", extra_args=extra_args).start()
        started.append(reg)
        return reg
    yield start
    for reg in started:
        if reg.proc is not None and reg.proc.poll() is None:
            reg.kill9()


@pytest.fixture(scope="module")
def two(request):
    reg = Registry(scratch(request, "workers") / "data", extra_args=WORKERS).start()
    yield reg
    reg.stop()


def test_read_your_writes_across_workers(two):
    """A push acknowledged by one worker is there on the very next request to the other, 200 times."""
    repo = new_repo("ryw")
    misses = 0
    with two_workers(two) as (a, b):
        for i in range(200):
            writer, reader = (a, b) if i % 2 == 0 else (b, a)
            image = make_image(n_layers=1, layer_size=64)
            push_image(writer, repo, f"t{i}", image)
            if reader.get(f"/v2/{repo}/manifests/t{i}", headers={"Accept": OCI_MANIFEST}).status_code != 200:
                misses += 1
            if reader.head(f"/v2/{repo}/blobs/{sha256(image.layers[0])}").status_code != 200:
                misses += 1
            if f"t{i}" not in reader.get(f"/v2/{repo}/tags/list").json()["tags"]:
                misses += 1
        assert worker_of(a) != worker_of(b)  # each kept its connection, on its worker, throughout
    assert misses == 0


def test_upload_chunks_on_different_workers(two):
    repo = new_repo("chunks")
    data = os.urandom(5 * 256 * 1024 + 17)
    chunk = 256 * 1024
    with two_workers(two) as (a, b):
        location = start_upload(a, repo)
        offset = 0
        for client, other in [(a, b), (b, a), (a, b), (b, a), (a, b)]:
            location = patch_chunk(client, location, data[offset:offset + chunk], offset)
            offset += chunk
            # Each worker caches the sessions it touched: the other's chunk must show at once.
            assert range_end(other.get(location)) == offset
        digest = finish_upload(b, location, sha256(data), data[offset:])
        assert pull_blob(a, repo, digest) == data
        assert pull_blob(b, repo, digest) == data
        assert worker_of(a) != worker_of(b)


def test_one_writer_per_upload_across_workers(two):
    """Two PATCHes at the same offset at once, on two workers: one is taken, the other refused."""
    repo = new_repo("race")
    first, second = os.urandom(4 << 20), os.urandom(4 << 20)
    with two_workers(two) as (a, b):
        location = start_upload(a, repo)
        results: dict[str, int] = {}

        def send(name: str, client: httpx.Client, data: bytes) -> None:
            r = client.patch(location, content=data, headers={
                "Content-Type": "application/octet-stream", "Content-Range": f"0-{len(data) - 1}"})
            results[name] = r.status_code
        threads = [threading.Thread(target=send, args=("a", a, first)),
                   threading.Thread(target=send, args=("b", b, second))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results.values()) == [202, 416], results
        won = first if results["a"] == 202 else second
    with two.client() as c:
        status = c.get(location)
        assert status.headers["Range"] == f"0-{len(won) - 1}"
        finish_upload(c, status.headers.get("Location") or location, sha256(won))
        assert pull_blob(c, repo, sha256(won)) == won


def workers_seen(reg: Registry, connections: int = 4) -> set[int]:
    """The workers that new connections reach; a connection refused or reset (handed to a worker
    in the instant it died) reaches none."""
    seen = set()
    for _ in range(connections):
        try:
            with one_connection(reg) as c:
                seen.add(worker_of(c))
        except httpx.TransportError:
            pass
    return seen


def test_kill_one_worker_under_load(replica_with):
    """kill -9 of one worker while four clients push: it is replaced, the other worker's clients
    go on, and every push that was acknowledged can be pulled, through either worker."""
    reg = replica_with(WORKERS)
    repo = new_repo("kill")
    acknowledged: list[tuple[str, bytes]] = []
    failures: list[str] = []
    wrong: list[str] = []
    stop = threading.Event()

    def pusher():
        with reg.client() as c:
            while not stop.is_set():
                data = os.urandom(2048)
                try:
                    acknowledged.append((push_blob(c, repo, data), data))
                except httpx.TransportError as e:  # a connection on the killed worker
                    failures.append(repr(e))
                except AssertionError as e:  # an answer, but the wrong one: never
                    wrong.append(str(e))
    before = workers_seen(reg)
    assert len(before) == 2
    threads = [threading.Thread(target=pusher) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(acknowledged) >= 20, 30, "pushes under way")
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        at_kill = len(acknowledged)
        wait_for(lambda: len(workers_seen(reg) - before) >= 1, 20, "a new worker in place of the killed one")
        wait_for(lambda: len(acknowledged) >= at_kill + 20, 30, "pushes going on after the kill")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert victim not in workers_seen(reg, 6)
    assert wrong == []
    # Each client had one connection; those on the killed worker broke once (a request in
    # flight), then reconnected to a live one.
    assert len(failures) <= len(threads), failures
    # Through each worker, the new one included: its view, loaded while the pushes went on and
    # fed since by the parent's watch (cluster/index_relay.py), holds every acknowledged blob.
    with two_workers(reg) as (a, b):
        assert victim not in (worker_of(a), worker_of(b))
        for probe in (a, b):
            for digest, data in acknowledged:
                assert pull_blob(probe, repo, digest) == data


def test_kill_9_of_the_replica_leaves_no_process(replica_with):
    reg = replica_with(WORKERS)
    family = descendants(reg.proc.pid)
    assert len(family) >= 3  # two workers (and their fork server) and etcd
    os.kill(reg.proc.pid, signal.SIGKILL)
    reg.proc.wait()
    wait_for(lambda: not any(alive(p) for p in family), 10, "every child of the killed replica gone")


def test_one_worker_is_one_process(replica_with):
    reg = replica_with(["--workers", "1"])
    with reg.client() as c:
        assert worker_of(c) == reg.proc.pid
    names = {open(f"/proc/{p}/comm").read().strip() for p in descendants(reg.proc.pid)}
    assert names == {"etcd"}


def test_sigterm_drains_every_worker(replica_with):
    """SIGTERM while an upload's body is half sent on each worker: both complete (202), the
    replica exits 0, and after a restart both uploads finish with their digests verified."""
    reg = replica_with(WORKERS)
    repo = new_repo("drain")
    first = 6 << 20  # past the storage's 4 MiB flush: the upload's file shows the body arriving
    bodies = [os.urandom(first + (1 << 20)) for _ in range(2)]
    release = threading.Event()
    results: dict[int, httpx.Response | BaseException] = {}

    def body(data: bytes) -> Iterator[bytes]:
        yield data[:first]
        release.wait(30)
        yield data[first:]

    def send(i: int, client: httpx.Client, location: str) -> None:
        try:
            results[i] = client.patch(location, content=body(bodies[i]),
                                      headers={"Content-Type": "application/octet-stream"})
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            results[i] = e

    with two_workers(reg) as (a, b):
        locations = [start_upload(a, repo), start_upload(b, repo)]
        threads = [threading.Thread(target=send, args=(i, c, loc))
                   for i, (c, loc) in enumerate(zip((a, b), locations))]
        for t in threads:
            t.start()
        files = [reg.blob_dir / "uploads" / httpx.URL(loc).path.rsplit("/", 1)[1] for loc in locations]
        wait_for(lambda: all(f.exists() and f.stat().st_size >= 4 << 20 for f in files), 30,
                 "both bodies arriving, one on each worker")
        reg.proc.send_signal(signal.SIGTERM)
        # The listener closes first: a new connection is refused while the two drain.
        wait_for(lambda: not workers_seen(reg, 1), 10, "the listener closed")
        release.set()
        for t in threads:
            t.join()
    for i in (0, 1):
        r = results[i]
        assert isinstance(r, httpx.Response) and r.status_code == 202, r
    assert reg.proc.wait(30) == 0
    reg.start()
    with reg.client() as c:
        for i, loc in enumerate(locations):
            finish_upload(c, results[i].headers.get("Location") or loc, sha256(bodies[i]))
            assert pull_blob(c, repo, sha256(bodies[i])) == bodies[i]


def test_failed_logins_slow_down_per_replica(two):
    """The login slowdown counts failures on every worker together: five failures spread over two
    workers, then the sixth attempt is refused on either."""
    with two_workers(two, local_address="127.0.0.251", auth=None) as (a, b):
        for i in range(5):
            r = (a, b)[i % 2].get("/token", auth=("admin", "wrong-password"))
            assert r.status_code == 401, r.text
        for c in (a, b):
            r = c.get("/token", auth=("admin", ADMIN_PASSWORD))
            assert r.status_code == 429 and "Retry-After" in r.headers, r.text


def test_shared_connection_counts_sum_the_workers_rows():
    """Per-client connection counts: each process writes its own row of the shared block, and
    every process reads the sum, so the cap is per replica; a dead worker's row is cleared."""
    parent = Shared.create(2)
    try:
        w0, w1 = Shared(parent.fd, 2, 0), Shared(parent.fd, 2, 1)
        for _ in range(3):
            w0.client_opened("192.0.2.7")
        w1.client_opened("192.0.2.7")
        w1.client_opened("2001:db8::1")
        assert [s.client_connections("192.0.2.7") for s in (parent, w0, w1)] == [4, 4, 4]
        assert w0.client_connections("2001:db8::1") == 1
        w0.client_closed("192.0.2.7")
        assert w1.client_connections("192.0.2.7") == 3
        parent.reset_worker(0)  # worker 0 died: its connections went with it
        assert w1.client_connections("192.0.2.7") == 1
        # The revision each process saw acknowledged: the newest is what a read waits for.
        w0.wrote(41)
        w1.wrote(40)
        assert parent.newest_write() == 41
    finally:
        os.close(parent.fd)


def test_shared_session_stamps_see_every_processs_change():
    """A session cached under a stamp is stale once another process changed its bucket, and
    nothing is cached while the member is not alone or after a worker died."""
    parent = Shared.create(2)
    try:
        w0, w1 = Shared(parent.fd, 2, 0), Shared(parent.fd, 2, 1)
        upload = "0123456789abcdef0123456789abcdef"
        assert w0.session_stamp(upload) is None  # not known to be alone: no cache
        parent.set_solo(True)
        before = w0.session_stamp(upload)
        mine = w0.session_changed(upload, before)
        assert w0.session_stamp(upload) == mine  # its own change: what it cached stays valid
        w1.session_changed(upload, w1.session_stamp(upload))
        assert w0.session_stamp(upload) != mine
        # A change in between the stamp and the writer's count: the writer's entry is not valid.
        before = w0.session_stamp(upload)
        w1.session_changed(upload, None)
        assert w0.session_changed(upload, before) != w0.session_stamp(upload)
        valid = w1.session_stamp(upload)
        parent.reset_worker(0)  # it may have died between a write and its count
        assert w1.session_stamp(upload) != valid
        valid = w1.session_stamp(upload)
        parent.leave_solo(0.0)
        parent.set_solo(True)  # alone again: another member may have written meanwhile
        assert w1.session_stamp(upload) not in (None, valid)
    finally:
        os.close(parent.fd)
