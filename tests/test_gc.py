"""Online garbage collection on real replicas, checked on the real storage directory.

Every test pushes real content, deletes some, collects, and then looks at the
files on disk one by one and pulls back what must have stayed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
import threading
import time
from pathlib import Path

import httpx
import pytest

from moorage.registry.gc import Deletions
from moorage.storage.errors import StorageUnavailable

from conftest import ADMIN_PASSWORD, Registry, moorage, stored_blobs, wait_for
from layout import Layout, LayoutImage, read_layout, tar_gz_layer
from oci import (
    OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_MANIFEST, canonical, descriptor, make_image, new_repo, patch_chunk,
    push_blob, push_manifest, sha256, start_upload,
)
from test_skopeo import push, pull

pytestmark = pytest.mark.gc


# --------------------------------------------------------------------------- helpers


def gc(reg: Registry, *flags: str) -> dict:
    return json.loads(moorage("gc", "--existing", reg.url, "--json", *flags, timeout=120).stdout)


def config(reg: Registry, key: str, value: str | None) -> None:
    if value is None:
        moorage("config", "unset", key, "--existing", reg.url)
    else:
        moorage("config", "set", key, value, "--existing", reg.url)


def blob_files(reg: Registry) -> set[str]:
    if reg.object_store is not None:
        return {f"sha256:{hexdigest}" for hexdigest in stored_blobs(reg)}
    root = reg.blob_dir / "blobs"
    return {f"{alg.name}:{f.name}" for alg in root.iterdir() for sub in alg.iterdir() for f in sub.iterdir()}


def admin(reg: Registry) -> httpx.Client:
    return reg.client(auth=("admin", ADMIN_PASSWORD))


def collect_back_to_back(reg: Registry, stop: threading.Event, lock: threading.Lock, stats: dict) -> None:
    """GC runs one after another until `stop`, each to its end; counts runs, blobs swept and
    conflicts in `stats`."""
    with admin(reg) as client:
        while not stop.is_set():
            r = client.post("/_admin/gc", json={})
            if r.status_code == 409:
                time.sleep(0.05)
                continue
            assert r.status_code == 200, r.text
            run = r.json()
            while run["state"] == "running":
                time.sleep(0.05)
                run = client.get(f"/_admin/gc/{run['id']}").json()
            assert run["state"] == "done", run
            with lock:
                for key in ("runs", "blobs_swept", "conflicts"):
                    stats[key] = stats.get(key, 0) + (1 if key == "runs" else run[key])


def race_for(seconds: float, lock: threading.Lock, stats: dict, enough: dict[str, int], cap: float = 60) -> None:
    """Let a race run `seconds`, then on until every count in `enough` is reached (at most `cap`
    seconds in all): the test asserts how much raced, and a busy machine only makes it longer."""
    start = time.monotonic()
    time.sleep(seconds)
    while time.monotonic() - start < cap:
        with lock:
            if all(stats.get(k, 0) >= v for k, v in enough.items()):
                return
        time.sleep(0.2)


def counts(run: dict) -> dict:
    return {k: v for k, v in run.items() if k.endswith(("_swept", "_kept")) or k == "bytes_freed"}


def layer(rng: random.Random) -> bytes:
    return tar_gz_layer(rng, rng.randrange(1, 4), 16 * 1024)[0]


def compose(layout: Layout, rng: random.Random, layers: list[bytes]) -> LayoutImage:
    """An OCI image of the given layers (shared with other images or not) and a config of its own."""
    config = canonical({"architecture": "amd64", "os": "linux", "nonce": rng.randrange(1 << 62),
                        "rootfs": {"type": "layers", "diff_ids": [sha256(x) for x in layers]}})
    manifest = canonical({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                          "config": descriptor(OCI_CONFIG, config),
                          "layers": [descriptor(OCI_LAYER, x) for x in layers]})
    for blob in (config, *layers, manifest):
        layout.add_blob(blob)
    return LayoutImage(manifest, config, layers, {"architecture": "amd64", "os": "linux"})


def skopeo_push(reg: Registry, layout: Layout, image: LayoutImage, repo: str, tag: str) -> None:
    layout.tag(tag, OCI_MANIFEST, image.manifest)
    push(f"oci:{layout.path}:{tag}", f"docker://{reg.host}/{repo}:{tag}", "--preserve-digests")


def pulls_back(reg: Registry, tmp: Path, repo: str, tag: str, image: LayoutImage) -> None:
    out = tmp / f"pull-{repo.replace('/', '-')}-{tag}"
    pull(f"docker://{reg.host}/{repo}:{tag}", f"oci:{out}:{tag}", "--preserve-digests")
    refs, blobs = read_layout(out)
    assert refs[tag]["digest"] == image.digest
    for blob in image.blobs:
        assert blobs.get(sha256(blob)) == blob, f"{sha256(blob)} did not come back byte for byte"


def delete_manifest(client: httpx.Client, repo: str, digest: str) -> None:
    r = client.delete(f"/v2/{repo}/manifests/{digest}")
    assert r.status_code == 202, (r.status_code, r.text)


# --------------------------------------------------------------------------- tests


def test_gc_frees_exactly_the_unreferenced_blobs(fresh_registry, tmp_path):
    reg, rng = fresh_registry, random.Random(5)
    shared, l2, l3, l4, l5 = (layer(rng) for _ in range(5))
    src = Layout(tmp_path / "src")
    r1, r2 = new_repo("gc"), new_repo("gc")
    a = compose(src, rng, [shared, l2])       # stays (tagged)
    b = compose(src, rng, [shared, l3])       # deleted: its config and l3 go, shared stays
    c = compose(src, rng, [l2, l4])           # stays, in another repository
    d = compose(src, rng, [l5])               # deleted: everything of it goes
    e = compose(src, rng, [l4])               # pushed by digest only: untagged, kept by default
    for repo, tag, image in ((r1, "a", a), (r1, "b", b), (r2, "c", c), (r2, "d", d)):
        skopeo_push(reg, src, image, repo, tag)
    with reg.client() as client:
        push_blob(client, r2, e.config)
        push_blob(client, r2, l4)
        push_manifest(client, r2, e.digest, e.manifest)
        stray = push_blob(client, r1, os.urandom(3000))   # uploaded, never used by a manifest
        delete_manifest(client, r1, b.digest)
        delete_manifest(client, r2, d.digest)

    before = blob_files(reg)
    freed = {b.digest, sha256(b.config), sha256(l3), d.digest, sha256(d.config), sha256(l5), stray}
    assert freed <= before
    status = json.loads(moorage("status", "--existing", reg.url, "--json").stdout)["storage"]
    assert status["blobs"] == len(before)

    # Within the default grace (an hour) nothing is collectable yet, and the run says so and until when.
    pushed = time.time()
    young = gc(reg, "--dry-run")
    assert young["blobs_swept"] == 0 and young["blobs_young"] == len(freed), young
    assert young["bytes_young"] == sum(len(x) for x in (b.manifest, b.config, l3, d.manifest, d.config, l5)) + 3000
    assert pushed - 120 + 3600 <= young["young_collectable_from"] <= young["young_collectable_until"] <= pushed + 3600
    said = moorage("gc", "--dry-run", "--existing", reg.url).stdout
    assert f"{len(freed)} unused blobs" in said and "kept only for their age" in said, said
    assert re.search(r"collectable from \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC, in (5\d|60)m", said), said
    config(reg, "gc.grace_seconds", "0")

    dry = gc(reg, "--dry-run")
    assert dry["state"] == "done" and dry["dry_run"] and dry["blobs_young"] == 0
    assert blob_files(reg) == before, "a dry run deleted files"
    assert dry["blobs_swept"] == len(freed) and dry["manifests_swept"] == 0

    run = gc(reg)
    assert run["state"] == "done" and run["conflicts"] == 0
    assert counts(run) == counts(dry), "the dry run reported other counts than the run"
    assert blob_files(reg) == before - freed, "GC did not free exactly the unreferenced blobs"
    assert run["bytes_freed"] == sum(len(x) for x in (b.manifest, b.config, l3, d.manifest, d.config, l5)) + 3000

    with reg.client() as client:   # the repository links went with them
        assert client.head(f"/v2/{r1}/blobs/{sha256(l3)}").status_code == 404
        assert client.head(f"/v2/{r1}/blobs/{stray}").status_code == 404
        assert client.head(f"/v2/{r1}/blobs/{sha256(shared)}").status_code == 200
        assert client.get(f"/v2/{r2}/manifests/{e.digest}").status_code == 200
    for repo, tag, image in ((r1, "a", a), (r2, "c", c)):
        pulls_back(reg, tmp_path, repo, tag, image)
    status = json.loads(moorage("status", "--existing", reg.url, "--json").stdout)["storage"]
    assert status["blobs"] == len(before) - len(freed)
    assert "storage:" in moorage("status", "--existing", reg.url).stdout

    again = gc(reg)   # idempotent: nothing left to do
    assert again["blobs_swept"] == again["manifests_swept"] == again["bytes_freed"] == 0
    history = json.loads(moorage("gc", "--history", "--json", "--existing", reg.url).stdout)
    assert [h["id"] for h in history[:3]] == [again["id"], run["id"], dry["id"]]
    assert run["id"] in moorage("gc", "--history", "--existing", reg.url).stdout


def test_untagged_manifests_only_with_the_setting(fresh_registry):
    reg = fresh_registry
    config(reg, "gc.grace_seconds", "0")
    repo = new_repo("gc")
    with reg.client() as client:
        def image(ref: str | None = None, **extra):
            img = make_image(**extra)
            for blob in (img.config, *img.layers):
                push_blob(client, repo, blob)
            push_manifest(client, repo, ref or img.digest, img.manifest)
            return img
        a = image("a")
        old = image("b")
        c = image("b")                            # the tag moves on: `old` is untagged now
        children = [image() for _ in range(2)]   # by digest, kept by the tagged index below
        index = canonical({"schemaVersion": 2, "mediaType": OCI_INDEX,
                           "manifests": [descriptor(OCI_MANIFEST, x.manifest) for x in children]})
        push_manifest(client, repo, "multi", index, OCI_INDEX)
        ref_a = image(subject=descriptor(OCI_MANIFEST, a.manifest))      # a referrer of a kept subject
        ref_old = image(subject=descriptor(OCI_MANIFEST, old.manifest))  # ... of one that goes

    run = gc(reg)
    assert run["manifests_swept"] == 0, "untagged manifests went without gc.untagged_after_seconds"
    config(reg, "gc.untagged_after_seconds", "0")
    run = gc(reg)
    assert run["state"] == "done" and run["manifests_swept"] >= 2
    with reg.client() as client:
        def present(img) -> bool:
            return client.get(f"/v2/{repo}/manifests/{img.digest}").status_code == 200
        assert not present(old) and not present(ref_old)
        assert all(present(x) for x in (a, c, *children, ref_a))
        assert client.get(f"/v2/{repo}/manifests/multi").status_code == 200
        for blob in old.layers:
            assert client.head(f"/v2/{repo}/blobs/{sha256(blob)}").status_code == 404
        for img in (a, c, *children, ref_a):
            for blob in (img.config, *img.layers):
                r = client.get(f"/v2/{repo}/blobs/{sha256(blob)}")
                assert r.status_code == 200 and r.content == blob
    files = blob_files(reg)
    assert old.digest not in files and sha256(old.config) not in files
    assert all(sha256(x) in files for img in (a, c, *children, ref_a) for x in (img.manifest, img.config, *img.layers))


def test_abandoned_uploads_and_leftover_files(fresh_registry):
    reg = fresh_registry
    repo = new_repo("gc")
    with reg.client() as client:
        location = start_upload(client, repo)
        patch_chunk(client, location, os.urandom(5000), 0)
    uploads = reg.blob_dir / "uploads"
    assert len(list(uploads.iterdir())) == 1
    orphan = os.urandom(4000)
    digest = hashlib.sha256(orphan).hexdigest()
    (reg.blob_dir / "blobs" / "sha256" / digest[:2]).mkdir(parents=True, exist_ok=True)
    (reg.blob_dir / "blobs" / "sha256" / digest[:2] / digest).write_bytes(orphan)   # a crash after placing
    (reg.blob_dir / "tmp" / "0123abcd").write_bytes(b"x" * 100)                      # a crash mid-write

    run = gc(reg)   # defaults: an hour's grace, a day for uploads: all of it is young
    assert (run["uploads_swept"], run["orphans_swept"], run["tmp_swept"]) == (0, 0, 0)
    config(reg, "gc.grace_seconds", "0")
    config(reg, "gc.upload_max_age_seconds", "0")
    run = gc(reg)
    assert (run["uploads_swept"], run["orphans_swept"], run["tmp_swept"]) == (1, 1, 1)
    assert run["bytes_freed"] == 5000 + 4000 + 100
    assert list(uploads.iterdir()) == [] and list((reg.blob_dir / "tmp").iterdir()) == []
    assert f"sha256:{digest}" not in blob_files(reg)
    with reg.client() as client:   # the session is closed for good
        assert client.get(location).status_code == 404


def test_bad_schedule_refused_and_schedule_runs(fresh_registry):
    reg = fresh_registry
    out = moorage("config", "set", "gc.schedule", "often", "--existing", reg.url, check=False)
    assert out.returncode == 1 and "interval" in out.stderr
    config(reg, "gc.schedule", "2s")
    runs = wait_for(lambda: json.loads(moorage("gc", "--history", "--json", "--existing", reg.url).stdout),
                    30, "a scheduled run")
    assert runs[0]["trigger"] == "schedule"
    config(reg, "gc.schedule", None)


# --------------------------------------------------------------------------- the race


def test_pushes_racing_gc_with_zero_grace_lose_nothing(fresh_registry_each_driver):
    """Clients push images sharing layers (and delete some) while GC runs back to back, on either driver."""
    reg = fresh_registry_each_driver
    config(reg, "gc.grace_seconds", "0")
    rng = random.Random(11)
    pool = [os.urandom(rng.randrange(200, 40_000)) for _ in range(10)]
    acked: dict[tuple[str, str], bytes] = {}     # (repo, tag): manifest
    lock = threading.Lock()
    stop = threading.Event()
    stats = {"pushes": 0, "retries": 0, "deletes": 0, "runs": 0, "blobs_swept": 0, "conflicts": 0,
             "gave_up": 0}
    errors: list[str] = []
    refused: set[str] = set()   # manifests whose PUT etcd refused at least once (their bodies were written)

    def pusher(n: int) -> None:
        r = random.Random(n)
        repos = [f"race/{n}-{i}" for i in range(2)]
        mine: list[tuple[str, str, str]] = []
        with reg.client() as client:
            i = 0
            while not stop.is_set():
                repo = r.choice(repos)
                layers = r.sample(pool, 3)
                config = canonical({"n": n, "i": i, "diff_ids": [sha256(x) for x in layers]})
                manifest = canonical({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                      "config": descriptor(OCI_CONFIG, config),
                                      "layers": [descriptor(OCI_LAYER, x) for x in layers]})
                for _attempt in range(10):
                    for blob in (config, *layers):
                        if client.head(f"/v2/{repo}/blobs/{sha256(blob)}").status_code != 200:
                            rr = client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": sha256(blob)},
                                             content=blob)
                            if rr.status_code != 201:
                                errors.append(f"blob push {rr.status_code} {rr.text[:200]}")
                    rr = client.put(f"/v2/{repo}/manifests/t{i}", content=manifest,
                                    headers={"Content-Type": OCI_MANIFEST})
                    if rr.status_code == 201:
                        break
                    assert rr.status_code == 400 and "MANIFEST_BLOB_UNKNOWN" in rr.text, rr.text
                    with lock:
                        stats["retries"] += 1
                        refused.add(sha256(manifest))
                else:
                    # With a grace of 0 a blob is garbage until the manifest that
                    # references it lands, so a sweep may beat every attempt when
                    # the machine is slow: that costs the client a push, never an
                    # acknowledged image, and progress is asserted below.
                    with lock:
                        stats["gave_up"] += 1
                    continue
                with lock:
                    acked[(repo, f"t{i}")] = manifest
                    stats["pushes"] += 1
                mine.append((repo, f"t{i}", sha256(manifest)))
                if len(mine) > 3 and r.random() < 0.4:
                    drepo, dtag, ddigest = mine.pop(r.randrange(len(mine)))
                    with lock:
                        del acked[(drepo, dtag)]
                        stats["deletes"] += 1
                    assert client.delete(f"/v2/{drepo}/manifests/{ddigest}").status_code == 202
                i += 1

    threads = [threading.Thread(target=pusher, args=(n,)) for n in range(4)]
    threads.append(threading.Thread(target=collect_back_to_back, args=(reg, stop, lock, stats)))
    for t in threads:
        t.start()
    race_for(float(os.environ.get("MOORAGE_GC_RACE_SECONDS", "10")), lock, stats,
             {"runs": 10, "pushes": 50, "blobs_swept": 1})
    stop.set()
    for t in threads:
        t.join(60)
    log = reg.log_path.read_text(errors="replace")
    stats["commits_waited_for_a_sweep"] = log.count("waited for a GC sweep")
    stats["files_placed_again"] = log.count("placed again after a GC sweep")
    print(f"race: {stats}")
    assert not errors, errors[:5]
    assert stats["runs"] >= 10 and stats["pushes"] >= 50 and stats["blobs_swept"] > 0, stats

    final = gc(reg)
    assert final["state"] == "done"
    with reg.client() as client:
        for (repo, tag), manifest in acked.items():
            r = client.get(f"/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST})
            assert r.status_code == 200 and r.content == manifest, (repo, tag, r.status_code)
            body = json.loads(manifest)
            for desc in (body["config"], *body["layers"]):
                r = client.get(f"/v2/{repo}/blobs/{desc['digest']}", follow_redirects=True)  # S3: to the store
                assert r.status_code == 200 and sha256(r.content) == desc["digest"], (repo, tag, desc["digest"])
    # Nothing is left that no acknowledged image uses.
    wanted = {sha256(m) for m in acked.values()}
    for m in acked.values():
        body = json.loads(m)
        wanted |= {d["digest"] for d in (body["config"], *body["layers"])}
    # On S3 too, where GC never lists blobs/: a refused manifest's body (written before the
    # transaction etcd refused) is found by its writer's note in etcd (registry/placement.py).
    left = blob_files(reg) - wanted
    assert not left, (left, f"{len(left & refused)} of them bodies of refused manifests")


# --------------------------------------------------------------------------- a collector dies


def test_collector_killed_mid_run_then_another_completes(three, tmp_path):
    r0, r1, r2 = three.replicas
    config(r0, "gc.grace_seconds", "0")
    rng = random.Random(3)
    src = Layout(tmp_path / "src")
    shared = layer(rng)
    keep = compose(src, rng, [shared, layer(rng)])
    skopeo_push(r0, src, keep, "gc/kill", "keep")
    with r0.client() as client:
        garbage = {push_blob(client, "gc/kill", os.urandom(500 + i)) for i in range(450)}
    config(r0, "gc.debug_delay_ms", "1500")

    with admin(r1) as c1, admin(r2) as c2:
        run = c1.post("/_admin/gc", json={}).json()
        busy = c2.post("/_admin/gc", json={})
        assert busy.status_code == 409 and "already running" in busy.json()["error"]
        wait_for(lambda: c2.get(f"/_admin/gc/{run['id']}").json()["blobs_swept"] > 0, 30, "a first sweep step")
        r1.kill9()
        config(r0, "gc.debug_delay_ms", "0")
        half = c2.get(f"/_admin/gc/{run['id']}").json()
        assert half["state"] == "running" and 0 < half["blobs_swept"] < len(garbage)

        def started():
            r = c2.post("/_admin/gc", json={})
            return r.json() if r.status_code == 200 else None
        second = wait_for(started, 30, "the dead collector's lock to expire")
        second = wait_for(lambda: (x := c2.get(f"/_admin/gc/{second['id']}").json())["state"] != "running" and x,
                          60, "the second run")
        assert second["state"] == "done", second
        assert 0 < second["blobs_swept"] <= len(garbage) - half["blobs_swept"]
        # Files whose records the dead run swept but which it had not deleted yet (it deletes
        # them beside its sweep): the second run finds them without records, as orphans.
        assert second["orphans_swept"] <= half["blobs_swept"]
        assert c2.get(f"/_admin/gc/{run['id']}").json()["state"] == "abandoned"
    files = blob_files(r0)
    assert not (garbage & files), "garbage left behind"
    assert {sha256(x) for x in keep.blobs} <= files
    pulls_back(r2, tmp_path, "gc/kill", "keep", keep)


# --------------------------------------------------------------------------- the file protocol, step by step


def test_writer_and_sweeper_file_protocol(fresh_registry):
    """The two interleavings of a blob write with a sweep of the same digest that the race
    test rarely hits, forced in order against the replica's own etcd and storage: the
    commit waits out a marker, and a commit after a whole sweep puts the file back."""
    import asyncio

    from moorage.meta import keys
    from moorage.meta.etcd import op_delete
    from moorage.meta.gc_store import GcStore
    from moorage.meta.index import Index
    from moorage.meta.store import MetaStore
    from moorage.registry.placement import place_and_commit
    from moorage.storage.filesystem import FilesystemDriver

    reg = fresh_registry

    async def scenario() -> dict[str, bytes]:
        client = reg.etcd_client()
        index = Index(client)
        await index.start()
        meta, storage, gcs = MetaStore(client, index), FilesystemDriver(reg.blob_dir), GcStore(client, index)
        lease = await client.grant_lease(30)
        await client.put(keys.GC_LOCK, b"test-run")
        try:
            # 1. A sweep is under way (marker placed) when the writer commits: the commit waits,
            #    the sweep deletes the file and goes, the writer places the file again and commits.
            data = os.urandom(1000)
            digest = sha256(data)
            assert (await gcs.apply([gcs.orphan_unit("test-run", lease, digest)])) == [True]

            async def sweeper() -> None:
                await asyncio.sleep(0.3)
                await storage.delete_many([(digest, "")])
                await gcs.clear_markers([digest])
            sweep = asyncio.create_task(sweeper())
            assert await place_and_commit(meta, storage, digest, lambda: storage.write(digest, data),
                                          lambda intent: meta.commit_blob("gc/protocol", digest, len(data)))
            await sweep
            assert await storage.exists(digest) == len(data), "the committed blob's file is gone"

            # 2. A whole sweep (marker, unlink, marker gone) between placing and committing:
            #    the commit succeeds and the writer sees it must check, and puts the file back.
            data2 = os.urandom(1000)
            digest2 = sha256(data2)

            async def place_then_sweep() -> None:
                await storage.write(digest2, data2)
                assert (await gcs.apply([gcs.orphan_unit("test-run", lease, digest2)])) == [True]
                await storage.delete_many([(digest2, "")])
                await gcs.clear_markers([digest2])
            placed = []

            async def place() -> None:
                if not placed:
                    placed.append(1)
                    await place_then_sweep()
                else:
                    await storage.write(digest2, data2)
            assert await place_and_commit(meta, storage, digest2, place,
                                          lambda intent: meta.commit_blob("gc/protocol", digest2, len(data2)))
            assert await storage.exists(digest2) == len(data2), "the file a sweep took was not put back"

            # 3. A sweep is acknowledged once this replica's index has applied it: alone in its
            #    cluster, a replica answers a blob HEAD from the index without asking etcd. (etcd
            #    usually delivers the watch event before the transaction's answer, so this rarely
            #    fails without GcStore's wait; it says what the wait is for.)
            data3 = os.urandom(1000)
            digest3 = sha256(data3)
            await storage.write(digest3, data3)
            assert await meta.commit_blob("gc/protocol", digest3, len(data3))
            record = await client.get(keys.blob(digest3))
            link = await client.get(keys.repo_blob("gc/protocol", digest3))
            assert (await gcs.apply([gcs.blob_unit("test-run", lease, digest3, record.mod_revision,
                                                   [("gc/protocol", link.mod_revision)])])) == [True]
            assert digest3 not in index.blobs and digest3 not in index.repos["gc/protocol"].blobs
            await storage.delete_many([(digest3, "")])
            await gcs.clear_markers([digest3])
        finally:
            await client.txn([], [op_delete(keys.GC_LOCK)])
            await client.revoke_lease(lease)
            await index.stop()
            await client.close()
        return {digest: data, digest2: data2}

    blobs = asyncio.run(scenario())
    with reg.client() as c:   # and the replica serves both, byte for byte
        for digest, data in blobs.items():
            r = c.get(f"/v2/gc/protocol/blobs/{digest}")
            assert r.status_code == 200 and r.content == data


def test_the_cluster_clock_is_the_slowest_running_replicas():
    """GC measures ages with it (cluster/clock.py): alone, its own clock; with others, the slowest
    one whose heartbeat it saw change, never a dead replica's stale record."""
    import msgspec
    from moorage.cluster.clock import ClusterClock
    from moorage.cluster.replicas import new_record
    from moorage.meta import keys
    from moorage.meta.etcd import KV, Event

    now = [1000.0]
    clock = ClusterClock("self", clock=lambda: now[0])
    assert clock.now() == 1000.0 and clock.settled()

    def beat(rid: str, seen: float) -> None:
        record = msgspec.structs.replace(new_record(rid, "u", "p", "c"), seen=seen)
        clock.observe(Event(False, KV(keys.replica(rid), msgspec.json.encode(record), 1, 1)))

    beat("dead", 400.0)              # read at start-up: a record that never changes again
    beat("behind", 700.0)
    beat("ahead", 1200.0)
    assert clock.now() == 1000.0 and not clock.settled()
    beat("behind", 760.0)            # seen changing: it runs 240 s behind us
    beat("ahead", 1205.0)
    assert clock.now() == 760.0 and clock.offset("ahead") == 205.0 and clock.offset("dead") is None
    now[0] += 10
    assert clock.now() == 770.0
    clock.observe(Event(True, KV(keys.replica("behind"), b"", 2, 1)))
    assert clock.now() == 1010.0


