"""The S3 blob driver's core (storage/s3/: the client, multipart uploads, the driver) against a real SeaweedFS.

Every call goes to a real `weed server -s3` with a signed identity; faults
are real too: SeaweedFS stopped and started, frozen with SIGSTOP, and a proxy
in front of it (tests/seaweed.py) that answers 503 SlowDown or cuts a
download off. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import socket
import ssl
import time
import uuid
from collections import Counter
from contextlib import asynccontextmanager

import httpx
import pytest

from conftest import wait_for
from moorage.storage.errors import ObjectMissing, StorageError, StorageMisconfigured, StorageUnavailable, UploadInvalid
from moorage.storage.s3.config import MAX_PARTS, MIN_PART, READ_CHUNK, S3Config
from moorage.storage.s3.driver import S3Driver
from moorage.storage.s3.multipart import Part
from seaweed import FaultProxy, SeaweedFS, fault_proxy, seaweed  # noqa: F401 - fixtures

pytestmark = pytest.mark.s3

MiB = 1 << 20
# Short patience, so that a failure is seen in seconds; the retries still happen.
FAST = {"connect_timeout": 1.0, "read_timeout": 2.0, "deadline": 4.0, "attempts": 4, "backoff": 0.05,
        "backoff_max": 0.5}


@pytest.fixture(autouse=True)
def aws_env(seaweed, monkeypatch, tmp_path):
    """The identity from the environment, as a replica gets it; nothing from this
    machine's own ~/.aws, and never the EC2 metadata address."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in seaweed.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))


def config(store: SeaweedFS, endpoint: str | None = None, **kw) -> S3Config:
    """A prefix of the test's own in the shared bucket."""
    options = {"endpoint": endpoint or store.endpoint, "path_style": True, **FAST, **kw}
    return S3Config.from_url(f"s3://{store.bucket}/t/{uuid.uuid4().hex[:12]}", **options)


@asynccontextmanager
async def opened(cfg: S3Config):
    async with S3Driver(cfg) as d:
        yield d


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def upload_id() -> str:
    return uuid.uuid4().hex


def mp_key(d: S3Driver, uid: str) -> str:
    """Where a test's own multipart upload assembles."""
    return f"{d.config.prefix}mp/{uid}"


async def collect(stream) -> bytes:
    return b"".join([c async for c in stream])


# -- blobs ------------------------------------------------------------------------


