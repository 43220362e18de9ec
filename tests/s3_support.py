"""What the S3 tests share: a replica on a prefix of the module's SeaweedFS, and what its etcd and
its bucket hold (test_s3.py, test_s3_gc.py)."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import msgspec
import pytest

from conftest import ObjectStore, Registry, scratch
from moorage.meta.records import BlobRecord
from seaweed import SeaweedFS

MiB = 1 << 20
OCTET = {"Content-Type": "application/octet-stream"}


def store_of(store: SeaweedFS, prefix: str, *extra: str) -> ObjectStore:
    return ObjectStore.on(store, prefix, *extra)


def objects(store: SeaweedFS, prefix: str) -> dict[str, int]:
    return store.objects(prefix)


def blob_key(digest: str) -> str:
    algorithm, hexdigest = digest.split(":")
    return f"blobs/{algorithm}/{hexdigest[:2]}/{hexdigest}"


def records(reg: Registry, *digests: str) -> dict[str, BlobRecord | None]:
    """The blob records in the replica's etcd."""
    from moorage.meta import keys

    async def run() -> dict[str, BlobRecord | None]:
        client = reg.etcd_client()
        try:
            kvs = {d: await client.get(keys.blob(d)) for d in digests}
            return {d: None if kv is None else msgspec.json.decode(kv.value, type=BlobRecord) for d, kv in kvs.items()}
        finally:
            await client.close()
    return asyncio.run(run())


def stored_at(reg: Registry, digest: str) -> str:
    """The key of a recorded blob's object: its record's location (a large upload completed in
    place), else its content address."""
    record = records(reg, digest)[digest]
    assert record is not None, f"{digest} has no record"
    return record.location or blob_key(digest)


@pytest.fixture(scope="module")
def s3reg(seaweed, request):  # noqa: F811 - the fixture
    prefix = f"r-{uuid.uuid4().hex[:8]}"
    store = store_of(seaweed, prefix)
    reg = Registry(scratch(request, "s3reg") / "data", extra_args=store.args, env=store.env,
                   object_store=(seaweed, prefix)).start()
    reg.prefix = prefix
    yield reg
    reg.stop()


@pytest.fixture
def c(s3reg):
    with s3reg.client() as client:
        yield client


def fetch(c: httpx.Client, repo: str, digest: str, store: SeaweedFS) -> bytes:
    """A blob GET: a 307 to a presigned URL of the store, followed without credentials."""
    r = c.get(f"/v2/{repo}/blobs/{digest}")
    assert r.status_code == 307, (r.status_code, r.text[:300])
    assert r.headers["Docker-Content-Digest"] == digest
    location = r.headers["Location"]
    assert location.startswith(store.endpoint + "/"), location
    got = httpx.get(location, timeout=30)
    assert got.status_code == 200, (got.status_code, got.text[:300])
    return got.content

