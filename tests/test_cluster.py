"""Replicas: join, status, settings that spread, remove, failure of one.

Real clusters on separate hosts: every replica a `moorage` process with its
own etcd member on a host of its own (a network namespace at the guide's
addresses, 10.0.0.11, .12, ..., on the default ports), all sharing one storage
directory, as the high-availability guide sets them up; the test is a client
host on the same network.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Iterator

import httpx
import pytest

from conftest import DRIVERS, Cluster, ObjectStore, Registry, moorage, wait_for
from oci import OCI_MANIFEST, new_repo, push_blob, push_image, sha256, with_digest
from seaweed import SeaweedFS

pytestmark = pytest.mark.cluster


@pytest.fixture(params=["filesystem"])
def cluster(request, hosts_cluster: Cluster, tmp_path) -> Iterator[Cluster]:
    """Each replica on a host of its own (conftest's `three` builds on this), sharing one
    directory; or, for a test parametrized with `BOTH_DRIVERS`, a bucket of a SeaweedFS on a
    host of its own too, with no shared directory at all."""
    if request.param == "filesystem":
        yield hosts_cluster
        return
    host = hosts_cluster.network.host("objects", "10.0.0.30")
    store = SeaweedFS(tmp_path / "seaweed", ip=host.ip, on=host).start()
    hosts_cluster.object_store = ObjectStore.on(store, "cluster")
    try:
        yield hosts_cluster
    finally:
        hosts_cluster.stop()   # the replicas before their store
        store.cleanup()


# What a test says of blobs on the storage all replicas share holds on either driver.
BOTH_DRIVERS = pytest.mark.parametrize("cluster", DRIVERS, indirect=True)


def test_three_replicas_by_join_are_healthy_and_tolerate_one(three):
    status = three.status(three.replicas[1])
    assert status["voters"] == 3 and status["healthy"] == 3, status
    assert status["tolerates"] == 1 and status["tolerates_when_healthy"] == 1
    roles = sorted(r["role"] for r in status["replicas"])
    assert roles == ["follower", "follower", "leader"], status
    assert {r["id"] for r in status["replicas"]} == {r.replica_id for r in three.replicas}
    table = moorage("status", "--existing", three.replicas[0].url).stdout
    assert "3 replicas, 3 healthy: tolerates 1 more failure (1 when all are healthy)" in table, table
    # The joiner said who it is and what the cluster now tolerates.
    wait_for(lambda: "tolerates 1 failure" in three.replicas[2].log(), 10, "the join summary")


@BOTH_DRIVERS
def test_any_replica_serves_any_request(three):
    a, b, c = three.replicas
    repo = new_repo("any")
    with a.client() as ca, b.client() as cb, c.client() as cc:
        for i in range(10):  # a tag written through one is there on the very next request through another
            image = push_image(ca, repo, f"t{i}")
            r = cc.get(f"/v2/{repo}/manifests/t{i}", headers={"Accept": OCI_MANIFEST})
            assert r.status_code == 200 and r.content == image.manifest
        # An upload started on one replica continues on another and closes on a third.
        data = os.urandom(300_000)
        loc = ca.post(f"/v2/{repo}/blobs/uploads/").headers["Location"]
        r = cb.patch(loc, content=data[:100_000], headers={"Content-Range": "0-99999"})
        assert r.status_code == 202, r.text
        r = cc.put(with_digest(r.headers["Location"], sha256(data)), content=data[100_000:])
        assert r.status_code == 201, r.text
        assert ca.get(f"/v2/{repo}/blobs/{sha256(data)}", follow_redirects=True).content == data  # S3: the store


def test_setting_reaches_every_replica_within_a_second(three):
    a, b, c = three.replicas
    moorage("config", "set", "readonly", "true", "--existing", b.url)
    set_at = time.monotonic()
    for r in (a, c):
        wait_for(lambda: httpx.get(r.url + "/health", verify=r.ssl_context()).json()["settings"]["readonly"],
                 1.0, f"readonly on {r.replica_id}")
    assert time.monotonic() - set_at < 1.5
    with a.client() as ca:
        r = ca.post(f"/v2/{new_repo()}/blobs/uploads/")
        assert r.status_code == 405 and r.json()["errors"][0]["code"] == "UNSUPPORTED"
    revisions = {httpx.get(r.url + "/health", verify=r.ssl_context()).json()["config_revision"]
                 for r in (a, b, c)}
    assert len(revisions) == 1 and revisions.pop() > 0
    out = moorage("config", "get", "readonly", "--existing", c.url).stdout.strip()
    assert out == "true"
    moorage("config", "set", "readonly", "false", "--existing", c.url)
    bad = moorage("config", "set", "readonly", "perhaps", "--existing", c.url, check=False)
    assert bad.returncode == 1 and "readonly takes true or false" in bad.stderr


@BOTH_DRIVERS
def test_kill_one_then_remove_it_and_join_a_fresh_one(three):
    a, b, c = three.replicas
    repo = new_repo("kill")
    with a.client() as ca:
        before = [push_image(ca, repo, f"v{i}") for i in range(3)]
    c.kill9()
    status = three.status(a)
    assert status["healthy"] == 2 and status["tolerates"] == 0 and status["tolerates_when_healthy"] == 1
    dead = next(r for r in status["replicas"] if r["id"] == c.replica_id)
    assert not dead["healthy"]
    assert "tolerates 0 more failures (1 when all are healthy)" in moorage("status", "--existing", a.url).stdout
    # Writes go on with two of three.
    with b.client() as cb:
        after = push_image(cb, repo, "after-kill")
    out = moorage("remove", "--existing", a.url, "--replica-id", c.replica_id)
    assert "2 replicas and tolerates 0 failures" in out.stdout and "warning" in out.stdout
    # A fresh replica joins while pushes go on through another.
    pushed, stop = [], threading.Event()

    def pusher():
        with a.client() as ca:
            for i in range(200):
                if stop.is_set():
                    return
                pushed.append((f"during{i}", push_image(ca, repo, f"during{i}")))
    thread = threading.Thread(target=pusher)
    thread.start()
    try:
        fresh = three.join(b)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert pushed, "no push went on during the join"
    status = three.status(fresh)
    assert status["voters"] == 3 and status["healthy"] == 3 and status["tolerates"] == 1
    with fresh.client() as cf:
        for i, image in enumerate(before):
            r = cf.get(f"/v2/{repo}/manifests/v{i}", headers={"Accept": OCI_MANIFEST})
            assert r.content == image.manifest
            for layer in image.layers:
                assert cf.get(f"/v2/{repo}/blobs/{sha256(layer)}", follow_redirects=True).content == layer
        assert cf.get(f"/v2/{repo}/manifests/after-kill",
                      headers={"Accept": OCI_MANIFEST}).content == after.manifest
        for tag, image in pushed:  # every push acknowledged during the join, read through the newcomer
            assert cf.get(f"/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST}).content == image.manifest


def test_removed_live_replica_shuts_itself_down(three):
    a, b, c = three.replicas
    moorage("remove", "--existing", a.url, "--replica-id", b.replica_id)
    assert b.proc.wait(timeout=30) == 0
    assert "removed from the cluster" in b.log()
    status = three.status(a)
    assert status["voters"] == 2 and b.replica_id not in {r["id"] for r in status["replicas"]}


def test_remove_refuses_the_last_replica_and_losing_quorum(cluster):
    first = cluster.start_first()
    out = moorage("remove", "--existing", first.url, "--replica-id", first.replica_id, check=False)
    assert out.returncode == 1 and "last replica" in out.stderr
    second = cluster.join(first)
    wait_for(lambda: "a cluster of two replicas tolerates no failure" in second.log(), 10, "the warning")
    second.kill9()
    # With one of two left, removing the live one would leave the dead one alone.
    out = moorage("remove", "--existing", first.url, "--replica-id", first.replica_id, check=False)
    assert out.returncode == 1, out.stdout
    unknown = moorage("remove", "--existing", first.url, "--replica-id", "abcdef123456", check=False)
    assert unknown.returncode == 1 and "no replica abcdef123456" in unknown.stderr


def test_two_replicas_after_one_loss_refuse_writes_with_a_clear_503(cluster):
    first = cluster.start_first()
    second = cluster.join(first)
    repo = new_repo("two")
    with first.client() as c1:
        image = push_image(c1, repo, "v1")
    second.kill9()
    with first.client(timeout=30) as c1:
        def refused():
            r = c1.post(f"/v2/{repo}/blobs/uploads/", params={"digest": sha256(b"x")}, content=b"x")
            return r if r.status_code == 503 else None
        r = wait_for(refused, 20, "writes to be refused")
        err = r.json()["errors"][0]
        assert err["code"] == "UNAVAILABLE" and "quorum" in err["message"], err
        assert "writes refused: etcd has not answered" in first.log(), "the log says when refusals began"
        # Pulls of what it knows keep working.
        assert c1.get(f"/v2/{repo}/manifests/v1", headers={"Accept": OCI_MANIFEST}).content == image.manifest
        ping = httpx.get(first.url + "/_ping", verify=first.ssl_context())
        assert ping.status_code == 503 and "quorum" in ping.json()["reason"]


def test_join_refuses_without_the_shared_storage(cluster, tmp_path):
    first = cluster.start_first()
    stranger = Registry(tmp_path / "stranger", storage_dir=tmp_path / "other-blobs", join=first.url)
    stranger.data_dir.mkdir(parents=True)
    out = moorage(*stranger.command()[3:], check=False, timeout=90)
    assert out.returncode == 1
    assert "does not see the cluster's blob storage" in out.stderr and "--storage-dir" in out.stderr
    assert not (stranger.data_dir / "replica.json").exists()
    status = cluster.status(first)
    assert len(status["replicas"]) == 1, status  # no learner left behind
    with first.client() as c:
        push_blob(c, new_repo(), b"still writable")


def test_cluster_commands_need_admin_credentials(cluster):
    first = cluster.start_first()
    r = httpx.get(first.url + "/_admin/cluster/status", verify=first.ssl_context())
    assert r.status_code == 401 and "Basic" in r.headers["WWW-Authenticate"]
    r = httpx.get(first.url + "/_admin/cluster/status", auth=("admin", "wrong"), verify=first.ssl_context())
    assert r.status_code == 401
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOORAGE_")}
    env["MOORAGE_CA_CERT"] = str(first.ca)
    out = subprocess.run([sys.executable, "-m", "moorage", "status", "--existing", first.url],
                         capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=30)
    assert out.returncode == 1 and "no admin username" in out.stderr and "$MOORAGE_USERNAME" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    env["MOORAGE_USERNAME"], env["MOORAGE_PASSWORD"] = "admin", "wrong"
    out = subprocess.run([sys.executable, "-m", "moorage", "status", "--existing", first.url],
                         capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=30)
    assert out.returncode == 1 and "refused the admin credentials" in out.stderr, out.stderr


@BOTH_DRIVERS
def test_sigstop_a_replica_then_sigcont_it_catches_up(three):
    a, b, c = three.replicas
    repo = new_repo("stop")
    os.killpg(c.proc.pid, signal.SIGSTOP)  # the replica and its etcd member: a hung machine
    try:
        with a.client(timeout=30) as ca:
            images = [push_image(ca, repo, f"t{i}") for i in range(5)]
    finally:
        os.killpg(c.proc.pid, signal.SIGCONT)

    def caught_up():
        try:
            with c.client(timeout=5) as cc:  # trusts the CA, authenticates as admin
                r = cc.get(f"/v2/{repo}/manifests/t4", headers={"Accept": OCI_MANIFEST})
        except httpx.HTTPError:
            return False
        return r.status_code == 200 and r.content == images[-1].manifest
    wait_for(caught_up, 30, "the resumed replica to catch up")
    status = three.status(c)
    assert status["healthy"] == 3, status
