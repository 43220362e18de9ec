#!/usr/bin/env python3
"""The web console at scale: server time of its pages with 10,000 repositories and a repository of 10,000 tags.

Usage: bench/console_bench.py [--quick] [--insecure-http] [--repos N] [--tags N] [--requests N]

One replica runs as an operator starts it (servers.moorage_server). Its
content is written straight into etcd and blob storage, as bench/gc_bench.py
does, since pushing 20,000 images over HTTP would take the whole run: N
repositories of one tagged image each (a config and two of 100 shared
layers), and `big/app`, one repository with N tags, each naming an image of
its own (platforms alternate amd64 and arm64, so the tag pages read configs).

Each page is asked for `--requests` times through a signed-in console
session, at random page numbers (so tag pages read configs they have not
cached), by an admin (who sees everything) and by a user who may pull one
repository in ten (so the list is filtered through Access for every
repository). The figures are the console's own Server-Timing (`app;dur=`:
routing, the session check, the index, rendering) and the time until the
client has the whole page, medians and 95th percentiles, against the
issue's target: under 100 ms of server time.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from gc_bench import write_blob_files
from servers import ADMIN_PASSWORD, Server, moorage_server, wait_for_quiet

from moorage.cluster.etcd_member import node_tls
from moorage.meta import keys
from moorage.meta.etcd import EtcdClient, op_put
from moorage.meta.records import BlobRecord, ManifestRecord, encode

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
TARGET_MS = 100.0
OPS_PER_TXN = 2000
PUSHERS = ("ci-bot", "alice", "bob")
READER, READER_PASSWORD = "reader", "bench-reader-password"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Content:
    """Records and files: `repos` repositories of one image, and big/app with `tags` tags."""

    def __init__(self, repos: int, tags: int, seed: int = 14):
        self.rng = random.Random(seed)
        self.records: dict[bytes, bytes] = {}   # one put per key: a transaction may not repeat one
        self.files: dict[str, bytes] = {}
        self.now = time.time()
        self.layers = [self._blob(self.rng.randbytes(64)) for _ in range(100)]
        for i in range(repos):
            self._image(f"team-{i % 10}/service-{i:05d}", "latest", i)
        for t in range(tags):
            self._image("big/app", f"1.{t // 100}.{t % 100}", t)

    def _blob(self, data: bytes) -> tuple[str, int]:
        digest = digest_of(data)
        self.files[digest] = data
        self.records[keys.blob(digest)] = encode(BlobRecord(size=len(data), created=self.now - 86400))
        return digest, len(data)

    def _image(self, repo: str, tag: str, n: int) -> None:
        arch = ("amd64", "arm64")[n % 2]
        config = json.dumps({"architecture": arch, "os": "linux", "created": "2026-01-01T00:00:00Z",
                             "config": {"Env": [f"BUILD={repo}:{tag}"]},
                             "rootfs": {"type": "layers", "diff_ids": []}}).encode()
        config_digest, config_size = self._blob(config)
        layers = self.rng.sample(self.layers, 2)
        manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                               "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
                               "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": s} for d, s in layers]},
                              indent=2).encode()
        digest, size = self._blob(manifest)
        blobs = [config_digest] + [d for d, _ in layers]
        self.records.update((keys.repo_blob(repo, d), b"") for d in blobs)
        self.records[keys.manifest(repo, digest)] = encode(ManifestRecord(
            media_type=OCI_MANIFEST, size=size, created=self.now - self.rng.uniform(0, 30 * 86400), blobs=blobs,
            artifact_type=OCI_CONFIG, pushed_by=self.rng.choice(PUSHERS)))
        self.records[keys.tag(repo, tag)] = digest.encode()

    async def write_records(self, endpoint: str, data_dir: Path) -> None:
        client = EtcdClient(endpoint, node_tls(data_dir), timeout=60)
        kvs = list(self.records.items())
        try:
            for i in range(0, len(kvs), OPS_PER_TXN):
                await client.txn([], [op_put(k, v) for k, v in kvs[i:i + OPS_PER_TXN]])
        finally:
            await client.close()


@dataclass
class Row:
    title: str
    server_ms: list[float]
    wall_ms: list[float]

    def line(self) -> str:
        s, w = self.server_ms, self.wall_ms
        verdict = "yes" if statistics.median(s) < TARGET_MS and p95(s) < TARGET_MS else "NO"
        return (f"| {self.title} | {statistics.median(s):.1f} | {p95(s):.1f} | {max(s):.1f} | "
                f"{statistics.median(w):.1f} | {verdict} |")


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


def signed_in(server: Server, user: str, password: str) -> httpx.Client:
    client = httpx.Client(base_url=server.url, verify=server.ssl_context() or True, timeout=60)
    form = client.get("/console/sign-in")
    token = re.search(r'name="csrf" value="([^"]+)"', form.text)
    if token is None:
        raise SystemExit(f"no sign-in form at {server.url}/console/sign-in ({form.status_code})")
    answer = client.post("/console/sign-in", headers={"Origin": server.url},
                         data={"csrf": token.group(1), "username": user, "password": password})
    if answer.status_code != 303:
        raise SystemExit(f"signing in as {user} failed: {answer.status_code}")
    return client


def measure(client: httpx.Client, title: str, paths: list[str]) -> Row:
    server_ms, wall_ms = [], []
    client.get(paths[0])  # one untimed request: a first sort builds the summaries every later one reuses
    for path in paths:
        started = time.perf_counter()
        response = client.get(path)
        wall = (time.perf_counter() - started) * 1000
        if response.status_code != 200:
            raise SystemExit(f"{title}: GET {path} answered {response.status_code}")
        timing = re.search(r"app;dur=([0-9.]+)", response.headers.get("server-timing", ""))
        if timing is None:
            raise SystemExit(f"{title}: no Server-Timing header")
        server_ms.append(float(timing.group(1)))
        wall_ms.append(wall)
    row = Row(title, server_ms, wall_ms)
    print(row.line(), flush=True)
    return row


def pages(rng: random.Random, template: str, total: int, per: int, n: int) -> list[str]:
    last = max(1, -(-total // per))
    return [template.format(page=rng.randint(1, last)) for _ in range(n)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2,000 repositories and tags, 10 requests a page")
    p.add_argument("--insecure-http", action="store_true", help="plain HTTP instead of HTTPS")
    p.add_argument("--repos", type=int, help="repositories (default 10,000)")
    p.add_argument("--tags", type=int, help="tags of big/app (default 10,000)")
    p.add_argument("--requests", type=int, help="requests per page (default 40)")
    p.add_argument("--quiet-wait", type=float, default=10.0, help="wait up to S seconds for an idle machine")
    args = p.parse_args()
    repos = args.repos or (2000 if args.quick else 10_000)
    tags = args.tags or (2000 if args.quick else 10_000)
    n = args.requests or (10 if args.quick else 40)
    work = Path(tempfile.mkdtemp(prefix="moorage-console-bench-"))
    server = moorage_server(work, tls=not args.insecure_http)
    rng = random.Random(1)
    try:
        server.start()
        t0 = time.monotonic()
        content = Content(repos, tags)
        write_blob_files(work / "data" / "blobs", content.files)
        endpoint = f"127.0.0.1:{server.command[server.command.index('--etcd-client-port') + 1]}"
        asyncio.run(content.write_records(endpoint, work / "data"))
        with httpx.Client(base_url=server.url, auth=("admin", ADMIN_PASSWORD), verify=server.ssl_context() or True,
                          timeout=60) as api:
            api.put(f"/_admin/users/{READER}", json={"password": READER_PASSWORD}).raise_for_status()
            api.put("/_admin/grants", json={"user": READER, "repo": "team-3/*", "role": "read"}).raise_for_status()
            deadline = time.monotonic() + 120
            while api.get("/health").json()["repositories"] < repos + 1:  # the index has applied it all
                if time.monotonic() > deadline:
                    raise SystemExit("the replica's index did not catch up within 120 s")
                time.sleep(0.5)
        print(f"setup: {repos:,} repositories and big/app with {tags:,} tags ({len(content.records):,} etcd keys, "
              f"{len(content.files):,} blob files) in {time.monotonic() - t0:.1f} s; {n} requests per row, "
              f"{'HTTPS' if server.tls else 'plain HTTP'}", flush=True)
        wait_for_quiet(args.quiet_wait)
        admin = signed_in(server, "admin", ADMIN_PASSWORD)
        reader = signed_in(server, READER, READER_PASSWORD)
        print("\n| page (server time, ms) | median | p95 | max | whole page at the client, median | "
              f"< {TARGET_MS:.0f} ms |\n|---|---|---|---|---|---|")
        rows = [
            measure(admin, f"repositories, {repos:,}, by name", pages(rng, "/console/?page={page}", repos, 50, n)),
            measure(admin, "repositories, by last push", pages(
                rng, "/console/?sort=pushed&order=desc&page={page}", repos, 50, n)),
            measure(admin, "repositories, by size", pages(rng, "/console/?sort=size&page={page}", repos, 50, n)),
            measure(admin, "repositories, search", [f"/console/?q=service-{rng.randint(0, repos // 10):04d}"
                                                    for _ in range(n)]),
            measure(reader, "repositories, a user who may pull 1 in 10",
                    pages(rng, "/console/?page={page}", repos // 10, 50, n)),
            measure(admin, f"big/app, {tags:,} tags, by name", pages(
                rng, "/console/r/big/app?page={page}", tags, 50, n)),
            measure(admin, "big/app, by last push", pages(
                rng, "/console/r/big/app?sort=pushed&order=desc&page={page}", tags, 50, n)),
            measure(admin, "big/app, by size", pages(rng, "/console/r/big/app?sort=size&page={page}", tags, 50, n)),
            measure(admin, "big/app, filter", [f"/console/r/big/app?q=1.{rng.randint(0, tags // 100)}."
                                               for _ in range(n)]),
            measure(admin, "big/app, 100 tags a page", pages(
                rng, "/console/r/big/app?per=100&page={page}", tags, 100, n)),
        ]
        worst = max(max(r.server_ms) for r in rows)
        met = all(statistics.median(r.server_ms) < TARGET_MS and p95(r.server_ms) < TARGET_MS for r in rows)
        print(f"\ntarget (server time under {TARGET_MS:.0f} ms, median and p95): {'met' if met else 'NOT met'}; "
              f"slowest single request {worst:.1f} ms")
        return 0 if met else 1
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
