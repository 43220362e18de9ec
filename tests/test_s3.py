"""Moorage with its blobs on S3 (`serve --storage s3://...`) against a real SeaweedFS.

One SeaweedFS for the module (tests/seaweed.py), one replica on it for the
wire tests; each replica gets a prefix of its own in the bucket. Uploads of
every kind are checked against what lands in the bucket (the blob at its
content address, no piece left, nothing visible before the digest is
verified); pulls as redirects to presigned URLs that the client follows to
the store, and streamed through the replica with Range once the cluster
setting is off. Nothing is mocked: faults are SeaweedFS stopped and started.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import uuid
from urllib.parse import urlsplit

import httpx
import pytest

from conftest import ADMIN_PASSWORD, Cluster, Registry, moorage, wait_for
from layout import Layout, read_layout
from moorage.registry.audit import AuditEvent, AuditQuery, BucketAuditLog
from moorage.storage.s3.config import S3Config
from moorage.storage.s3.driver import S3Driver
from oci import (OCI_MANIFEST, assert_oci_error, finish_upload, make_image, new_repo, patch_chunk, push_blob,
                 push_image, pull_manifest, sha256, start_upload, with_digest)
from s3_support import (MiB, OCTET, blob_key, c, fetch, objects, records, s3reg,  # noqa: F401 - c, s3reg: fixtures
                        store_of, stored_at)
from seaweed import SeaweedFS, seaweed  # noqa: F401 - the module's store
from test_skopeo import assert_image_pulled, inspect, pull, push

pytestmark = pytest.mark.s3


# -- uploads of every kind, and what the bucket holds ------------------------------------------------

def test_every_upload_kind_lands_whole_where_its_record_says(s3reg, c, seaweed):
    """Blobs of a part (5 MiB) or more are the multipart upload their session sent, completed in
    place at the session's own key, which the record names: never copied to the content address
    (so the store never ran a copy). Smaller ones are written whole at the content address."""
    repo = new_repo("s3")
    blobs = {}
    # Monolithic, small (verified in memory), under a part, and large (parts as they arrive).
    for data in (b"", os.urandom(1000), os.urandom(3 * MiB + 1), os.urandom(12 * MiB + 5)):
        blobs[push_blob(c, repo, data)] = data
    # Chunked with odd sizes, small chunks among them: tails under a part wait in the session's
    # state for the next request, which sends them in front of its own bytes.
    data = os.urandom(19 * MiB + 3)
    location, offset = start_upload(c, repo), 0
    for size in (MiB, MiB, 3 * MiB, 1, 777, 9 * MiB, MiB, 2 * MiB + 11):
        location = patch_chunk(c, location, data[offset:offset + size], offset)
        offset += size
    blobs[finish_upload(c, location, sha256(data), data[offset:])] = data
    # Streamed: one PATCH without Content-Range, sent chunked, then PUT ?digest=.
    data = os.urandom(9 * MiB + 7)
    location = start_upload(c, repo)
    r = c.patch(location, content=iter([data[i:i + MiB] for i in range(0, len(data), MiB)]), headers=OCTET)
    assert r.status_code == 202, r.text
    blobs[finish_upload(c, r.headers["Location"], sha256(data))] = data

    stored = objects(seaweed, s3reg.prefix)
    for digest, data in blobs.items():
        key = stored_at(s3reg, digest)
        assert stored.get(key) == len(data), (digest, key)
        if len(data) >= 5 * MiB:
            assert key.startswith("blobs/u/") and blob_key(digest) not in stored, key
        else:
            assert key == blob_key(digest)
        head = c.head(f"/v2/{repo}/blobs/{digest}")
        assert head.status_code == 200 and head.headers["Content-Length"] == str(len(data))
        redirect = c.get(f"/v2/{repo}/blobs/{digest}").headers["Location"]
        assert urlsplit(redirect).path == f"/{seaweed.bucket}/{s3reg.prefix}/{key}", redirect   # presigned there
        assert fetch(c, repo, digest, seaweed) == data
    assert not [k for k in stored if k.startswith("uploads/")], "an upload's state outlived its commit"
    in_progress = seaweed.client().list_multipart_uploads(Bucket=seaweed.bucket, Prefix=f"{s3reg.prefix}/blobs/")
    assert not in_progress.get("Uploads"), in_progress.get("Uploads")


def test_a_wrong_digest_leaves_nothing_visible(s3reg, c, seaweed):
    repo = new_repo("s3")
    data = os.urandom(6 * MiB)
    wrong = sha256(b"something else")
    before = set(objects(seaweed, s3reg.prefix))
    location = patch_chunk(c, start_upload(c, repo), data, 0)
    r = c.put(with_digest(location, wrong), headers=OCTET)
    assert_oci_error(r, 400, "DIGEST_INVALID")
    r = c.post(f"/v2/{repo}/blobs/uploads/", params={"digest": wrong}, content=data, headers=OCTET)
    assert_oci_error(r, 400, "DIGEST_INVALID")
    stored = objects(seaweed, s3reg.prefix)
    assert blob_key(wrong) not in stored and blob_key(sha256(data)) not in stored
    assert c.head(f"/v2/{repo}/blobs/{sha256(data)}").status_code == 404
    assert not [k for k in set(stored) - before if k.startswith(("uploads/", "blobs/u/"))], stored
    # The sessions' multipart uploads were aborted, not left for GC.
    in_progress = seaweed.client().list_multipart_uploads(Bucket=seaweed.bucket, Prefix=f"{s3reg.prefix}/blobs/u/")
    assert not in_progress.get("Uploads"), in_progress.get("Uploads")


def test_a_mount_shares_the_record_and_its_location(s3reg, c, seaweed):
    source, target = new_repo("s3m"), new_repo("s3m")
    data = os.urandom(5 * MiB + 99)
    digest = push_blob(c, source, data)
    before = records(s3reg, digest)[digest]
    assert before is not None and before.location.startswith("blobs/u/")
    r = c.post(f"/v2/{target}/blobs/uploads/", params={"mount": digest, "from": source})
    assert r.status_code == 201, r.text
    after = records(s3reg, digest)[digest]
    assert after.location == before.location and after.created > before.created   # rewritten, same object
    assert fetch(c, target, digest, seaweed) == data



def test_streamed_pulls_with_range_when_redirects_are_off(s3reg, c, seaweed):
    repo = new_repo("s3")
    data = os.urandom(3 * MiB + 11)
    digest = push_blob(c, repo, data)
    moorage("config", "set", "storage.redirect", "false", "--existing", s3reg.url)
    try:
        wait_for(lambda: c.get(f"/v2/{repo}/blobs/{digest}").status_code == 200, 10, "redirects off")
        assert c.get(f"/v2/{repo}/blobs/{digest}").content == data
        r = c.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": f"bytes={MiB}-{2 * MiB + 4}"})
        assert r.status_code == 206 and r.content == data[MiB:2 * MiB + 5]
        assert r.headers["Content-Range"] == f"bytes {MiB}-{2 * MiB + 4}/{len(data)}"
        r = c.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": "bytes=-10"})
        assert r.status_code == 206 and r.content == data[-10:]
        r = c.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": f"bytes={len(data)}-"})
        assert r.status_code == 416
    finally:
        moorage("config", "unset", "storage.redirect", "--existing", s3reg.url)
    wait_for(lambda: c.get(f"/v2/{repo}/blobs/{digest}").status_code == 307, 10, "redirects back on")


def test_skopeo_round_trip(s3reg, seaweed, tmp_path):
    import random
    rng = random.Random(13)
    src = Layout(tmp_path / "src")
    img = src.image(rng, n_layers=3, max_file=2 * MiB)
    src.tag("v1", OCI_MANIFEST, img.manifest)
    ref = f"docker://{s3reg.host}/skopeo-s3/{uuid.uuid4().hex[:8]}:v1"
    push(f"oci:{src.path}:v1", ref, "--preserve-digests")
    assert inspect(ref)["Digest"] == img.digest
    out = tmp_path / "out"
    pull(ref, f"oci:{out}:v1", "--preserve-digests")
    refs, blobs = read_layout(out)
    assert refs["v1"]["digest"] == img.digest
    assert_image_pulled(blobs, img)


# -- the store at start, and the store down ------------------------------------------------------------

def test_start_refuses_a_store_it_cannot_use_in_one_sentence(seaweed, tmp_path):
    bad_secret = store_of(seaweed, "bad")
    bad_secret.env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    missing = store_of(seaweed, "x")
    missing.args[1] = "s3://no-such-bucket-here/x"
    for store, words in ((bad_secret, "SignatureDoesNotMatch"), (missing, "the bucket does not exist")):
        reg = Registry(tmp_path / uuid.uuid4().hex[:6], extra_args=store.args, env=store.env)
        with pytest.raises(RuntimeError) as e:
            reg.start()
        lines = [line for line in str(e.value).splitlines() if line.strip()]
        # The last word: one sentence naming the store and what failed (the CA was made before it).
        assert lines[-1].startswith("moorage: cannot use the blob storage s3://"), lines[-3:]
        assert words in lines[-1], lines[-1]
        assert "Traceback" not in str(e.value) and "not-the-secret" not in str(e.value)


def store_state(c: httpx.Client) -> dict:
    """The object store's state in /health (whichever process answers: the parent probes, its
    workers are told)."""
    return c.get("/health").json()["object_store"]


def store_up(reg: Registry) -> float | None:
    """The replica's moorage_object_store_up on /metrics (admin's credentials open it too)."""
    r = httpx.get(reg.url + "/metrics", auth=("admin", ADMIN_PASSWORD), verify=reg.ssl_context(), timeout=10)
    found = re.search(r'^moorage_object_store_up\{driver="s3"\} (\S+)$', r.text, re.M)
    return float(found.group(1)) if found else None


def test_store_down_push_is_503_naming_it_then_works_again(s3reg, c, seaweed):
    repo = new_repo("s3")
    image = push_image(c, repo, "v1")
    assert store_state(c)["reachable"]
    assert store_up(s3reg) == 1
    assert "object store: answering" in moorage("status", "--existing", s3reg.url).stdout
    seaweed.stop()
    try:
        r = c.post(f"/v2/{repo}/blobs/uploads/", params={"digest": sha256(b"during")}, content=b"during",
                   headers=OCTET)
        assert r.status_code == 503, r.text
        err = r.json()["errors"][0]
        assert err["code"] == "UNAVAILABLE" and "object store" in err["message"], err
        # What the index knows still answers: HEAD and the cached manifest never reach S3.
        assert c.head(f"/v2/{repo}/blobs/{sha256(image.layers[0])}").status_code == 200
        assert pull_manifest(c, repo, "v1") == image.manifest
        # The background probe says so on /health and in status, naming the store and since when;
        # /_ping stays 200 (every replica shares the store: draining them all would help no one).
        down = wait_for(lambda: (st := store_state(c)) and not st["reachable"] and st, 40, "the probe to notice")
        assert seaweed.endpoint in down["where"] and "object store" in down["error"], down
        assert all(not store_state(c)["reachable"] for _ in range(4))   # each worker was told
        shown = moorage("status", "--existing", s3reg.url).stdout
        assert f"object store: unreachable since {time.strftime('%Y-%m-%d', time.gmtime(down['since']))}" in shown
        assert c.get("/_ping").status_code == 200
        assert store_up(s3reg) == 0     # what MoorageObjectStoreDown (docs/monitoring/alerts.yml) watches
    finally:
        seaweed.restart()
    back = wait_for(lambda: (st := store_state(c))["reachable"] and st, 30, "the probe to see the store back")
    assert wait_for(lambda: store_up(s3reg) == 1, 10, "the metric to say the store is back")
    assert back["since"] > down["since"] and back["error"] is None
    push_blob(c, repo, b"after")


# -- replicas on separate hosts, sharing nothing but the object store ------------------------------------

def test_replicas_on_separate_hosts_share_only_the_object_store(network, tmp_path):
    host = network.host("objects", "10.0.0.30")
    store = SeaweedFS(tmp_path / "seaweed", ip=host.ip, on=host).start()
    cluster = Cluster(tmp_path, network, store_of(store, "ha"))
    try:
        first = cluster.start_first()
        second, third = cluster.join(first), cluster.join(first)
        for r in cluster.replicas:  # each learned the store from the cluster; none has a blob directory
            saved = json.loads((r.data_dir / "replica.json").read_text())
            assert saved["storage_dir"] == f"s3://{store.bucket}/ha", saved
            assert saved["s3"]["endpoint"] == store.endpoint and not (r.data_dir / "blobs").exists()
        status = cluster.status(third)
        assert status["voters"] == 3 and status["healthy"] == 3, status
        assert status["storage"]["where"] == f"s3://{store.bucket}/ha at {store.endpoint}", status["storage"]
        assert f"storage: s3://{store.bucket}/ha at {store.endpoint}, " in moorage("status", "--existing",
                                                                                  second.url).stdout

        # One upload, each request on another replica: POST, PATCH, PATCH, PATCH, PUT.
        repo, data = new_repo("hop"), os.urandom(13 * MiB + 1)
        clients = [r.client() for r in (first, second, third)]
        try:
            location = start_upload(clients[0], repo)
            offset = 0
            for i, size in enumerate((6 * MiB, 1, 4 * MiB)):
                location = patch_chunk(clients[1 + i % 2], location, data[offset:offset + size], offset)
                offset += size
            finish_upload(clients[0], location, sha256(data), data[offset:])
            assert fetch(clients[2], repo, sha256(data), store) == data  # presigned for the store's address
            image = push_image(clients[1], repo, "v1")
        finally:
            for client in clients:
                client.close()

        # A replica killed, removed and replaced: the new one learns the store and serves what was pushed.
        gone = third.replica_id
        # Its audit events reach the bucket within a flush (a second; with workers they
        # pass through the parent first); then it dies. Wait for its write event itself:
        # an earlier flush of other events says nothing of the PATCH it served.
        def written_by_gone() -> bool:
            found = json.loads(moorage("audit", "--existing", first.url, "--json", "--repo", repo, "--kind",
                                       "write", "--limit", "1000").stdout)["events"]
            return any(e["replica"] == gone for e in found)
        wait_for(written_by_gone, 15, "the removed replica's write events in the bucket")
        third.kill9()
        moorage("remove", "--existing", first.url, "--replica-id", gone)
        fourth = cluster.join(second)
        with fourth.client() as c:
            assert pull_manifest(c, repo, "v1") == image.manifest
            assert fetch(c, repo, sha256(image.layers[0]), store) == image.layers[0]
        status = cluster.status(fourth)
        assert status["voters"] == 3 and gone not in {r["id"] for r in status["replicas"]}, status
        # The audit log is in the bucket: any replica answers for all, the removed one included.
        events = json.loads(moorage("audit", "--existing", fourth.url, "--json", "--repo", repo, "--kind",
                                    "write", "--limit", "1000").stdout)["events"]
        assert {first.replica_id, second.replica_id, gone} <= {e["replica"] for e in events}, events
    finally:
        cluster.stop()
        store.cleanup()


def test_backup_with_blobs_restores_into_another_prefix(s3reg, c, seaweed, tmp_path):
    repo = new_repo("s3bk")
    image = push_image(c, repo, "v1", make_image(n_layers=2, layer_size=6 * MiB))
    archive = tmp_path / "backup.tar"
    moorage("backup", "--with-blobs", "--output", str(archive), "--existing", s3reg.url, timeout=120)
    target = Registry(tmp_path / "restored")
    prefix = f"restored-{uuid.uuid4().hex[:6]}"
    store = store_of(seaweed, prefix)
    out = moorage("restore", "--input", str(archive), "--data-dir", str(target.data_dir), *store.args,
                  "--etcd-client-port", str(target.etcd_client_port),
                  "--etcd-peer-port", str(target.etcd_peer_port), timeout=120, env=store.env)
    assert f"written to s3://{seaweed.bucket}/{prefix}" in out.stdout, out.stdout
    target.env = store.env
    target.start()
    try:
        for blob in (image.config, *image.layers):
            # Restored where the restored records say (a layer's own key in the new prefix).
            assert objects(seaweed, prefix)[stored_at(target, sha256(blob))] == len(blob)
        assert stored_at(target, sha256(image.layers[1])).startswith("blobs/u/")
        with target.client() as restored:
            assert pull_manifest(restored, repo, "v1") == image.manifest
            assert fetch(restored, repo, sha256(image.layers[1]), seaweed) == image.layers[1]
    finally:
        target.stop()


def test_join_without_credentials_for_the_store_is_refused_in_one_sentence(s3reg, seaweed, tmp_path):
    joiner = Registry(tmp_path / "joiner", join=s3reg.url,
                      env={**store_of(seaweed, "unused").env, "AWS_SECRET_ACCESS_KEY": "not-the-secret-9f3"})
    with pytest.raises(RuntimeError) as e:
        joiner.start(timeout=60)
    last = [line for line in str(e.value).splitlines() if line.strip()][-1]
    assert last.startswith(f"moorage: this node cannot use the cluster's blob storage s3://{seaweed.bucket}/"
                           f"{s3reg.prefix} at {seaweed.endpoint}: "), last
    assert "SignatureDoesNotMatch" in last and "not-the-secret-9f3" not in str(e.value)
    assert not (joiner.data_dir / "replica.json").exists()
    status = json.loads(moorage("status", "--existing", s3reg.url, "--json").stdout)
    assert status["voters"] == 1 and len(status["replicas"]) == 1, status  # the half member was abandoned


# -- the audit log in the bucket ----------------------------------------------------------------------------

def test_audit_log_in_the_bucket_merges_replicas_newest_first(seaweed, monkeypatch):
    for name, value in store_of(seaweed, "unused").env.items():
        monkeypatch.setenv(name, value)

    def event(replica: str, ts: float, **kw) -> AuditEvent:
        return AuditEvent(time=ts, replica=replica, kind=kw.pop("kind", "write"), method="PUT",
                          path="/v2/x/manifests/a", status=201, **kw)

    async def scenario():
        prefix = f"audit-{uuid.uuid4().hex[:6]}"
        config = S3Config.from_url(f"s3://{seaweed.bucket}/{prefix}", endpoint=seaweed.endpoint, path_style=True)
        async with S3Driver(config) as storage:
            now = time.time()
            a, b = BucketAuditLog(storage, "aa11"), BucketAuditLog(storage, "bb22")
            await a.open()
            await b.open()
            # Interleaved in time, and in objects whose windows overlap.
            for i in range(0, 10, 2):
                a.record(event("aa11", now - 20 + i, repo="r/one", user=f"a{i}"))
            b.record(event("bb22", now - 19, repo="r/one", user="b19", kind="denied"))
            b.record(event("bb22", now - 11, repo="r/one", user="b11"))
            await a.flush()
            await b.flush()
            b.record(event("bb22", now - 15, repo="r/one", user="b15"))
            a.record(event("aa11", now - 86400 * 100, repo="r/ancient"))
            await b.flush()
            await a.flush()
            events, more, _ = await b.query(AuditQuery(repo="r/one"))
            assert [e.user for e in events] == ["b11", "a8", "a6", "b15", "a4", "a2", "b19", "a0"], events
            assert not more
            assert (await a.query(AuditQuery(repo="r/one", limit=3)))[:2] == (events[:3], True)
            assert [e.user for e in (await a.query(AuditQuery(kind="denied")))[0]] == ["b19"]
            assert [e.user for e in (await a.query(AuditQuery(since=now - 12.5)))[0]] == ["b11", "a8"]
            assert (await a.query(AuditQuery(until=now - 50 * 86400)))[0][0].repo == "r/ancient"
            keys = objects(seaweed, prefix)
            assert all(k.startswith(("audit/aa11/", "audit/bb22/")) for k in keys) and len(keys) == 4, keys
            assert await b._expire(time.time()) == 1   # past 90 days, whoever wrote it
            assert not (await b.query(AuditQuery(repo="r/ancient")))[0]

    asyncio.run(scenario())