def test_deletions_beside_the_sweep_are_bounded_and_a_failure_waits_for_the_rest():
    """Object deletions run beside the sweep, at most `limit` at once; when one fails the run
    still waits for every deletion it started (a cancelled request may yet be carried out by
    the store, after the markers went with the lease), then fails."""
    async def main() -> None:
        deletions = Deletions(2)
        gate = asyncio.Event()
        started: list[int] = []
        finished: list[int] = []

        def work(n: int, fail: bool = False):
            async def run() -> None:
                started.append(n)
                await gate.wait()
                if fail:
                    raise StorageUnavailable("the object store is down")
                await asyncio.sleep(0.05)
                finished.append(n)
            return run

        await deletions.start(work(1, fail=True))
        await deletions.start(work(2))
        third = asyncio.create_task(deletions.start(work(3)))
        await asyncio.sleep(0.05)
        assert started == [1, 2] and not third.done(), "a third deletion started beyond the limit"
        gate.set()
        await third                    # a slot came free; the failure had not been seen yet
        with pytest.raises(StorageUnavailable):
            await deletions.start(work(4))   # the failure is raised before more start
        await deletions.wait()
        assert sorted(finished) == [2, 3], "the run stopped waiting for deletions in flight"
        with pytest.raises(StorageUnavailable):
            deletions.check()

    asyncio.run(main())
