"""Garbage collection at scale: time and memory for 100,000 blobs and 10,000 manifests.

Usage: python bench/gc_bench.py [--blobs N] [--manifests N] [--keep DIR]

One replica runs as a user starts it. The registry's content is written
straight into etcd (records, links, tags) and blob storage (small files), in
bulk, since pushing 100,000 blobs over HTTP would take the benchmark's whole
time: the collector sees exactly what pushes would have left. Every manifest
uses its config and four layers of its repository's pool; 80% are tagged
(untagged ones are kept: gc.untagged_after_seconds is unset); the layers no
manifest drew (about half of all blobs) are garbage and must go, links and
files with them.

Figures: a dry run and a real run, each timed from the run's own record
(seconds from start to finish) with the replica's peak resident memory above
what it held before the run (the index of all records is already in memory
then); and the counts each run reports.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import httpx

import distribution_layout as layout

from moorage.cluster.etcd_member import node_tls
from moorage.meta import keys
from moorage.meta.etcd import EtcdClient, op_put
from moorage.meta.records import BlobRecord, ManifestRecord, encode

PASSWORD = "bench-admin-password"
ENV = {**os.environ, "MOORAGE_ADMIN_PASSWORD": PASSWORD}
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
REPOS = 10
LAYERS_PER_IMAGE = 4
OPS_PER_TXN = 1000


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Content:
    """Records and files for `blobs` blobs (manifest bodies included) and `manifests` manifests."""

    def __init__(self, blobs: int, manifests: int, seed: int = 1):
        rng = random.Random(seed)
        self.kvs: list[tuple[bytes, bytes]] = []
        self.files: dict[str, bytes] = {}
        self.links: list[tuple[str, str]] = []              # (repository, blob digest)
        self.manifests: list[tuple[str, str]] = []          # (repository, manifest digest)
        self.tags: list[tuple[str, str, str]] = []          # (repository, tag, manifest digest)
        self.garbage_blobs: set[str] = set()
        old = time.time() - 7 * 86400
        per_repo = manifests // REPOS
        layers_per_repo = (blobs - 2 * manifests) // REPOS
        for r in range(REPOS):
            repo = f"bench/repo-{r}"
            pool = [self._blob(repo, f"layer {r} {i}".encode() * 4, old) for i in range(layers_per_repo)]
            used: set[str] = set()
            for m in range(per_repo):
                config = self._blob(repo, f"config {r} {m}".encode() * 4, old)
                layers = rng.sample(pool, LAYERS_PER_IMAGE)
                used.update(layers)
                # A real OCI manifest: distribution's garbage-collect parses it (bench.py --s3).
                body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                   "config": self._descriptor(OCI_CONFIG, config),
                                   "layers": [self._descriptor(OCI_LAYER, x) for x in layers]}).encode()
                digest = "sha256:" + hashlib.sha256(body).hexdigest()
                self.files[digest] = body
                self.kvs.append((keys.blob(digest), encode(BlobRecord(size=len(body), created=old))))
                self.kvs.append((keys.manifest(repo, digest), encode(ManifestRecord(
                    media_type=OCI_MANIFEST, size=len(body), created=old, blobs=[config, *layers]))))
                self.manifests.append((repo, digest))
                if rng.random() < 0.8:
                    self.kvs.append((keys.tag(repo, f"t{m}"), digest.encode()))
                    self.tags.append((repo, f"t{m}", digest))
            self.garbage_blobs.update(set(pool) - used)
        self.garbage = len(self.garbage_blobs)

    def write_files(self, storage: Path) -> None:
        write_blob_files(storage, self.files)

    async def write_records(self, client: EtcdClient) -> None:
        for i in range(0, len(self.kvs), OPS_PER_TXN):
            await client.txn([], [op_put(k, v) for k, v in self.kvs[i:i + OPS_PER_TXN]])

    def _descriptor(self, media_type: str, digest: str) -> dict:
        return {"mediaType": media_type, "digest": digest, "size": len(self.files[digest])}

    def _blob(self, repo: str, data: bytes, created: float) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.files[digest] = data
        self.kvs.append((keys.blob(digest), encode(BlobRecord(size=len(data), created=created))))
        self.kvs.append((keys.repo_blob(repo, digest), b""))
        self.links.append((repo, digest))
        return digest

    def distribution_objects(self, root: str, only: set[str] | None = None) -> Iterator[tuple[str, bytes]]:
        """The same content as distribution 2.8 keeps it under `root` in a bucket (bench.py --s3).

        Blob data, the repositories' layer links, manifest revisions and tags;
        `only`: just the data of these blobs (what a collection deleted, to
        put back between rounds).
        """
        for digest, data in self.files.items():
            if only is None or digest in only:
                yield layout.blob_data(root, digest), data
        if only is not None:
            return
        for repo, digest in self.links:
            yield layout.layer_link(root, repo, digest), digest.encode()
        for repo, digest in self.manifests:
            yield layout.revision_link(root, repo, digest), digest.encode()
        for repo, tag, digest in self.tags:
            for key in layout.tag_links(root, repo, tag, digest):
                yield key, digest.encode()


def write_blob_files(storage: Path, files: dict[str, bytes]) -> None:
    """Blob files where the filesystem driver keeps them (also used by console_bench.py)."""
    for digest, data in files.items():
        hexdigest = digest.removeprefix("sha256:")
        d = storage / "blobs" / "sha256" / hexdigest[:2]
        d.mkdir(parents=True, exist_ok=True)
        (d / hexdigest).write_bytes(data)


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def serve_pid(proc: subprocess.Popen) -> int:
    """The Python process serving (the group's leader), not its etcd child."""
    return proc.pid


def run_gc(http: httpx.Client, pid: int, dry_run: bool) -> dict:
    before = rss_kib(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")   # resets the peak (VmHWM) to the current RSS
    run = http.post("/_admin/gc", json={"dry_run": dry_run}).raise_for_status().json()
    while run["state"] == "running":
        time.sleep(0.2)
        run = http.get(f"/_admin/gc/{run['id']}").raise_for_status().json()
    run["rss_before_mib"] = before / 1024
    run["peak_above_mib"] = (rss_kib(pid, "VmHWM") - before) / 1024
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blobs", type=int, default=100_000)
    parser.add_argument("--manifests", type=int, default=10_000)
    parser.add_argument("--keep", type=Path, help="keep the data in this directory (default: a temporary one)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="moorage-gc-bench-"))
    data, storage = work / "data", work / "storage"
    port, client_port, peer_port = free_port(), free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moorage", "--log-level", "warning", "serve", "--data-dir", str(data), "--storage-dir", str(storage),
         "--listen", f"127.0.0.1:{port}", "--etcd-client-port", str(client_port),
         "--etcd-peer-port", str(peer_port)],
        stdout=open(work / "server.log", "ab"), stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    try:
        url = f"https://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if (data / "tls" / "ca.crt").exists():
                    httpx.get(url + "/v2/", verify=str(data / "tls" / "ca.crt"), timeout=1)
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"the replica did not start; see {work / 'server.log'}")
            time.sleep(0.2)

        t0 = time.monotonic()
        content = Content(args.blobs, args.manifests)
        content.write_files(storage)
        t1 = time.monotonic()

        async def load() -> None:
            client = EtcdClient(f"127.0.0.1:{client_port}", node_tls(data), timeout=60)
            try:
                await content.write_records(client)
            finally:
                await client.close()
        asyncio.run(load())
        t2 = time.monotonic()
        print(f"setup: {len(content.files)} blobs on disk in {t1 - t0:.1f}s, {len(content.kvs)} etcd keys "
              f"in {t2 - t1:.1f}s; {content.garbage} layers referenced by nothing")

        with httpx.Client(base_url=url, auth=("admin", PASSWORD), verify=str(data / "tls" / "ca.crt"),
                          timeout=60) as http:
            time.sleep(2)  # let the replica's index apply everything
            for dry in (True, False):
                run = run_gc(http, serve_pid(proc), dry)
                print(f"{'dry run' if dry else 'run    '}: {run['state']} in {run['finished'] - run['started']:.2f}s; "
                      f"replica RSS {run['rss_before_mib']:.0f} MiB before, peak +{run['peak_above_mib']:.0f} MiB "
                      f"during; kept {run['manifests_kept']} manifests, {run['blobs_kept']} blobs; swept "
                      f"{run['blobs_swept']} blobs, {run['links_swept']} links, {run['bytes_freed']} bytes; "
                      f"{run['conflicts']} races")
                if run["state"] != "done":
                    print(json.dumps(run, indent=2))
                    return 1
            left = sum(1 for _ in (storage / "blobs").rglob("*") if _.is_file())
            print(f"files left: {left} (expected {len(content.files) - content.garbage})")
            return 0 if left == len(content.files) - content.garbage else 1
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
