"""Garbage collection with the blobs on S3 (`serve --storage s3://...`) against a real SeaweedFS.

What etcd says is garbage goes, and only under the uploads prefix is anything listed: the
writers' notes (registry/placement.py) lead GC to what a crashed writer left, large pushes
racing GC lose nothing and leave nothing, a collection the store cuts short leaves nothing
for good, and an active session's multipart upload stays however old. Nothing is mocked:
faults are SeaweedFS stopped and started.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time
import uuid

import pytest

from conftest import Registry, wait_for
from moorage.meta.records import encode_note
from oci import (OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, canonical, descriptor, finish_upload, new_repo, patch_chunk,
                 push_blob, push_blob_chunked, push_image, pull_manifest, sha256, start_upload)
from s3_support import MiB, blob_key, c, fetch, objects, records, s3reg, stored_at  # noqa: F401 - c, s3reg: fixtures
from seaweed import seaweed  # noqa: F401 - the module's store
from test_gc import blob_files, collect_back_to_back, config as gc_config, gc, race_for

pytestmark = pytest.mark.s3


def test_large_pushes_of_the_same_blobs_racing_gc_lose_nothing_and_leave_nothing(s3reg, seaweed):
    """Images whose layers are three blobs of over 5 MiB (each upload completed at its own key),
    pushed by three clients at once, chunked and monolithic, some deleted again, while GC with
    zero grace runs back to back: sweeps of a layer's record race new uploads of it, and twin
    uploads race each other's commits. Every acknowledged image pulls whole; a push may fail
    only with 503 (GC took its write for an abandoned one, its grace being zero); and after a
    last run nothing is left in the bucket that no image uses, no second object of a blob, no
    session state, no multipart upload in progress."""
    gc_config(s3reg, "gc.grace_seconds", "0")
    pool = [os.urandom(5 * MiB + 1000 * i) for i in range(3)]
    acked: dict[tuple[str, str], bytes] = {}
    lock, stop = threading.Lock(), threading.Event()
    stats = {"pushes": 0, "refused": 0, "runs": 0, "blobs_swept": 0}
    errors: list[str] = []
    pushed: set[str] = set()

    def pusher(n: int) -> None:
        r, repo, i = random.Random(n), f"s3race/{uuid.uuid4().hex[:8]}", 0
        mine: list[tuple[str, str]] = []
        with s3reg.client() as client:
            while not stop.is_set():
                layer = r.choice(pool)
                config = canonical({"n": n, "i": i, "diff_ids": [sha256(layer)]})
                manifest = canonical({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                      "config": descriptor(OCI_CONFIG, config), "layers": [descriptor(OCI_LAYER, layer)]})
                i += 1
                with lock:
                    pushed.update((sha256(layer), sha256(config)))
                try:
                    (push_blob_chunked(client, repo, layer, chunk=2 * MiB + 17) if r.random() < 0.5
                     else push_blob(client, repo, layer))
                    push_blob(client, repo, config)
                except AssertionError as e:
                    if "503" not in str(e):
                        errors.append(str(e)[:300])
                    with lock:
                        stats["refused"] += 1
                    continue
                rr = client.put(f"/v2/{repo}/manifests/t{i}", content=manifest, headers={"Content-Type": OCI_MANIFEST})
                if rr.status_code != 201:   # a sweep took a blob between its push and the manifest
                    assert rr.status_code == 400 and "BLOB_UNKNOWN" in rr.text, rr.text
                    continue
                with lock:
                    acked[(repo, f"t{i}")] = manifest
                    stats["pushes"] += 1
                mine.append((repo, f"t{i}"))
                if len(mine) > 2 and r.random() < 0.5:
                    drepo, dtag = mine.pop(0)
                    with lock:
                        gone = acked.pop((drepo, dtag))
                    assert client.delete(f"/v2/{drepo}/manifests/{sha256(gone)}").status_code == 202

    threads = [threading.Thread(target=pusher, args=(n,)) for n in range(3)]
    threads.append(threading.Thread(target=collect_back_to_back, args=(s3reg, stop, lock, stats)))
    try:
        for t in threads:
            t.start()
        race_for(12, lock, stats, {"runs": 5, "pushes": 5, "blobs_swept": 1})
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    print(f"race: {stats}")
    assert not errors, errors[:3]
    assert stats["runs"] >= 5 and stats["pushes"] >= 5 and stats["blobs_swept"] > 0, stats
    gc_config(s3reg, "gc.upload_max_age_seconds", "0")
    try:
        assert gc(s3reg)["state"] == "done"
    finally:
        gc_config(s3reg, "gc.grace_seconds", None)
        gc_config(s3reg, "gc.upload_max_age_seconds", None)
    wanted: set[str] = set()
    with s3reg.client() as client:
        for (repo, tag), manifest in acked.items():
            assert pull_manifest(client, repo, tag) == manifest
            for desc in (json.loads(manifest)["config"], *json.loads(manifest)["layers"]):
                wanted.add(desc["digest"])
                got = client.get(f"/v2/{repo}/blobs/{desc['digest']}", follow_redirects=True)
                assert got.status_code == 200 and sha256(got.content) == desc["digest"], (repo, tag, desc)
    left = (blob_files(s3reg) - wanted) & pushed
    assert not left, left   # and blob_files (stored_blobs) failed already on a blob held twice
    stored = objects(seaweed, s3reg.prefix)
    assert not [k for k in stored if k.startswith("uploads/")], "session state left"
    in_progress = seaweed.client().list_multipart_uploads(Bucket=seaweed.bucket, Prefix=f"{s3reg.prefix}/blobs/")
    assert not in_progress.get("Uploads"), in_progress.get("Uploads")


# -- garbage collection on S3: what etcd says is garbage, and the uploads prefix only -------------------

def etcd(reg: Registry, *puts: tuple[bytes, bytes]) -> list[bytes]:
    """Put keys in the replica's etcd (what a writer that died would have left), then the keys of
    the writers' notes (MetaStore.intend) that are there."""
    from moorage.meta import keys

    async def run() -> list[bytes]:
        client = reg.etcd_client()
        try:
            for key, value in puts:
                await client.put(key, value)
            return [kv.key for kv in (await client.range_prefix(keys.GC_WRITING))[1]]
        finally:
            await client.close()
    return asyncio.run(run())