def test_blob_round_trip_whole_and_ranges(seaweed):
    data = os.urandom(2 * READ_CHUNK + READ_CHUNK // 2)
    digest = digest_of(data)
    n = len(data)

    async def scenario():
        async with opened(config(seaweed)) as d:
            assert await d.exists(digest) is None
            with pytest.raises(ObjectMissing):
                await d.read(digest)
            await d.write(digest, data)
            assert await d.exists(digest) == n
            assert await d.read(digest) == data
            chunks = [c async for c in d.stream(digest)]
            assert b"".join(chunks) == data and max(map(len, chunks)) <= READ_CHUNK
            for start, end in [(0, 1), (n - 1, n), (READ_CHUNK - 1, READ_CHUNK + 1), (12345, n - 777),
                               (READ_CHUNK, 2 * READ_CHUNK)]:
                assert await collect(d.stream(digest, start, end)) == data[start:end], (start, end)
            assert await collect(d.stream(digest, 1000)) == data[1000:]
            assert await collect(d.stream(digest, 5, 5)) == b""
            # Content-addressed: the key says which digest, under the configured prefix.
            assert d.blob_key(digest).endswith(f"/blobs/sha256/{digest[7:9]}/{digest[7:]}")
            assert d.blob_key(digest).startswith(d.config.prefix)
            await d.delete(digest)
            assert await d.exists(digest) is None
            await d.delete(digest)  # gone already: fine

    asyncio.run(scenario())


def test_empty_blob_and_conditional_put(seaweed):
    async def scenario():
        async with opened(config(seaweed)) as d:
            empty = digest_of(b"")
            await d.write(empty, b"")
            assert await d.exists(empty) == 0
            assert await d.read(empty) == b""
            key = d.blob_key(digest_of(b"first"))
            assert await d.client.put_key(key, b"first", if_absent=True) is True
            assert await d.client.put_key(key, b"other", if_absent=True) is False
            assert await d.client.read_key(key) == b"first"

    asyncio.run(scenario())


def test_bad_digests_and_upload_ids_never_become_keys(seaweed):
    d = S3Driver(config(seaweed))
    for bad in ["sha256:../../x", "md5:abc", "sha256:" + "A" * 64, "sha256:" + "a" * 63]:
        with pytest.raises(ValueError):
            d.blob_key(bad)
    for bad in ["../x", "A" * 32, "a" * 31, ""]:
        with pytest.raises(ValueError):
            d.uploads.state_key(bad, 0)
    with pytest.raises(StorageMisconfigured, match="not a valid S3 bucket name"):
        S3Config.from_url("s3://No_Such/x")
    with pytest.raises(StorageMisconfigured, match="not an s3://"):
        S3Config.from_url("http://bucket/x")
    assert S3Config.from_url("s3://bucket//a//b/").prefix == "a/b/"
    assert S3Config.from_url("s3://bucket").prefix == ""


def test_batch_delete_and_paged_listing(seaweed, fault_proxy):
    """1,200 objects: listed over two pages, deleted in two DeleteObjects requests."""
    count = 1200

    async def scenario():
        async with opened(config(seaweed)) as d:
            blobs = [os.urandom(16) + i.to_bytes(4, "big") for i in range(count)]
            sem = asyncio.Semaphore(16)

            async def put(data):
                async with sem:
                    await d.write(digest_of(data), data)

            await asyncio.gather(*(put(b) for b in blobs))
            listed = await d.client.list_keys("blobs/")
            assert len(listed) == count and all(o.size == 20 for o in listed)
            assert {o.key for o in listed} == {d.client.relative(d.blob_key(digest_of(b))) for b in blobs}
        # The deletes through the proxy, to count the requests.
        async with opened(dataclasses.replace(d.config, endpoint=fault_proxy.endpoint)) as via:
            before = fault_proxy.requests
            await via.delete_many([(digest_of(b), "") for b in blobs] + [(digest_of(b"never stored"), "")])
            assert fault_proxy.requests - before == 2
            assert await via.client.list_keys("blobs/") == []

    asyncio.run(scenario())


def test_presigned_get(seaweed):
    data = os.urandom(300_000)
    digest = digest_of(data)

    async def scenario():
        async with opened(config(seaweed)) as d:
            await d.write(digest, data)
            return await d.presign(digest), await d.presign(digest, seconds=3)

    url, short = asyncio.run(scenario())
    assert httpx.get(short, timeout=10).status_code == 200
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200 and r.content == data
    assert httpx.get(url, headers={"Range": "bytes=10-19"}, timeout=10).content == data[10:20]
    assert seaweed.secret_key not in url
    tampered = url.replace("X-Amz-Signature=", "X-Amz-Signature=0")
    assert httpx.get(tampered, timeout=10).status_code == 403
    assert httpx.get(url.split("?")[0], timeout=10).status_code == 403  # no signature, no bytes
    wait_for(lambda: httpx.get(short, timeout=10).status_code == 403, 10, "a presigned URL to expire")


# -- multipart uploads ------------------------------------------------------------------


def test_multipart_odd_part_sizes(seaweed):
    sizes = [MIN_PART + 1, MIN_PART + 7777, 3]
    parts_data = [os.urandom(s) for s in sizes]
    whole = b"".join(parts_data)

    async def scenario():
        async with opened(config(seaweed)) as d:
            uid = upload_id()
            key = mp_key(d, uid)
            s3id = await d.multipart.create_upload(uid, key)
            assert any(u.name == uid and u.s3_upload_id == s3id for u in await d.multipart.list_uploads("mp/"))
            # Part 2 first, then sent again with other bytes: the last one counts.
            await d.multipart.upload_part(uid, s3id, 2, os.urandom(sizes[1]), key)
            parts = [await d.multipart.upload_part(uid, s3id, i + 1, bytearray(p), key) for i, p in enumerate(parts_data)]
            listed = await d.multipart.list_parts(uid, s3id, key)
            assert [(p.number, p.size) for p in parts] == [(1, sizes[0]), (2, sizes[1]), (3, 3)]
            # SeaweedFS lists every version of a part sent twice, in no set order
            # (AWS lists the last): what a session completes with is what it recorded.
            assert set(parts) <= set(listed) and {p.number for p in listed} == {1, 2, 3}
            assert await d.multipart.complete_upload(uid, s3id, parts, key) == len(whole)
            assert all(u.name != uid for u in await d.multipart.list_uploads("mp/"))
            assert await d.client.head_key(key) == len(whole)
            assert await d.client.read_key(key) == whole
            # A range across the boundary of parts 1 and 2.
            a, b = sizes[0] - 100, sizes[0] + 100
            assert await collect(d.client.stream_key(key, a, b)) == whole[a:b]
            # Completing again (a retry whose answer was lost) finds the object.
            assert await d.multipart.complete_upload(uid, s3id, parts, key) == len(whole)

    asyncio.run(scenario())


def test_multipart_rules_are_checked_with_a_sentence(seaweed):
    async def scenario():
        async with opened(config(seaweed)) as d:
            uid = upload_id()
            key = mp_key(d, uid)
            s3id = await d.multipart.create_upload(uid, key)
            small = await d.multipart.upload_part(uid, s3id, 1, b"x" * 1000, key)
            last = await d.multipart.upload_part(uid, s3id, 2, b"y" * 10, key)
            with pytest.raises(UploadInvalid, match="part 1 has 1000 bytes; every part but the last"):
                await d.multipart.complete_upload(uid, s3id, [small, last], key)
            with pytest.raises(UploadInvalid, match="rise"):
                await d.multipart.complete_upload(uid, s3id, [last, small], key)
            with pytest.raises(UploadInvalid, match="at least one part"):
                await d.multipart.complete_upload(uid, s3id, [], key)
            for number in (0, MAX_PARTS + 1):
                with pytest.raises(UploadInvalid, match=f"not {number}"):
                    await d.multipart.upload_part(uid, s3id, number, b"z", key)
            with pytest.raises(UploadInvalid, match="1 byte to 5 GiB"):
                await d.multipart.upload_part(uid, s3id, 3, b"", key)
            # The store agrees with the rule we check first: a small first part is refused.
            with pytest.raises(UploadInvalid):
                await d.client.call("complete", "complete_multipart_upload", Bucket=d.config.bucket,
                              Key=key, UploadId=s3id, MultipartUpload={"Parts": [
                                  {"PartNumber": 1, "ETag": small.etag}, {"PartNumber": 2, "ETag": last.etag}]})
            await d.multipart.abort_upload(uid, s3id, key)

    asyncio.run(scenario())


def test_upload_session_hops_and_completes_in_place_without_a_copy(seaweed):
    """A session appended by a new driver each request (as a hop to another replica or worker
    is), in 1 MiB and odd chunks, with a request that broke off after sending a part of other
    bytes: committed, the blob is the completed multipart upload at the session's own key, the
    store copied nothing, and what the session kept is gone once it is deleted."""
    data = os.urandom(23 * MiB + 12_345)
    sizes = [MiB] * 6 + [1, 3 * MiB - 1, 777, 9 * MiB] + [MiB] * 3
    sizes.append(len(data) - sum(sizes))

    async def scenario():
        uid, offset, calls, cfg = upload_id(), 0, Counter(), config(seaweed)
        for i, size in enumerate(sizes):
            async with opened(cfg) as d:
                if i == 8:
                    # Broken off: bytes unacknowledged (a part of them sent) never reach the blob.
                    a = await d.open_upload(uid, offset, None)
                    await a.write(os.urandom(9 * MiB))
                    await a.abort()
                a = await d.open_upload(uid, offset, None)
                await a.write(data[offset:offset + size])
                offset = await a.finish()
                calls += d.client.calls
        assert offset == len(data)
        async with opened(cfg) as d:
            assert await d.hash_upload(uid, "sha256", offset) == hashlib.sha256(data).hexdigest()
            location = d.upload_location(uid, offset)
            assert location == f"blobs/u/{uid}"
            assert await d.commit_upload(uid, digest_of(data), keep=True, size=offset) == location
            assert await d.read(digest_of(data), location) == data
            assert await d.exists(digest_of(data)) is None, "the blob was also put at its content address"
            await d.delete_upload(uid)
            assert await d.client.list_keys("uploads/") == []
            assert await d.exists(digest_of(data), location) == len(data), "deleting the session took the blob"
            calls += d.client.calls
            await d.delete_many([(digest_of(data), location)])
            assert await d.exists(digest_of(data), location) is None
        assert calls["upload_part"] >= 3 and calls["complete_multipart_upload"] >= 1, calls
        assert not calls["upload_part_copy"] and not calls["copy_object"], calls

    asyncio.run(scenario())


def test_small_sessions_land_at_the_content_address_and_unrecorded_ones_leave_nothing(seaweed):
    small, big = os.urandom(MIN_PART - 1), os.urandom(MIN_PART + 3)

    async def scenario():
        async with opened(config(seaweed)) as d:
            uid = upload_id()
            a = await d.open_upload(uid, 0, None)
            for i in range(0, len(small), MiB):
                await a.write(small[i:i + MiB])
            assert await a.finish() == len(small)
            assert d.upload_location(uid, len(small)) == ""
            assert await d.commit_upload(uid, digest_of(small), size=len(small)) == ""
            assert await d.read(digest_of(small)) == small
            await d.delete_upload(uid)
            # A session whose digest did not match, once hashing completed it in place.
            uid = upload_id()
            a = await d.open_upload(uid, 0, None)
            await a.write(big)
            await a.finish()
            await d.hash_upload(uid, "sha256", len(big))
            assert await d.exists("", d.upload_location(uid, len(big))) == len(big)
            await d.delete_upload(uid, unrecorded=True)
            assert await d.exists("", d.upload_location(uid, len(big))) is None
            # And one cancelled with its multipart upload in progress.
            uid = upload_id()
            a = await d.open_upload(uid, 0, None)
            await a.write(big)
            await a.finish()
            assert [u.key for u in await d.multipart.list_uploads(f"blobs/u/{uid}")] == [d.uploads.location_key(uid)]
            await d.delete_upload(uid, unrecorded=True)
            assert await d.multipart.list_uploads(f"blobs/u/{uid}") == []
            assert await d.client.list_keys("uploads/") == []
            await d.delete_many([(digest_of(small), "")])

    asyncio.run(scenario())


def test_abort(seaweed):
    async def scenario():
        async with opened(config(seaweed)) as d:
            uid = upload_id()
            key = mp_key(d, uid)
            s3id = await d.multipart.create_upload(uid, key)
            await d.multipart.upload_part(uid, s3id, 1, os.urandom(1000), key)
            await d.multipart.abort_upload(uid, s3id, key)
            assert all(u.name != uid for u in await d.multipart.list_uploads("mp/"))
            with pytest.raises(UploadInvalid, match="NoSuchUpload"):
                await d.multipart.list_parts(uid, s3id, key)
            with pytest.raises(UploadInvalid, match="NoSuchUpload"):
                await d.multipart.upload_part(uid, s3id, 2, b"late", key)
            await d.multipart.abort_upload(uid, s3id, key)  # twice: fine
            assert await d.client.head_key(key) is None

    asyncio.run(scenario())


# -- the probe and its sentences ------------------------------------------------------------


def probe_error(cfg: S3Config) -> StorageError:
    async def scenario():
        async with opened(cfg) as d:
            await d.probe()

    with pytest.raises(StorageError) as info:
        asyncio.run(scenario())
    return info.value


def one_sentence(error: Exception, secret: str) -> str:
    text = str(error)
    assert "\n" not in text and len(text) < 400 and secret not in text, text
    return text


def test_probe_passes_and_leaves_nothing(seaweed):
    cfg = config(seaweed)

    async def scenario():
        async with opened(cfg) as d:
            await d.probe()
            assert await d.client.list_keys("") == []

    asyncio.run(scenario())


def test_probe_wrong_secret(seaweed, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    error = probe_error(config(seaweed))
    assert isinstance(error, StorageMisconfigured)
    assert "refused the signature" in one_sentence(error, seaweed.secret_key)
    assert error.code == "SignatureDoesNotMatch"


def test_probe_unknown_access_key(seaweed, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NOSUCHKEY1234")
    error = probe_error(config(seaweed))
    assert isinstance(error, StorageMisconfigured)
    assert "does not know the access key" in one_sentence(error, seaweed.secret_key)


def test_probe_missing_bucket(seaweed):
    cfg = S3Config.from_url("s3://no-such-bucket-here/x", endpoint=seaweed.endpoint, path_style=True, **FAST)
    error = probe_error(cfg)
    assert isinstance(error, StorageMisconfigured)
    assert one_sentence(error, seaweed.secret_key) == \
        f"bucket no-such-bucket-here at {seaweed.endpoint}: the bucket does not exist"


def test_probe_unreachable_endpoint_is_bounded(seaweed):
    with socket.socket() as s:  # a port that is bound, never listening: refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        t0 = time.monotonic()
        error = probe_error(config(seaweed, endpoint=f"http://127.0.0.1:{port}"))
    assert time.monotonic() - t0 < FAST["deadline"] + 2
    assert isinstance(error, StorageUnavailable)
    text = one_sentence(error, seaweed.secret_key)
    assert text.startswith(f"cannot reach the object store (bucket {seaweed.bucket} at http://127.0.0.1:{port})")
    assert "gave up after" in text


def test_no_credentials_anywhere(seaweed, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    error = probe_error(config(seaweed))
    assert isinstance(error, StorageMisconfigured)
    assert one_sentence(error, seaweed.secret_key).startswith("no usable AWS credentials")


def test_credentials_from_the_shared_file_and_a_profile(seaweed, monkeypatch, tmp_path):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    creds = tmp_path / "credentials"
    creds.write_text(f"[default]\naws_access_key_id = {seaweed.access_key}\naws_secret_access_key = wrong\n"
                     f"[registry]\naws_access_key_id = {seaweed.access_key}\n"
                     f"aws_secret_access_key = {seaweed.secret_key}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))

    async def scenario():
        async with opened(config(seaweed, profile="registry")) as d:
            await d.probe()

    asyncio.run(scenario())
    assert isinstance(probe_error(config(seaweed)), StorageMisconfigured)  # [default] has the wrong secret
    error = probe_error(config(seaweed, profile="nobody"))
    assert one_sentence(error, seaweed.secret_key) == \
        "there is no AWS profile 'nobody' in the shared credentials or config file"


# -- faults ------------------------------------------------------------------------------


def via(proxy: FaultProxy, store: SeaweedFS, **kw) -> S3Config:
    return config(store, endpoint=proxy.endpoint, **kw)


def test_slowdown_and_500_are_retried(seaweed, fault_proxy):
    data = b"retried"

    async def scenario():
        async with opened(via(fault_proxy, seaweed)) as d:
            fault_proxy.fail(2)  # 503 SlowDown twice, then through
            before = fault_proxy.requests
            await d.write(digest_of(data), data)
            assert fault_proxy.requests - before == 3
            fault_proxy.fail(1, status=500, code="InternalError")
            before = fault_proxy.requests
            assert await d.read(digest_of(data)) == data
            assert fault_proxy.requests - before == 2
            fault_proxy.fail(1, status=403, code="AccessDenied")  # not retried: it will not get better
            before = fault_proxy.requests
            with pytest.raises(StorageMisconfigured, match="refused to let these credentials look up"):
                await d.exists(digest_of(data))
            assert fault_proxy.requests - before == 1

    asyncio.run(scenario())


def test_slowdown_that_lasts_gives_up_in_bounded_time(seaweed, fault_proxy):
    async def scenario():
        async with opened(via(fault_proxy, seaweed)) as d:
            fault_proxy.fail()
            before = fault_proxy.requests
            t0 = time.monotonic()
            with pytest.raises(StorageUnavailable) as info:
                await d.write(digest_of(b"x"), b"x")
            elapsed = time.monotonic() - t0
            fault_proxy.clear()
            await d.write(digest_of(b"x"), b"x")
            return info.value, elapsed, fault_proxy.requests - before

    error, elapsed, requests = asyncio.run(scenario())
    assert elapsed < FAST["deadline"] + 1
    assert 2 <= requests <= FAST["attempts"] + 1
    assert error.code == "SlowDown" and "gave up after" in one_sentence(error, seaweed.secret_key)


def test_download_cut_off_resumes_where_it_broke(seaweed, fault_proxy):
    data = os.urandom(3 * MiB + 5)

    async def scenario():
        async with opened(via(fault_proxy, seaweed)) as d:
            digest = digest_of(data)
            await d.write(digest, data)
            fault_proxy.cut(after=MiB + 17, count=2)  # two breaks in one download
            before = fault_proxy.requests
            assert await d.read(digest) == data
            assert fault_proxy.requests - before == 3
            fault_proxy.cut(after=100)
            assert await collect(d.stream(digest, 1000, 2 * MiB)) == data[1000:2 * MiB]
            fault_proxy.cut(after=100, count=-1)  # breaks every time: bounded by the attempts
            with pytest.raises(StorageUnavailable, match=f"broke off {FAST['attempts']} times"):
                await d.read(digest)
            fault_proxy.clear()

    asyncio.run(scenario())


def test_hung_store_times_out_then_recovers(seaweed):
    """SIGSTOP: connections open, nothing answers; every call ends by its deadline."""
    data = b"before the hang"

    async def scenario():
        async with opened(config(seaweed)) as d:
            await d.write(digest_of(data), data)
            seaweed.pause()
            try:
                t0 = time.monotonic()
                with pytest.raises(StorageUnavailable, match="cannot reach the object store"):
                    await d.exists(digest_of(data))
                assert time.monotonic() - t0 < FAST["deadline"] + 1
            finally:
                seaweed.resume()
            assert await d.read(digest_of(data)) == data

    asyncio.run(scenario())


def test_slow_store_times_out_then_recovers(seaweed, fault_proxy):
    """Answers slower than the read timeout count as failures; fast again, all is well."""
    async def scenario():
        async with opened(via(fault_proxy, seaweed)) as d:
            await d.write(digest_of(b"slow"), b"slow")
            fault_proxy.delay(FAST["read_timeout"] + 1)
            t0 = time.monotonic()
            with pytest.raises(StorageUnavailable, match="ReadTimeoutError|TimeoutError"):
                await d.exists(digest_of(b"slow"))
            assert time.monotonic() - t0 < FAST["deadline"] + 1
            fault_proxy.clear()
            assert await d.read(digest_of(b"slow")) == b"slow"

    asyncio.run(scenario())


def test_secrets_never_logged(seaweed, fault_proxy, caplog):
    caplog.set_level(logging.DEBUG)

    async def scenario():
        async with opened(via(fault_proxy, seaweed)) as d:
            fault_proxy.fail(1)
            await d.write(digest_of(b"logged?"), b"logged?")
            await d.presign(digest_of(b"logged?"))

    asyncio.run(scenario())
    assert any(r.getMessage() == "s3 retry" for r in caplog.records)  # debug logs were on
    assert seaweed.secret_key not in caplog.text


def test_store_stopped_then_started(seaweed):
    """Down: each call fails within its deadline, naming the store; back: the same
    driver works again by itself, and what was stored is still there."""
    data = os.urandom(5000)

    async def scenario():
        async with opened(config(seaweed)) as d:
            await d.write(digest_of(data), data)
            seaweed.kill9()
            try:
                for call in (d.exists(digest_of(data)), d.write(digest_of(b"during"), b"during"),
                             d.multipart.create_upload("x", mp_key(d, upload_id()))):
                    t0 = time.monotonic()
                    with pytest.raises(StorageUnavailable) as info:
                        await call
                    assert time.monotonic() - t0 < FAST["deadline"] + 1
                    assert seaweed.endpoint in str(info.value)
            finally:
                await asyncio.get_running_loop().run_in_executor(None, seaweed.start)
            assert await d.read(digest_of(data)) == data
            await d.write(digest_of(b"after"), b"after")
            assert await d.read(digest_of(b"after")) == b"after"

    asyncio.run(scenario())


def test_https_with_the_stores_own_ca(seaweed):
    """--s3-ca-cert: a store whose certificate no system CA signed is trusted with
    its CA given, and refused with a sentence saying what to give without it."""
    data = b"over tls"

    async def scenario():
        async with opened(config(seaweed, endpoint=seaweed.https_endpoint, ca_cert=str(seaweed.ca_cert))) as d:
            await d.probe()
            await d.write(digest_of(data), data)
            assert await d.read(digest_of(data)) == data
            url = await d.presign(digest_of(data))
        assert url.startswith(seaweed.https_endpoint)
        trust = ssl.create_default_context(cafile=str(seaweed.ca_cert))
        assert httpx.get(url, verify=trust, timeout=10).content == data

    asyncio.run(scenario())
    error = probe_error(config(seaweed, endpoint=seaweed.https_endpoint))
    assert isinstance(error, StorageMisconfigured)
    assert one_sentence(error, seaweed.secret_key) == (
        f"TLS with the object store at {seaweed.https_endpoint} failed (certificate verify failed: "
        "unable to get local issuer certificate); give its CA with --s3-ca-cert")
