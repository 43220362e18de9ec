"""Replicas on separate hosts: the address they advertise, partitions, clock skew.

Each replica runs on a host of its own (tests/hosts.py: a network namespace
at the HA guide's addresses, on the default ports) and the test is a client
host on the same network. One cluster of three serves the partition and
clock tests, which leave it whole; the address tests make their own.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import threading
import time

import httpx
import pytest
from cryptography import x509

from auth import fetch_token
from conftest import ADMIN_PASSWORD, Registry, moorage, on_host, wait_for
from moorage.storage.filesystem import FilesystemDriver
from oci import OCI_MANIFEST, make_image, new_repo, patch_chunk, push_blob, push_image, sha256, start_upload

pytestmark = pytest.mark.cluster

SKEW_SECONDS = 240
# Debian's libfaketime (package faketime), at its multiarch path.
LIBFAKETIME = next(iter(glob.glob("/usr/lib/*/faketime/libfaketime.so.1")), "libfaketime.so.1")
# A replica cut off from its peers must say so within this, and catch up within CATCH_UP after healing.
UNHEALTHY_WITHIN = 10.0
CATCH_UP_WITHIN = 30.0


def ping(reg: Registry) -> int:
    try:
        return httpx.get(reg.url + "/_ping", verify=reg.ssl_context(), timeout=2).status_code
    except httpx.HTTPError:
        return 0


def token_for(reg: Registry, scope: str) -> str:
    with reg.client(user=None) as c:
        r = fetch_token(c, [scope], "admin", ADMIN_PASSWORD)
    assert r.status_code == 200, r.text
    return r.json()["token"]


def claims(token: str) -> dict:
    body = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


# -- the advertised address ---------------------------------------------------------


def test_a_cluster_an_old_version_made_on_loopback_is_repaired_by_a_restart(net, tmp_path):
    """Old versions advertised etcd on 127.0.0.1 unless told otherwise: such a cluster of one,
    restarted with the guide's flags, moves its member to its address and takes a join."""
    one, two = net.host("old-1", "10.0.0.41"), net.host("old-2", "10.0.0.42")
    storage = tmp_path / "blobs"
    first = on_host(one, tmp_path / "first", storage_dir=storage, extra_args=["--advertise", "127.0.0.1"])
    second = on_host(two, tmp_path / "second", storage_dir=storage, listen="0.0.0.0:5000")
    try:
        first.start()
        saved = json.loads((first.data_dir / "replica.json").read_text())
        assert saved["advertise"] == "127.0.0.1", saved  # what old versions saved
        repo = new_repo("old")
        with first.client() as c:
            image = push_image(c, repo, "v1")

        first.stop()
        first.extra_args = ["--tls-name", "registry.example.com"]  # the guide's command
        first.start()
        log = first.log()
        assert '"old": "https://127.0.0.1:2380"' in log and '"new": "https://10.0.0.41:2380"' in log, log
        assert json.loads((first.data_dir / "replica.json").read_text())["advertise"] == "10.0.0.41"
        node = x509.load_pem_x509_certificate((first.data_dir / "pki" / "node.crt").read_bytes())
        sans = {str(n.value) for n in node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value}
        assert "10.0.0.41" in sans, sans

        # A second node joins from its own host, listening on every address: it advertises its one.
        second.join = first.url
        second.start(timeout=90)
        assert "advertising this host's one routable address" in second.log() and "10.0.0.42" in second.log()
        status = json.loads(moorage("status", "--existing", second.url, "--json").stdout)
        assert status["voters"] == 2 and status["healthy"] == 2, status
        assert {r["url"] for r in status["replicas"]} == {"https://10.0.0.41:5000", "https://10.0.0.42:5000"}
        with second.client() as c:
            r = c.get(f"/v2/{repo}/manifests/v1", headers={"Accept": OCI_MANIFEST})
            assert r.status_code == 200 and r.content == image.manifest
    finally:
        for reg in (second, first):
            if reg.proc and reg.proc.poll() is None:
                reg.kill9()


def test_listening_everywhere_on_a_host_with_several_addresses_is_refused(net, tmp_path):
    host = net.host("multi", "10.0.0.43")
    host.add_address("10.0.0.44")
    data = tmp_path / "data"
    out = moorage("serve", "--data-dir", str(data), "--listen", "0.0.0.0:5000", on=host, check=False, timeout=30)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "10.0.0.43, 10.0.0.44" in lines[0] and "--advertise" in lines[0], lines[0]
    assert not (data / "replica.json").exists()


# -- partitions ---------------------------------------------------------------------