def test_gc_deletes_garbage_and_what_crashed_uploads_left(s3reg, c, seaweed):
    from moorage.meta import keys
    repo = new_repo("s3gc")
    keep, gone = push_image(c, repo, "keep"), push_image(c, repo, "gone")
    assert c.delete(f"/v2/{repo}/manifests/{sha256(gone.manifest)}").status_code == 202
    # Each write noted itself in etcd before it reached the bucket; each commit deleted its note.
    # (A write the store refused keeps its note, for GC: the store-down test leaves one.)
    pushed = {sha256(b) for image in (keep, gone) for b in (image.config, *image.layers, image.manifest)}
    assert not [k for k in etcd(s3reg) if k.split(b"/")[4].decode() in pushed]
    # A replica that died between writing an object and committing it: its note, and the object
    # at the content address with no record (which GC on S3 never finds by listing). And a note
    # whose writer died after another writer committed the same blob: only the note is garbage.
    orphan = os.urandom(3000)
    bucket = seaweed.client()
    bucket.put_object(Bucket=seaweed.bucket, Key=f"{s3reg.prefix}/{blob_key(sha256(orphan))}", Body=orphan)
    bucket.close()
    notes = etcd(s3reg, (keys.gc_writing(sha256(orphan), "died"), b"%.3f" % time.time()),
                 (keys.gc_writing(sha256(keep.layers[0]), "died"), b"%.3f" % time.time()))
    assert {keys.gc_writing(sha256(orphan), "died"), keys.gc_writing(sha256(keep.layers[0]), "died")} <= set(notes)
    # Uploads completed at their own keys whose writers died before committing: one of a digest
    # with no record, one of a digest whose record names another object (a twin upload's, or
    # the content address). Their notes name the keys; no record points at them.
    own = {f"blobs/u/{uuid.uuid4().hex}": sha256(b"never recorded"), f"blobs/u/{uuid.uuid4().hex}": sha256(keep.layers[1])}
    bucket = seaweed.client()
    for key in own:
        bucket.put_object(Bucket=seaweed.bucket, Key=f"{s3reg.prefix}/{key}", Body=b"completed in place")
    bucket.close()
    etcd(s3reg, *[(keys.gc_writing(digest, "died-own"), encode_note(time.time(), key)) for key, digest in own.items()])
    # An upload abandoned with pieces in the bucket, and a commit that crashed mid-assembly
    # (a multipart upload in progress at a blob's address).
    patch_chunk(c, start_upload(c, repo), os.urandom(MiB), 0)
    patch_chunk(c, start_upload(c, repo), os.urandom(6 * MiB), 0)   # its multipart upload in progress
    client = seaweed.client()
    crashed = f"{s3reg.prefix}/{blob_key(sha256(b'crashed'))}"
    client.create_multipart_upload(Bucket=seaweed.bucket, Key=crashed)
    assert any(k.startswith("uploads/") for k in objects(seaweed, s3reg.prefix))
    gc_config(s3reg, "gc.grace_seconds", "0")
    gc_config(s3reg, "gc.upload_max_age_seconds", "0")
    try:
        run = gc(s3reg)
    finally:
        gc_config(s3reg, "gc.grace_seconds", None)
        gc_config(s3reg, "gc.upload_max_age_seconds", None)
    assert run["uploads_swept"] >= 1 and run["tmp_swept"] >= 1 and run["orphans_swept"] >= 3, run
    assert etcd(s3reg) == []
    stored = objects(seaweed, s3reg.prefix)
    assert blob_key(sha256(orphan)) not in stored and not set(own) & set(stored), own
    for blob in (gone.config, *gone.layers, gone.manifest):
        assert blob_key(sha256(blob)) not in stored
    for blob in (keep.config, *keep.layers, keep.manifest):
        assert stored_at(s3reg, sha256(blob)) in stored
    assert not [k for k in stored if k.startswith("uploads/")]
    in_progress = client.list_multipart_uploads(Bucket=seaweed.bucket, Prefix=f"{s3reg.prefix}/blobs/")
    assert not in_progress.get("Uploads"), in_progress.get("Uploads")
    client.close()
    assert pull_manifest(c, repo, "keep") == keep.manifest


