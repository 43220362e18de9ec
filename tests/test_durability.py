"""Durability: what was acknowledged survives restarts and kill -9; SIGTERM drains; races agree.

Every test runs its own replica (`fresh_registry`; the ones about blobs on each driver) and really stops, kills and
restarts it: SIGKILL goes to the whole process group, the etcd member included.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import pytest

from conftest import Registry, stored_blobs, wait_for
from oci import (
    MANIFEST_ACCEPT,
    OCI_INDEX,
    OCI_MANIFEST,
    canonical,
    descriptor,
    finish_upload,
    make_image,
    patch_chunk,
    pull_blob,
    pull_manifest,
    push_blob,
    push_blob_chunked,
    push_image,
    push_manifest,
    range_end,
    sha256,
    start_upload,
    with_digest,
)
from test_gc import config as gc_config, gc

pytestmark = pytest.mark.cluster

MiB = 1 << 20


def seeded() -> random.Random:
    seed = int.from_bytes(os.urandom(4), "big")
    print(f"random seed {seed}")
    return random.Random(seed)


def upload_status(client: httpx.Client, location: str) -> tuple[int, str]:
    """GET an upload's Location: (offset, next Location); asserts 204."""
    r = client.get(location)
    assert r.status_code == 204, (r.status_code, r.text)
    return range_end(r), r.headers.get("Location") or location


def assert_storage_content_addressed(reg: Registry) -> set[str]:
    """No blob stored under a digest holds other bytes (a torn or partial write); the hex digests."""
    found = stored_blobs(reg)
    for hexdigest, data in found.items():
        assert sha256(data) == "sha256:" + hexdigest, f"{hexdigest} names {len(data)} bytes that are not it"
    return set(found)


def assert_manifest_complete(client: httpx.Client, repo: str, body: bytes,
                             seen: set | None = None) -> None:
    """Every blob and child manifest a manifest names is there, whole (`seen`: checked already)."""
    seen = set() if seen is None else seen
    manifest = json.loads(body)
    for child in manifest.get("manifests", []):
        got = pull_manifest(client, repo, child["digest"])
        assert len(got) == child["size"]
        assert_manifest_complete(client, repo, got, seen)
    for desc in [manifest["config"], *manifest["layers"]] if "config" in manifest else []:
        if (repo, desc["digest"]) in seen:
            continue
        r = client.head(f"/v2/{repo}/blobs/{desc['digest']}")
        assert r.status_code == 200, f"{repo} manifest {sha256(body)} names missing blob {desc}"
        assert int(r.headers["Content-Length"]) == desc["size"], desc
        assert len(pull_blob(client, repo, desc["digest"])) == desc["size"]
        seen.add((repo, desc["digest"]))


# --------------------------------------------------------------------------- clean restart


def test_clean_restart_keeps_images_and_upload_sessions(fresh_registry_each_driver):
    reg, rng = fresh_registry_each_driver, seeded()
    repo = "durable/restart"
    data = rng.randbytes(3 * MiB + 12345)
    with reg.client() as c:
        images = {f"t{i}": push_image(c, repo, f"t{i}", make_image(i + 1, rng.randrange(1, 300_000)))
                  for i in range(3)}
        index = canonical({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [descriptor(OCI_MANIFEST, images["t0"].manifest,
                                     platform={"architecture": "amd64", "os": "linux"}),
                          descriptor(OCI_MANIFEST, images["t1"].manifest,
                                     platform={"architecture": "arm64", "os": "linux"})],
        })
        push_manifest(c, repo, "multi", index)
        big = rng.randbytes(5 * MiB)
        push_blob_chunked(c, "durable/other", big, chunk=MiB)
        location = start_upload(c, repo)
        location = patch_chunk(c, location, data[:MiB], 0)
        location = patch_chunk(c, location, data[MiB:2 * MiB], MiB)

    assert reg.stop() == 0, reg.log()
    reg.start()

    with reg.client() as c:
        # The upload session survived: same offset, and it can be finished.
        offset, location = upload_status(c, location)
        assert offset == 2 * MiB
        location = patch_chunk(c, location, data[2 * MiB:3 * MiB], 2 * MiB)
        finish_upload(c, location, sha256(data), data[3 * MiB:])
        assert pull_blob(c, repo, sha256(data)) == data

        for tag, image in images.items():
            assert pull_manifest(c, repo, tag) == image.manifest
            assert pull_manifest(c, repo, image.digest) == image.manifest
            for blob in (image.config, *image.layers):
                assert pull_blob(c, repo, sha256(blob)) == blob
        assert pull_manifest(c, repo, "multi") == index
        assert_manifest_complete(c, repo, index)
        assert pull_blob(c, "durable/other", sha256(big)) == big
        r = c.get(f"/v2/{repo}/tags/list")
        assert r.status_code == 200 and sorted(r.json()["tags"]) == ["multi", "t0", "t1", "t2"], r.text
    assert_storage_content_addressed(reg)


