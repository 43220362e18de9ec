"""The object store of `make bench-s3`: one SeaweedFS, a bucket per registry, seeding, direct reads.

The store is the test suite's (tests/seaweed.py: `weed server -s3` on
loopback with a signed identity), started once for the whole bench. Every
registry gets a bucket of its own, made the same way on the same store (no
bucket settings beyond SeaweedFS's defaults for any of them), so neither
lists or deletes the other's objects; the direct-read baseline gets one too.

Seeding that is not timed (the 100,000 blobs of the GC comparison) goes
through SeaweedFS's filer HTTP API, where the S3 API's buckets are folders
under /buckets: unsigned, 64 requests in flight, about 1,500 small objects
a second here against about 300 through signed S3 PUTs. What lands is the
same object either way (the S3 API reads it back, as a registry will).
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import aiohttp

# The harness lives with the tests; the bench uses it as it is, so both start
# SeaweedFS the same way.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from seaweed import REGION, WEED, SeaweedFS  # noqa: E402

import distribution_layout as layout  # noqa: E402
from content import MiB, SourceFile  # noqa: E402
from load import BenchError  # noqa: E402
from servers import Server  # noqa: E402

BUCKETS = ("moorage", "distribution", "direct")
DIRECT_KEY = "pull/blob"    # the baseline's copy of the pull blob
SEED_CONCURRENCY = 64
SEED_TIMEOUT = 60.0         # one object through the filer
PRESIGN_SECONDS = 1200      # the baseline's URL; distribution signs its redirects for 20 minutes too
PART_SIZE = 8 * MiB         # the baseline object is uploaded in parts of this size, as Moorage's driver does


@dataclass(frozen=True)
class Bucket:
    """Where a registry keeps its blobs: what it needs to reach them (and nothing secret of the bench's)."""

    store: SeaweedFS
    name: str

    @property
    def endpoint(self) -> str:
        return self.store.endpoint

    @property
    def region(self) -> str:
        return REGION


class ObjectStore:
    """The bench's SeaweedFS: started, buckets made, stopped."""

    def __init__(self, workdir: Path) -> None:
        self.seaweed = SeaweedFS(workdir / "seaweedfs")

    def start(self) -> "ObjectStore":
        self.seaweed.start()
        for name in BUCKETS:
            self.seaweed.create_bucket(name)
        return self

    def bucket(self, name: str) -> Bucket:
        return Bucket(self.seaweed, name)

    def stop(self) -> None:
        self.seaweed.cleanup()

    def pid(self) -> int | None:
        return self.seaweed.proc.pid if self.seaweed.running else None

    def check_alive(self) -> None:
        if not self.seaweed.running:
            raise BenchError(f"SeaweedFS is not running:\n{self.seaweed.log()[-1500:]}")

    # ------------------------------------------------------------------
    # Seeding, untimed

    def put_many(self, bucket: str, objects: Iterable[tuple[str, bytes]]) -> int:
        """Write small objects through the filer, SEED_CONCURRENCY at a time; returns how many."""
        return asyncio.run(self._put_many(bucket, objects))

    async def _put_many(self, bucket: str, objects: Iterable[tuple[str, bytes]]) -> int:
        base = f"http://127.0.0.1:{self.seaweed.ports['filer']}/buckets/{bucket}/"
        pending = iter(objects)
        timeout = aiohttp.ClientTimeout(total=SEED_TIMEOUT)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=SEED_CONCURRENCY),
                                         timeout=timeout) as session:
            async def worker() -> int:
                done = 0
                for key, data in pending:  # shared iterator: each worker takes the next object
                    async with session.put(base + key, data=data) as r:
                        if r.status >= 300:
                            raise BenchError(f"seeding {bucket}/{key}: HTTP {r.status} {(await r.text())[:200]}")
                    done += 1
                return done
            return sum(await asyncio.gather(*(worker() for _ in range(SEED_CONCURRENCY))))

    def put_distribution_blob(self, repo: str, digest: str, data: bytes) -> None:
        """A blob in distribution's bucket as its upload would leave it: data and the repository's link."""
        self.put_many("distribution", [(layout.blob_data("", digest), data),
                                       (layout.layer_link("", repo, digest), digest.encode())])

    def put_file(self, bucket: str, key: str, src: SourceFile) -> None:
        """A big object through the S3 API in PART_SIZE parts: stored as the registries' uploads are."""
        client = self.seaweed.client(timeout=120)
        try:
            upload = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
            parts = []
            with open(src.path, "rb") as f:
                while chunk := f.read(PART_SIZE):
                    n = len(parts) + 1
                    etag = client.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=n,
                                              Body=chunk)["ETag"]
                    parts.append({"PartNumber": n, "ETag": etag})
            client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload,
                                             MultipartUpload={"Parts": parts})
        finally:
            client.close()

    def presign(self, bucket: str, key: str) -> str:
        client = self.seaweed.client()
        try:
            return client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                 ExpiresIn=PRESIGN_SECONDS)
        finally:
            client.close()

    def count(self, bucket: str, prefix: str) -> int:
        """Objects under a prefix, by listing (to check what a GC left)."""
        client = self.seaweed.client(timeout=60)
        try:
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            return sum(page.get("KeyCount", 0) for page in pages)
        finally:
            client.close()


class DirectRead(Server):
    """The pull baseline: curl reading the pull blob straight from SeaweedFS by a presigned URL.

    Its object holds the same bytes as the registries' pull blob, uploaded
    the way their uploads are stored (S3 multipart, PART_SIZE parts) into a
    bucket of its own on the same store. Its "server" is SeaweedFS itself,
    so the CPU and memory columns show the store's.
    """

    def __init__(self, store: ObjectStore, workdir: Path) -> None:
        super().__init__("direct", [], store.seaweed.ports["s3"], workdir, proc=store.seaweed.proc)
        self.store = store

    def start(self) -> None:
        self.store.check_alive()

    def check_alive(self) -> None:
        self.store.check_alive()

    def stop(self) -> None:
        pass  # the store is stopped by its owner, after every registry

    def seed(self, src: SourceFile) -> None:
        self.store.put_file("direct", DIRECT_KEY, src)

    def blob_target(self, repo: str, digest: str) -> str:
        """A fresh presigned URL (path and query) for the object; signing is outside curl's clock."""
        url = self.store.presign("direct", DIRECT_KEY)
        return url.removeprefix(self.url)