def test_gc_cut_short_by_the_store_leaves_nothing_for_good(s3reg, c, seaweed):
    """A run whose object deletions fail (the store went down after its sweep transaction) has
    already deleted the records, and GC never lists the bucket: the sweep's own notes of the
    objects let the next run collect them, at the content address and at a key of their own."""
    from test_gc import admin
    repo = new_repo("s3gcdown")
    image = push_image(c, repo, "v1")
    big = push_blob(c, repo, os.urandom(6 * MiB))     # completed in place, at a key of its own
    assert c.delete(f"/v2/{repo}/manifests/{sha256(image.manifest)}").status_code == 202
    garbage = [sha256(b) for b in (image.config, *image.layers, image.manifest)] + [big]
    where = {d: stored_at(s3reg, d) for d in garbage}
    assert where[big].startswith("blobs/u/") and where[garbage[0]] == blob_key(garbage[0])
    gc_config(s3reg, "gc.grace_seconds", "0")
    gc_config(s3reg, "gc.debug_delay_ms", "4000")   # a pause at the start of each phase
    try:
        with admin(s3reg) as a:
            run = a.post("/_admin/gc", json={}).json()
            wait_for(lambda: a.get(f"/_admin/gc/{run['id']}").json()["phase"] == "blobs", 30, "the blob phase")
            seaweed.kill9()   # before the blob sweep's first transaction, which etcd still takes
            try:
                failed = wait_for(lambda: (x := a.get(f"/_admin/gc/{run['id']}").json())["state"] != "running"
                                  and x, 60, "the run to fail")
            finally:
                seaweed.restart()
        assert failed["state"] == "failed" and failed["blobs_swept"] >= len(garbage), failed
        assert set(records(s3reg, *garbage).values()) == {None}
        assert set(where.values()) <= set(objects(seaweed, s3reg.prefix)), "the objects went after all"
        gc_config(s3reg, "gc.debug_delay_ms", None)
        second = gc(s3reg)
    finally:
        gc_config(s3reg, "gc.debug_delay_ms", None)
        gc_config(s3reg, "gc.grace_seconds", None)
    assert second["state"] == "done" and second["orphans_swept"] >= len(garbage), second
    assert not set(where.values()) & set(objects(seaweed, s3reg.prefix)), "objects left for good"
    assert not [k for k in etcd(s3reg) if b"/gc-" in k], "the runs' notes stayed"


def test_gc_keeps_an_active_sessions_multipart_upload_however_old(s3reg, c, seaweed):
    """A session's multipart upload starts with its first part; GC aborts multipart uploads older
    than gc.upload_max_age_seconds, but never that of a session still receiving."""
    repo, data = new_repo("s3gc"), os.urandom(11 * MiB)
    location = patch_chunk(c, start_upload(c, repo), data[:6 * MiB], 0)
    gc_config(s3reg, "gc.upload_max_age_seconds", "2")
    try:
        time.sleep(2.5)   # the multipart upload is now older than that...
        location = patch_chunk(c, location, data[6 * MiB:9 * MiB], 6 * MiB)   # ...but its session is active
        run = gc(s3reg)
    finally:
        gc_config(s3reg, "gc.upload_max_age_seconds", None)
    assert run["tmp_swept"] == 0 and run["uploads_swept"] == 0, run
    digest = finish_upload(c, location, sha256(data), data[9 * MiB:])
    assert fetch(c, repo, digest, seaweed) == data