# --------------------------------------------------------------------------- kill -9 mid-stream


@dataclass
class Ledger:
    """What the pushers attempted and what the registry acknowledged (201)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    killed: threading.Event = field(default_factory=threading.Event)
    blobs_tried: dict[tuple[str, str], bytes] = field(default_factory=dict)
    blobs_acked: dict[tuple[str, str], bytes] = field(default_factory=dict)
    manifests_tried: dict[tuple[str, str], bytes] = field(default_factory=dict)
    manifests_acked: dict[tuple[str, str], bytes] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def note(self, table: dict, key, value) -> None:
        with self.lock:
            table[key] = value


class Stop(Exception):
    pass


def pusher(reg, ledger: Ledger, worker: int, round_: int, seed: int) -> None:
    """Push blobs (monolithic and chunked) and images until the registry dies."""
    rng = random.Random(seed)
    own_repo = f"crash/w{worker}"

    def check(r: httpx.Response, want: int, what: str) -> None:
        if r.status_code != want:
            if not ledger.killed.is_set():
                ledger.errors.append(f"{what}: {r.status_code} {r.text[:200]}")
            raise Stop

    def blob(c: httpx.Client, repo: str, data: bytes) -> None:
        digest = sha256(data)
        ledger.note(ledger.blobs_tried, (repo, digest), data)
        if rng.random() < 0.5:
            r = c.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest}, content=data,
                       headers={"Content-Type": "application/octet-stream"})
        else:
            r = c.post(f"/v2/{repo}/blobs/uploads/")
            check(r, 202, "start upload")
            location, offset = r.headers["Location"], 0
            step = max(1, len(data) // rng.randrange(1, 4))
            while offset < len(data):
                piece = data[offset:offset + step]
                r = c.patch(location, content=piece, headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{offset}-{offset + len(piece) - 1}"})
                check(r, 202, "patch")
                location, offset = r.headers.get("Location") or location, offset + len(piece)
            r = c.put(with_digest(location, digest))
        check(r, 201, f"push blob {len(data)}")
        if r.headers.get("Docker-Content-Digest") != digest:
            ledger.errors.append(f"blob {digest} acknowledged as {r.headers.get('Docker-Content-Digest')}")
        ledger.note(ledger.blobs_acked, (repo, digest), data)

    with reg.client(timeout=20.0) as c:
        n = 0
        try:
            while True:
                n += 1
                repo = own_repo if rng.random() < 0.7 else "crash/shared"
                if rng.random() < 0.4:
                    blob(c, repo, rng.randbytes(rng.choice([rng.randrange(1, 4096),
                                                            rng.randrange(4096, 1_500_000)])))
                    continue
                image = make_image(rng.randrange(1, 4), rng.randrange(100, 400_000))
                for data in (image.config, *image.layers):
                    blob(c, repo, data)
                tag = f"r{round_}-w{worker}-{n}"
                ledger.note(ledger.manifests_tried, (repo, tag), image.manifest)
                r = c.put(f"/v2/{repo}/manifests/{tag}", content=image.manifest,
                          headers={"Content-Type": OCI_MANIFEST})
                check(r, 201, "push manifest")
                ledger.note(ledger.manifests_acked, (repo, tag), image.manifest)
        except (httpx.HTTPError, Stop):
            if not ledger.killed.is_set():
                ledger.errors.append(f"worker {worker} stopped before the kill")
        except Exception as e:  # noqa: BLE001 - any surprise is a failure, reported below
            ledger.errors.append(f"worker {worker}: {e!r}")


def verify_after_crash(reg, ledger: Ledger) -> None:
    seen: set[tuple[str, str]] = set()
    with reg.client() as c:
        # Everything acknowledged is there, byte for byte.
        for (repo, digest), data in ledger.blobs_acked.items():
            assert pull_blob(c, repo, digest) == data, (repo, digest)
            seen.add((repo, digest))
        for (repo, tag), body in ledger.manifests_acked.items():
            assert pull_manifest(c, repo, tag) == body, (repo, tag)
            assert pull_manifest(c, repo, sha256(body)) == body, (repo, tag)
            assert_manifest_complete(c, repo, body, seen)
        # Nothing half there: what was attempted is either whole or absent.
        for (repo, digest), data in ledger.blobs_tried.items():
            if (repo, digest) in ledger.blobs_acked:
                continue
            r = c.head(f"/v2/{repo}/blobs/{digest}")
            assert r.status_code in (200, 404), (repo, digest, r.status_code)
            if r.status_code == 200:
                assert int(r.headers["Content-Length"]) == len(data), (repo, digest)
                assert pull_blob(c, repo, digest) == data
        for (repo, tag), body in ledger.manifests_tried.items():
            r = c.get(f"/v2/{repo}/manifests/{tag}", headers={"Accept": MANIFEST_ACCEPT})
            assert r.status_code in (200, 404), (repo, tag, r.status_code, r.text)
            if r.status_code == 200:
                assert r.content == body, (repo, tag)
                assert_manifest_complete(c, repo, body, seen)
        # Every tag the registry lists resolves to a manifest whose blobs are all there.
        for repo in sorted({repo for repo, _ in ledger.manifests_tried}):
            r = c.get(f"/v2/{repo}/tags/list")
            assert r.status_code == 200, (repo, r.status_code, r.text)
            tags = r.json()["tags"] or []
            acked = {tag for (rp, tag) in ledger.manifests_acked if rp == repo}
            assert acked <= set(tags), (repo, sorted(acked - set(tags)))
            for tag in tags:
                assert_manifest_complete(c, repo, pull_manifest(c, repo, tag), seen)
    if reg.object_store is None:
        found = assert_storage_content_addressed(reg)
    else:
        # SeaweedFS keeps an object for a PUT cut by kill -9 (seen: 0 bytes at a content
        # address); no record names it and its writer's note in etcd makes it GC's, which
        # the test's end checks. What was acknowledged must be whole in the bucket now.
        found = {h for h, data in stored_blobs(reg).items() if sha256(data) == "sha256:" + h}
    for _, digest in ledger.blobs_acked:
        assert digest.removeprefix("sha256:") in found, f"acknowledged {digest} has no file"


def test_kill9_mid_stream_loses_nothing_acknowledged(fresh_registry_each_driver):
    reg, rng = fresh_registry_each_driver, seeded()
    ledger = Ledger()
    for round_ in range(2):
        ledger.killed.clear()
        acked_before = len(ledger.blobs_acked) + len(ledger.manifests_acked)
        threads = [threading.Thread(target=pusher, args=(reg, ledger, w, round_, rng.randrange(1 << 32)))
                   for w in range(4)]
        for t in threads:
            t.start()
        # Kill at a random moment once the pushers are in full flow (on a busy
        # machine their first token and uploads take a while).
        wait_for(lambda: len(ledger.blobs_acked) + len(ledger.manifests_acked) - acked_before >= 20, 60,
                 "20 acknowledged pushes")
        time.sleep(rng.uniform(0.0, 1.5))
        ledger.killed.set()
        reg.kill9()
        for t in threads:
            t.join(30)
            assert not t.is_alive(), "a pusher hung after kill -9"
        assert not ledger.errors, ledger.errors[:10]
        acked = len(ledger.blobs_acked) + len(ledger.manifests_acked) - acked_before
        assert acked >= 20, f"only {acked} pushes acknowledged before the kill: {reg.log()}"
        print(f"round {round_}: {len(ledger.blobs_acked)} blobs, "
              f"{len(ledger.manifests_acked)} manifests acknowledged so far")
        reg.start()
        verify_after_crash(reg, ledger)

    # And it still takes writes.
    with reg.client() as c:
        image = push_image(c, "crash/after", "ok", make_image(2, 50_000))
        assert pull_manifest(c, "crash/after", "ok") == image.manifest
    if reg.object_store is not None:
        # GC collects the cut writes by their notes (no listing of blobs/); then every object
        # at a content address holds its digest's bytes.
        gc_config(reg, "gc.grace_seconds", "0")
        assert gc(reg)["state"] == "done"
        assert_storage_content_addressed(reg)


def test_kill9_mid_patch_keeps_a_consistent_upload(fresh_registry_each_driver):
    reg, rng = fresh_registry_each_driver, seeded()
    repo = "crash/patch"
    data = rng.randbytes(40 * MiB)
    first = MiB + rng.randrange(MiB)
    piece = 256 * 1024
    sent = 0
    halfway = threading.Event()
    outcome: list = []

    def body():
        nonlocal sent
        for off in range(first, len(data), piece):
            yield data[off:off + piece]
            sent += len(data[off:off + piece])
            if sent >= 8 * MiB:
                halfway.set()
                time.sleep(0.02)

    with reg.client() as c:
        location = start_upload(c, repo)
        location = patch_chunk(c, location, data[:first], 0)

        def big_patch():
            try:
                r = c.patch(location, content=body(), headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(len(data) - first),
                    "Content-Range": f"{first}-{len(data) - 1}"})
                outcome.append(r.status_code)
            except httpx.HTTPError as e:
                outcome.append(e)

        t = threading.Thread(target=big_patch)
        t.start()
        assert halfway.wait(30), "the big PATCH never got going"
        time.sleep(0.2)
        reg.kill9()
        t.join(30)
        assert not t.is_alive()
    assert outcome and isinstance(outcome[0], httpx.HTTPError), f"PATCH was not cut: {outcome}"
    cut_at = first + sent

    reg.start()
    with reg.client() as c:
        offset, location = upload_status(c, location)
        # The acknowledged first chunk survives; the torn one is either dropped or kept in part.
        assert first <= offset <= cut_at, (first, offset, cut_at)
        # Continuing from the reported offset must give exactly the right blob.
        location = patch_chunk(c, location, data[offset:offset + 4 * MiB], offset)
        assert upload_status(c, location)[0] == offset + 4 * MiB
        finish_upload(c, location, sha256(data), data[offset + 4 * MiB:])
        assert pull_blob(c, repo, sha256(data)) == data
        r = c.head(f"/v2/{repo}/blobs/{sha256(data)}")
        assert r.status_code == 200 and int(r.headers["Content-Length"]) == len(data)
        # A fresh upload of the same bytes works too.
        assert push_blob_chunked(c, "crash/patch2", data[:3 * MiB], chunk=MiB) == sha256(data[:3 * MiB])
    assert_storage_content_addressed(reg)


# --------------------------------------------------------------------------- SIGTERM drains


@pytest.mark.parametrize("how", ["patch", "monolithic"])
def test_sigterm_drains_inflight_upload(fresh_registry_each_driver, how):
    reg, rng = fresh_registry_each_driver, seeded()
    repo = "drain/up"
    data = rng.randbytes(64 * MiB)
    digest = sha256(data)
    piece = MiB
    signalled = threading.Event()
    alive_after_signal: list[bool] = []

    def body():
        for off in range(0, len(data), piece):
            yield data[off:off + piece]
            if off == 16 * MiB:
                reg.proc.send_signal(signal.SIGTERM)
                signalled.set()
                time.sleep(0.5)
                alive_after_signal.append(reg.proc.poll() is None)
            elif off > 16 * MiB:
                time.sleep(0.005)

    with reg.client(timeout=60.0) as c:
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(data))}
        location = start_upload(c, repo) if how == "patch" else ""
        began = time.monotonic()
        try:
            if how == "patch":
                r = c.patch(location, content=body(),
                            headers={**headers, "Content-Range": f"0-{len(data) - 1}"})
            else:
                r = c.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest},
                           content=body(), headers=headers)
        except httpx.HTTPError as e:
            pytest.fail(f"the upload in flight at SIGTERM got no response ({e!r}) after "
                        f"{time.monotonic() - began:.1f}s; exit code {reg.proc.wait(60)}\n{reg.log()}")
        if how == "patch":
            assert r.status_code == 202, (r.status_code, r.text)
            assert range_end(r) == len(data)
            location = r.headers.get("Location") or location
        else:
            assert r.status_code == 201, (r.status_code, r.text)
            assert r.headers["Docker-Content-Digest"] == digest
    assert signalled.is_set()
    assert alive_after_signal == [True], "the process exited with an upload in flight"
    assert reg.proc.wait(30) == 0, reg.log()

    reg.start()
    with reg.client() as c:
        if how == "patch":
            offset, location = upload_status(c, location)
            assert offset == len(data)
            finish_upload(c, location, digest)
        assert pull_blob(c, repo, digest) == data


# --------------------------------------------------------------------------- races


def test_concurrent_pushes_of_the_same_blob(fresh_registry_each_driver):
    reg, rng = fresh_registry_each_driver, seeded()
    # Over 5 MiB: on S3 each upload is completed at a key of its own, the first record keeps
    # its location and every other writer deletes its object (stored_blobs fails on a second).
    data = rng.randbytes(6 * MiB + 7)
    digest = sha256(data)
    repos = ["race/blob-a", "race/blob-b"]
    start = threading.Barrier(16)

    def one(i: int) -> str:
        repo = repos[i % 2]
        with reg.client() as c:
            start.wait(10)
            if i % 4 < 2:
                return push_blob(c, repo, data)
            if i % 4 == 2:
                return push_blob_chunked(c, repo, data, chunk=512 * 1024)
            return finish_upload(c, start_upload(c, repo), digest, data)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert results == [digest] * 16

    with reg.client() as c:
        for repo in repos:
            r = c.head(f"/v2/{repo}/blobs/{digest}")
            assert r.status_code == 200 and int(r.headers["Content-Length"]) == len(data)
            assert r.headers["Docker-Content-Digest"] == digest
            assert pull_blob(c, repo, digest) == data
    assert digest.removeprefix("sha256:") in assert_storage_content_addressed(reg)


def test_concurrent_pushes_of_the_same_tag(fresh_registry):
    reg = fresh_registry
    repo = "race/tag"
    n = 12
    images = [make_image(2, 20_000) for _ in range(n)]
    with reg.client() as c:
        for image in images:
            for blob in (image.config, *image.layers):
                push_blob(c, repo, blob)
    start = threading.Barrier(n)

    def put(body: bytes, tag: str) -> tuple[int, str | None]:
        with reg.client() as c:
            start.wait(10)
            r = c.put(f"/v2/{repo}/manifests/{tag}", content=body,
                      headers={"Content-Type": OCI_MANIFEST})
            return r.status_code, r.headers.get("Docker-Content-Digest")

    with ThreadPoolExecutor(n) as pool:
        different = list(pool.map(put, [i.manifest for i in images], ["latest"] * n))
        same = list(pool.map(put, [images[0].manifest] * n, ["same"] * n))
    assert different == [(201, i.digest) for i in images]
    assert same == [(201, images[0].digest)] * n

    def check() -> bytes:
        with reg.client() as c:
            winner = pull_manifest(c, repo, "latest")
            assert winner in [i.manifest for i in images]
            r = c.head(f"/v2/{repo}/manifests/latest", headers={"Accept": OCI_MANIFEST})
            assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == sha256(winner)
            assert pull_manifest(c, repo, "same") == images[0].manifest
            for image in images:
                assert pull_manifest(c, repo, image.digest) == image.manifest
            r = c.get(f"/v2/{repo}/tags/list")
            assert r.status_code == 200 and sorted(r.json()["tags"]) == ["latest", "same"], r.text
            return winner

    winner = check()
    assert reg.stop() == 0
    reg.start()
    assert check() == winner