def push_with_retry(reg: Registry, repo: str, tag: str, within: float = 20.0):
    """A push through the majority: a 503 while it elects a new leader is retried."""
    deadline = time.monotonic() + within
    image = make_image(n_layers=1, layer_size=512)
    while True:
        try:
            with reg.client(timeout=10) as c:
                return push_image(c, repo, tag, image)
        except (AssertionError, httpx.HTTPError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


@pytest.mark.parametrize("who", ["follower", "leader"])
def test_a_replica_cut_off_from_its_peers_refuses_writes_then_catches_up(trio, who):
    status = trio.status(trio.replicas[0])
    assert status["healthy"] == 3, status
    leader = next(r["id"] for r in status["replicas"] if r["role"] == "leader")
    cut = next(r for r in trio.replicas if (r.replica_id == leader) == (who == "leader"))
    majority = [r for r in trio.replicas if r is not cut]
    repo = new_repo("part")
    with cut.client() as c:
        before = push_image(c, repo, "before")
    token = token_for(cut, f"repository:{repo}:pull,push")  # the token endpoint is the cut one's too

    cut_at = time.monotonic()
    cut.on.cut_off(*(r.on for r in majority))
    acked: dict[str, bytes] = {}
    attempts: list[tuple[str, int | str]] = []   # (digest, status or error) of every write tried on it
    took: list[float] = []                       # how long each took to be answered
    refused_tags: list[str] = []
    stop = threading.Event()

    def write_to_the_cut_one() -> None:
        """From the moment of the cut: blob pushes, each a write etcd must agree to."""
        with httpx.Client(base_url=cut.url, verify=cut.ssl_context(), timeout=20,
                          headers={"Authorization": f"Bearer {token}"}) as c:
            while not stop.is_set():
                blob = os.urandom(700)
                started = time.monotonic()
                try:
                    r = c.post(f"/v2/{repo}/blobs/uploads/", params={"digest": sha256(blob)}, content=blob)
                    attempts.append((sha256(blob), r.status_code))
                except httpx.HTTPError as e:
                    attempts.append((sha256(blob), type(e).__name__))
                took.append(time.monotonic() - started)
                time.sleep(0.2)
    writer = threading.Thread(target=write_to_the_cut_one)
    writer.start()
    try:
        unhealthy = wait_for(lambda: ping(cut) == 503 and time.monotonic() - cut_at, UNHEALTHY_WITHIN,
                             f"the cut-off {who} to report itself unhealthy")
        with httpx.Client(base_url=cut.url, verify=cut.ssl_context(), timeout=15,
                          headers={"Authorization": f"Bearer {token}"}) as c:
            # Clients still reach it and pull what it knows ...
            r = c.get(f"/v2/{repo}/manifests/before", headers={"Accept": OCI_MANIFEST})
            assert r.status_code == 200 and r.content == before.manifest
            # ... and the majority goes on taking writes, while it refuses them with a 503 naming the cause.
            for i in range(4):
                acked[f"m{i}"] = push_with_retry(majority[i % 2], repo, f"m{i}").manifest
                r = c.put(f"/v2/{repo}/manifests/x{i}", content=before.manifest,
                          headers={"Content-Type": OCI_MANIFEST})
                assert r.status_code == 503 and r.json()["errors"][0]["code"] == "UNAVAILABLE", r.text
                refused_tags.append(f"x{i}")
            assert ping(cut) == 503
            wait_for(lambda: len(attempts) >= 5, 15, "writes tried on the cut-off replica")
    finally:
        stop.set()
        writer.join(30)
        cut.on.heal(*(r.on for r in majority))
    assert attempts and not [a for a in attempts if isinstance(a[1], int) and a[1] < 300], attempts
    assert any(a[1] == 503 for a in attempts), attempts
    healed_at = time.monotonic()

    def serves_every_majority_write() -> bool:
        try:
            with cut.client(timeout=5) as c:
                return all(c.get(f"/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST}).content
                           == manifest for tag, manifest in acked.items())
        except httpx.HTTPError:
            return False
    wait_for(serves_every_majority_write, CATCH_UP_WITHIN, f"the healed {who} to serve the majority's writes")
    caught_up = time.monotonic() - healed_at
    wait_for(lambda: ping(cut) == 200, CATCH_UP_WITHIN - caught_up, f"the healed {who} to report healthy")
    print(f"\npartition of the {who}: /_ping failed {unhealthy:.1f}s after the cut; served all "
          f"{len(acked)} majority writes {caught_up:.1f}s after healing; it acknowledged none of "
          f"{len(attempts)} writes ({sum(a[1] == 503 for a in attempts)} refused with 503), answering each "
          f"within {max(took):.1f}s")
    for reg in trio.replicas:  # the refused writes never appear, anywhere
        with reg.client() as c:
            for digest, outcome in attempts:
                assert c.head(f"/v2/{repo}/blobs/{digest}").status_code == 404, (reg.replica_id, digest, outcome)
            for tag in refused_tags:
                assert c.get(f"/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST}).status_code == 404
    wait_for(lambda: trio.status(cut)["healthy"] == 3, 15, "the cluster to be whole again")


# -- clock skew ---------------------------------------------------------------------


@pytest.mark.parametrize("skew", [SKEW_SECONDS, -SKEW_SECONDS], ids=["ahead", "behind"])
def test_a_replica_whose_clock_is_minutes_off_changes_nothing_users_see(trio, skew):
    """libfaketime runs one replica's moorage process minutes ahead, or behind. Its etcd member
    (Go, which reads the clock without libc) keeps the true time: etcd's leases and elections
    do not depend on wall clocks anyway. Tokens it issues work on the others and theirs on it,
    status shows every replica as just seen, and garbage collection keeps what is younger than
    the grace period by the true time, though the replica that writes and the one that collects
    (and the storage that stamps files) disagree by minutes."""
    a, b, c = trio.replicas
    c.stop()
    # libfaketime preloaded straight into the replica (the `faketime` command would fork, and
    # the test would stop the wrapper, not the replica); monotonic time stays true.
    c.wrapper = ["env", f"LD_PRELOAD={LIBFAKETIME}", f"FAKETIME={skew:+d}s", "FAKETIME_DONT_FAKE_MONOTONIC=1"]
    c.start()
    off = httpx.get(c.url + "/health", verify=c.ssl_context(), timeout=5).json()["time"] - time.time()
    assert abs(off - skew) < 30, off

    def offsets_known():  # each side has seen the other's heartbeats change: it knows the skew
        of_c = next(r for r in trio.status(a)["replicas"] if r["id"] == c.replica_id)["clock_offset_seconds"]
        of_a = next(r for r in trio.status(c)["replicas"] if r["id"] == a.replica_id)["clock_offset_seconds"]
        return of_c is not None and of_a is not None and (of_c, of_a)
    of_c, of_a = wait_for(offsets_known, 20, "the replicas to learn each other's clocks")
    assert abs(of_c - skew) < 5 and abs(of_a + skew) < 5, (of_c, of_a)

    repo = new_repo("skew")
    scope = f"repository:{repo}:pull,push"
    pushed: dict[str, bytes] = {}
    for issuer, users in ((c, (a, b)), (a, (c,))):
        token = token_for(issuer, scope)
        # A strict verifier would refuse one or the other as "not valid yet" or near expiry.
        assert abs(claims(token)["nbf"] - time.time()) > SKEW_SECONDS / 2 or issuer is a
        for reg in users:
            with httpx.Client(base_url=reg.url, verify=reg.ssl_context(), timeout=15,
                              headers={"Authorization": f"Bearer {token}"}) as client:
                tag = f"by-{reg.replica_id}"
                pushed[tag] = push_image(client, repo, tag).manifest
                r = client.get(f"/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST})
                assert r.status_code == 200 and r.content == pushed[tag], (issuer.replica_id, reg.replica_id)

    rows = trio.status(a)["replicas"]
    assert all(r["seen_seconds_ago"] < 20 for r in rows), rows
    table = moorage("status", "--existing", a.url).stdout
    assert "m ago" not in table, table

    # Young garbage, by the true clock, written through the replica whose clock is behind and
    # collected by the one whose clock is ahead: a blob no manifest uses, an idle upload, and a
    # file without a record (stamped by the storage's clock).
    writer, runner = (a, c) if skew > 0 else (c, a)
    for key, value in (("gc.grace_seconds", "60"), ("gc.upload_max_age_seconds", "60")):
        moorage("config", "set", key, value, "--existing", a.url)
    with writer.client() as cw:
        young = push_blob(cw, repo, os.urandom(2048))
        data = os.urandom(2000)
        upload = patch_chunk(cw, start_upload(cw, repo), data[:1000], 0)
    orphan_bytes = os.urandom(1500)
    orphan = FilesystemDriver(trio.storage).local_path(sha256(orphan_bytes))  # the layout replicas use
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(orphan_bytes)

    run = json.loads(moorage("gc", "--existing", runner.url, "--json", timeout=120).stdout)
    assert run["replica"] == runner.replica_id and run["state"] == "done", run
    with b.client() as cb:
        assert cb.head(f"/v2/{repo}/blobs/{young}").status_code == 200, run
    with writer.client() as cw:  # the upload goes on (its record now stamped by the writer's clock again)
        assert cw.patch(upload, content=data[1000:], headers={"Content-Range": "1000-1999"}).status_code == 202
    assert orphan.exists(), run

    # The grace periods still end, by the true clock.
    for key in ("gc.grace_seconds", "gc.upload_max_age_seconds"):
        moorage("config", "set", key, "0", "--existing", a.url)
    run = json.loads(moorage("gc", "--existing", runner.url, "--json", timeout=120).stdout)
    assert run["replica"] == runner.replica_id and run["blobs_swept"] >= 1 and run["uploads_swept"] >= 1, run
    with b.client() as cb:
        assert cb.head(f"/v2/{repo}/blobs/{young}").status_code == 404
    assert not orphan.exists()
    for key in ("gc.grace_seconds", "gc.upload_max_age_seconds"):
        moorage("config", "unset", key, "--existing", a.url)
    with b.client() as cb:  # what is tagged stays
        for tag, manifest in pushed.items():
            r = cb.get(f"/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST})
            assert r.status_code == 200 and r.content == manifest, tag
