"""Backup and restore: `moorage backup` of a live cluster under pushes, `moorage restore` into a new one.

Real processes throughout: a three-replica cluster made with `moorage join`,
a thread pushing images through another replica while the backup runs, the
archive restored into a fresh directory and served with `moorage serve`,
images pulled back byte for byte (one with skopeo), and a replica joining
the restored cluster. Damaged archives are made by hand from a good one.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
import socket
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from auth import fetch_token
from conftest import ADMIN_PASSWORD, MOORAGE, Cluster, Registry, moorage
from oci import OCI_MANIFEST, Image, make_image, new_repo, push_image, sha256
from test_repair import one_sentence_refusal, tree

pytestmark = pytest.mark.backup

SKOPEO = shutil.which("skopeo") or "/usr/bin/skopeo"


def admin_api(reg: Registry) -> httpx.Client:
    return reg.client(auth=httpx.BasicAuth("admin", ADMIN_PASSWORD))


def pull_all(reg: Registry, images: dict[tuple[str, str], Image]) -> None:
    with reg.client() as c:
        for (repo, ref), image in images.items():
            r = c.get(f"/v2/{repo}/manifests/{ref}", headers={"Accept": OCI_MANIFEST})
            assert r.status_code == 200 and r.content == image.manifest, (repo, ref, r.status_code)
            for blob in [image.config, *image.layers]:
                r = c.get(f"/v2/{repo}/blobs/{sha256(blob)}")
                assert r.status_code == 200 and r.content == blob, (repo, ref, sha256(blob))


def skopeo_pull(reg: Registry, repo: str, ref: str, dest: Path) -> dict[str, bytes]:
    """skopeo copies the image into an OCI layout; returns the layout's blobs by digest."""
    out = subprocess.run([SKOPEO, "--insecure-policy", "copy", "--preserve-digests", "--src-creds", f"admin:{ADMIN_PASSWORD}",
                          "--src-cert-dir", str(reg.cert_dir), f"docker://{reg.host}/{repo}:{ref}",
                          f"oci:{dest}:{ref}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return {f"sha256:{p.name}": p.read_bytes() for p in (dest / "blobs" / "sha256").iterdir()}


def restore(archive: Path, target: Registry, check: bool = True) -> subprocess.CompletedProcess:
    return moorage("restore", "--input", str(archive), "--data-dir", str(target.data_dir),
                   *(["--storage-dir", str(target.storage_dir)] if target.storage_dir else []),
                   "--etcd-client-port", str(target.etcd_client_port),
                   "--etcd-peer-port", str(target.etcd_peer_port), timeout=120, check=check)


def test_backup_of_a_live_cluster_restores_into_a_new_cluster(three: Cluster, tmp_path):
    a, b, c = three.replicas
    repo = new_repo("bk")
    images: dict[tuple[str, str], Image] = {}
    shared = make_image(n_layers=3, layer_size=64 << 10)
    with a.client() as ca:
        images[(repo, "shared")] = push_image(ca, repo, "shared", shared)
        images[(repo + "-b", "shared")] = push_image(ca, repo + "-b", "shared", shared)  # same blobs twice
        for i in range(4):
            name = repo if i % 2 else repo + "-b"
            images[(name, f"v{i}")] = push_image(ca, name, f"v{i}", make_image(n_layers=2, layer_size=200 << 10))
    with admin_api(a) as admin:
        assert admin.put("/_admin/users/carol", json={"password": "carol's long password"}).status_code == 200
        assert admin.put("/_admin/grants", json={"user": "carol", "repo": repo, "role": "read"}).status_code == 200
        assert admin.put("/_admin/config/token.lifetime_seconds", json={"value": 900}).status_code == 200

    # Pushes go on through another replica while the backup runs.
    acked: list[tuple[float, str, Image]] = []
    stop = threading.Event()

    def pusher() -> None:
        with b.client() as cb:
            n = 0
            while not stop.is_set():
                image = push_image(cb, repo, f"live{n}")
                acked.append((time.monotonic(), f"live{n}", image))
                n += 1

    thread = threading.Thread(target=pusher, daemon=True)
    thread.start()
    time.sleep(1.0)
    archive = tmp_path / "cluster.tar"
    began = started = time.monotonic()
    out = moorage("backup", "--existing", a.url, "--output", str(archive), "--with-blobs", timeout=120)
    ended = time.monotonic()
    time.sleep(0.5)
    stop.set()
    thread.join(30)
    assert not thread.is_alive()
    before = [(ref, image) for t, ref, image in acked if t < began]
    during = sum(1 for t, _, _ in acked if began <= t < ended)
    after = sum(1 for t, _, _ in acked if t >= ended)
    print(f"backup took {ended - started:.1f}s; pushes acknowledged: {len(before)} before it, {during} during "
          f"it, {after} after it (the registry never paused)")
    assert before and during and after, (len(before), during, after)
    assert "keep it secret" in out.stdout and archive.stat().st_mode & 0o077 == 0
    for ref, image in before:
        images[(repo, ref)] = image

    with tarfile.open(archive) as tar:
        names = tar.getnames()
        manifest = json.load(tar.extractfile("manifest.json"))
        metadata = json.load(tar.extractfile("metadata.json"))
    assert names[-1] == "manifest.json" and names[0] == "etcd.snapshot"
    assert manifest["format"] == 1 and manifest["with_blobs"] and manifest["etcd_version"].startswith("3.")
    assert {u["name"] for u in metadata["users"]} >= {"admin", "carol"}
    assert metadata["settings"]["token.lifetime_seconds"]["value"] == 900
    assert "hash" not in json.dumps(metadata["users"])
    for image in images.values():
        for blob in [image.config, *image.layers]:
            assert f"blobs/sha256/{sha256(blob)[7:]}" in names

    # The old cluster is gone; the archive is all there is.
    for r in three.replicas:
        r.kill9()
    restored = Registry(tmp_path / "restored" / "data", storage_dir=tmp_path / "restored" / "blobs")
    out = restore(archive, restored)
    assert "a new cluster of one" in out.stdout, out.stdout
    assert (restored.data_dir / "tls" / "ca.crt").read_bytes() == a.ca.read_bytes()
    three.replicas.append(restored)  # the fixture kills it at the end, whatever happens
    restored.start()
    pull_all(restored, images)
    # A push that raced the backup is either wholly in it or not at all: never a tag without its blobs.
    raced = 0
    with restored.client() as cr:
        for t, ref, image in acked:
            if t >= began and cr.head(f"/v2/{repo}/manifests/{ref}",
                                      headers={"Accept": OCI_MANIFEST}).status_code == 200:
                pull_all(restored, {(repo, ref): image})
                raced += 1
    print(f"{raced} pushes acknowledged after the backup began are in it, complete")
    pulled = skopeo_pull(restored, repo, "shared", tmp_path / "layout")
    for blob in [shared.config, *shared.layers]:
        assert pulled[sha256(blob)] == blob

    # Users, grants and settings came along: carol logs in and pulls.
    with restored.client(auth=None) as anon:
        r = fetch_token(anon, [f"repository:{repo}:pull"], "carol", "carol's long password")
        assert r.status_code == 200, r.text
    with restored.client(user="carol", password="carol's long password") as carol:
        assert carol.get(f"/v2/{repo}/manifests/shared", headers={"Accept": OCI_MANIFEST}).status_code == 200
    with admin_api(restored) as admin:
        assert admin.get("/_admin/config").json()["settings"]["token.lifetime_seconds"]["value"] == 900
    status = json.loads(moorage("status", "--existing", restored.url, "--json").stdout)
    assert [r["id"] for r in status["replicas"]] == [restored.replica_id] and status["voters"] == 1, status

    # It is a cluster like any other: pushes work and a replica joins it.
    with restored.client() as cr:
        images[(repo, "after")] = push_image(cr, repo, "after")
    joined = Registry(tmp_path / "joined" / "data", storage_dir=restored.storage_dir, join=restored.url)
    three.replicas.append(joined)
    joined.start(timeout=90)
    status = json.loads(moorage("status", "--existing", joined.url, "--json").stdout)
    assert status["voters"] == 2 and status["healthy"] == 2, status
    pull_all(joined, images)


# -- refusals -----------------------------------------------------------------------

def _rewrite(src: Path, dest: Path, drop: str | None = None, manifest_patch: dict | None = None) -> None:
    """A copy of an archive without one file, or with its manifest changed."""
    with tarfile.open(src) as tin, tarfile.open(dest, "w") as tout:
        for member in tin:
            if member.name == drop:
                continue
            data = tin.extractfile(member).read()
            if member.name == "manifest.json" and manifest_patch:
                data = json.dumps({**json.loads(data), **manifest_patch}).encode()
                member.size = len(data)
            tout.addfile(member, io.BytesIO(data))


def _flip(src: Path, dest: Path, name: str) -> None:
    """A copy of an archive with one byte flipped in the middle of one file."""
    shutil.copy(src, dest)
    with tarfile.open(src) as tar:
        member = tar.getmember(name)
    raw = bytearray(dest.read_bytes())
    raw[member.offset_data + member.size // 2] ^= 0x01
    dest.write_bytes(bytes(raw))


def test_damaged_archives_and_bad_targets_are_refused(registry: Registry, tmp_path):
    repo = new_repo("bkbad")
    with registry.client() as c:
        image = push_image(c, repo, "v1")
    good = tmp_path / "good.tar"
    moorage("backup", "--existing", registry.url, "--output", str(good), "--with-blobs", timeout=120)
    layer = f"blobs/sha256/{sha256(image.layers[0])[7:]}"

    bad: dict[str, tuple[Path, str]] = {}
    _flip(good, tmp_path / "flipped.tar", "etcd.snapshot")
    bad["flipped snapshot"] = (tmp_path / "flipped.tar", "etcd.snapshot")
    _flip(good, tmp_path / "flipped-blob.tar", layer)
    bad["flipped blob"] = (tmp_path / "flipped-blob.tar", "does not match")
    raw = good.read_bytes()
    (tmp_path / "truncated.tar").write_bytes(raw[:len(raw) // 2])
    bad["truncated"] = (tmp_path / "truncated.tar", "truncated")
    with tarfile.open(good) as tar:
        last = tar.getmember("manifest.json")
    (tmp_path / "short.tar").write_bytes(raw[:last.offset_data + last.size // 2])  # cut inside the manifest
    _rewrite(good, tmp_path / "format.tar", manifest_patch={"format": 99})
    bad["wrong format"] = (tmp_path / "format.tar", "format version 99")
    _rewrite(good, tmp_path / "missing.tar", drop="ca/ca.key")
    bad["missing file"] = (tmp_path / "missing.tar", "ca/ca.key")
    _rewrite(good, tmp_path / "no-manifest.tar", drop="manifest.json")
    bad["no manifest"] = (tmp_path / "no-manifest.tar", "incomplete")
    _rewrite(good, tmp_path / "newer-etcd.tar", manifest_patch={"etcd_version": "9.9.0"})
    bad["newer etcd"] = (tmp_path / "newer-etcd.tar", "etcd 9.9.0")
    (tmp_path / "garbage.tar").write_bytes(b"not an archive at all\n" * 100)
    bad["not a tar"] = (tmp_path / "garbage.tar", "not a Moorage backup archive")

    empty = Registry(tmp_path / "target" / "data")
    empty.data_dir.mkdir(parents=True)
    absent = Registry(tmp_path / "absent" / "data")
    for what, (archive, words) in bad.items():
        one_sentence_refusal(restore(archive, empty, check=False), words)
        one_sentence_refusal(restore(archive, absent, check=False), words)
        assert list(empty.data_dir.iterdir()) == [], what
        assert not absent.data_dir.exists(), what
    # Cut anywhere, it is refused.
    one_sentence_refusal(restore(tmp_path / "short.tar", empty, check=False), "damaged")
    assert list(empty.data_dir.iterdir()) == []

    # A non-empty data directory is refused, untouched, even with a good archive.
    busy = Registry(tmp_path / "busy" / "data")
    busy.data_dir.mkdir(parents=True)
    (busy.data_dir / "keep.txt").write_text("mine")
    seen = tree(busy.data_dir)
    one_sentence_refusal(restore(good, busy, check=False), "is not empty")
    assert tree(busy.data_dir) == seen

    # Backup needs a cluster admin: wrong password, or a user who is not one.
    out = tmp_path / "denied.tar"
    one_sentence_refusal(moorage("backup", "--existing", registry.url, "--output", str(out), check=False,
                                 env={"MOORAGE_PASSWORD": "wrong password"}), "refused the admin credentials")
    with admin_api(registry) as admin:
        admin.put("/_admin/users/bkuser", json={"password": "plain user's password"})
    one_sentence_refusal(moorage("backup", "--existing", registry.url, "--output", str(out), check=False,
                                 env={"MOORAGE_USERNAME": "bkuser", "MOORAGE_PASSWORD": "plain user's password"}),
                         "not a cluster admin")
    with registry.client(auth=httpx.BasicAuth("bkuser", "plain user's password")) as plain:
        assert plain.get("/_admin/backup/snapshot").status_code == 403
    with registry.client(auth=None) as anon:
        assert anon.get("/_admin/backup/snapshot").status_code == 401
    assert not out.exists() and not (tmp_path / "denied.tar.partial").exists()

    # The good archive, restored, serves the image (no other replica: metadata and blobs from the archive).
    target = Registry(tmp_path / "ok" / "data")
    restore(good, target)
    target.start()
    try:
        pull_all(target, {(repo, "v1"): image})
    finally:
        target.kill9()


def test_backup_without_blobs_restores_onto_the_storage_as_it_is(registry: Registry, tmp_path):
    """Metadata only: the restored replica uses blob storage that survived (a copy of it here)."""
    repo = new_repo("bkmeta")
    with registry.client() as c:
        image = push_image(c, repo, "v1")
    started = time.time()
    archive = tmp_path / "meta.tar"
    out = moorage("backup", "--existing", registry.url, "--output", str(archive), "--json", timeout=120)
    manifest = json.loads(out.stdout)
    assert manifest["with_blobs"] is False and manifest["blobs"] == 0 and manifest["revision"] > 0
    assert not any(f["name"].startswith("blobs/") for f in manifest["files"])
    assert {f["name"] for f in manifest["files"]} == {"etcd.snapshot", "metadata.json", "ca/ca.crt", "ca/ca.key"}

    # The snapshot, which carries every secret, is in the audit log with who took it.
    def audited() -> bool:
        with admin_api(registry) as admin:
            events = admin.get("/_admin/audit", params={"since": started - 1, "kind": "admin"}).json()["events"]
        return any("/_admin/backup/snapshot" in json.dumps(e) and e.get("user") == "admin" for e in events)
    deadline = time.monotonic() + 10
    while not audited():
        assert time.monotonic() < deadline, "the backup is not in the audit log"
        time.sleep(0.2)

    # An existing archive is not overwritten unless asked.
    kept = archive.read_bytes()
    refused = moorage("backup", "--existing", registry.url, "--output", str(archive), check=False)
    assert refused.returncode == 1 and "already exists" in refused.stderr and "--force" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and archive.read_bytes() == kept
    moorage("backup", "--existing", registry.url, "--output", str(archive), "--force", timeout=120)
    assert archive.read_bytes() != kept and tarfile.open(archive).getnames()[-1] == "manifest.json"

    storage = tmp_path / "storage"
    shutil.copytree(registry.blob_dir, storage, ignore=shutil.ignore_patterns("audit*"))
    target = Registry(tmp_path / "restored" / "data", storage_dir=storage)
    # Port 5000 taken (by another registry, say): the start command restore prints names a free one.
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            taken.bind(("127.0.0.1", 5000))
            taken.listen()
        except OSError:
            pass  # taken already
        out = restore(archive, target)
    assert "has no blobs" in out.stdout, out.stdout
    printed = re.search(r"start it with `moorage (serve [^`]+)`", out.stdout)
    assert printed, out.stdout
    command = shlex.split(printed.group(1))
    listen = command[command.index("--listen") + 1]
    assert listen != "127.0.0.1:5000" and command[:3] == ["serve", "--data-dir", str(target.data_dir)], command
    target.port = int(listen.rsplit(":", 1)[1])
    target.command = lambda: MOORAGE + command  # exactly as printed
    target.start()
    try:
        pull_all(target, {(repo, "v1"): image})
    finally:
        target.kill9()
