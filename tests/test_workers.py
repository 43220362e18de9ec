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

from conftest import Registry, wait_for
from oci import (OCI_MANIFEST, finish_upload, make_image, new_repo, patch_chunk, pull_blob, push_blob,
                 push_image, sha256, start_upload)

pytestmark = pytest.mark.cluster

WORKERS = ["--workers", "2"]


def worker_of(client: httpx.Client) -> int:
    r = client.get("/health")
    assert r.status_code == 200, r.text
    return r.json()["worker"]


def one_connection(registry: Registry) -> httpx.Client:
    return registry.client(limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))


@contextlib.contextmanager
def two_workers(registry: Registry) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    """Two clients, each on one keep-alive connection, served by different workers."""
    a = one_connection(registry)
    try:
        wa = worker_of(a)
        for _ in range(10):
            b = one_connection(registry)
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
def two(tmp_path_factory):
    reg = Registry(tmp_path_factory.mktemp("workers") / "data", extra_args=WORKERS).start()
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
        for client in [a, b, a, b, a]:
            location = patch_chunk(client, location, data[offset:offset + chunk], offset)
            offset += chunk
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


def test_kill_one_worker_under_load(replica_with):
    reg = replica_with(WORKERS)
    repo = new_repo("kill")
    acknowledged: list[tuple[str, bytes]] = []
    failures = {"n": 0}
    stop = threading.Event()

    def pusher():
        with reg.client() as c:
            while not stop.is_set():
                data = os.urandom(2048)
                try:
                    acknowledged.append((push_blob(c, repo, data), data))
                except (httpx.HTTPError, AssertionError):
                    failures["n"] += 1
    with reg.client() as probe:
        before = {worker_of(one_connection(reg)) for _ in range(4)}
        threads = [threading.Thread(target=pusher) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        victim = next(iter(before))
        os.kill(victim, signal.SIGKILL)
        served_before = len(acknowledged)
        wait_for(lambda: len({worker_of(one_connection(reg)) for _ in range(4)} - before) >= 1, 20,
                 "a new worker in place of the killed one")
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join()
        assert len(acknowledged) > served_before  # the other worker went on
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
