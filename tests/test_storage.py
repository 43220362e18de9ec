"""The blob driver interface (storage/base.py) as its users rely on it, with the real filesystem driver.

An object store has no local files: a driver then says `local_path` is None,
and every reader streams instead. Here the filesystem driver is run that
way too (`NoLocalFiles`: the same driver with its paths withheld, as an
object store would withhold them), and what streams must answer exactly as
what sends the file does: a blob GET's body, its ranges and refusals
(api/blobfile.py), and a restore, which writes blobs through uploads.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from moorage.api.blobfile import blob_response
from moorage.cluster.backup import archive
from moorage.cluster.backup.blobs import restore_blobs
from moorage.registry.repositories import BlobBody
from moorage.storage.errors import StorageError, UploadDataLost
from moorage.storage.filesystem import FilesystemDriver

pytestmark = pytest.mark.storage

SIZE = 3 * (1 << 20) + 12345   # a few of the driver's read chunks, and a partial one


class NoLocalFiles(FilesystemDriver):
    """The filesystem driver with its local paths withheld, as a driver without files has none."""

    def local_path(self, digest: str) -> None:  # type: ignore[override]
        return None


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def _body(driver: FilesystemDriver, digest: str) -> BlobBody:
    size = await driver.exists(digest)
    assert size is not None
    return BlobBody(digest, size, driver.local_path(digest),
                    lambda start, end: driver.stream(digest, start, end))


def _serve(root: Path, data: bytes, requests: list[tuple[str, dict[str, str]]]) -> dict[str, list]:
    """Each request's (status, Content-Range, Content-Length, body) from a file-sending and a streaming server."""
    digest = sha256(data)

    async def scenario() -> dict[str, list]:
        drivers = {"file": FilesystemDriver(root), "stream": NoLocalFiles(root)}
        await drivers["file"].write(digest, data)
        out: dict[str, list] = {}
        for kind, driver in drivers.items():
            async def handler(request: web.BaseRequest, driver=driver) -> web.StreamResponse:
                return blob_response(await _body(driver, digest), {"Content-Type": "application/octet-stream"})
            server = web.Server(handler)
            runner = web.ServerRunner(server)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            try:
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
                    out[kind] = []
                    for method, headers in requests:
                        r = await c.request(method, "/blob", headers=headers)
                        out[kind].append((r.status_code, r.headers.get("Content-Range"),
                                          r.headers.get("Content-Length"), r.content))
            finally:
                await runner.cleanup()
        return out

    return asyncio.run(scenario())


def test_a_streamed_blob_answers_as_the_sent_file_does(tmp_path):
    data = os.urandom(SIZE)
    cases = [("GET", {}), ("HEAD", {}),
             ("GET", {"Range": "bytes=0-0"}), ("GET", {"Range": "bytes=1048575-1048576"}),
             ("GET", {"Range": f"bytes=12345-{SIZE - 1}"}), ("GET", {"Range": "bytes=2000000-"}),
             ("GET", {"Range": "bytes=-5000"}), ("GET", {"Range": f"bytes=-{SIZE + 10}"}),
             ("GET", {"Range": f"bytes=100-{SIZE + 500}"}),
             ("GET", {"Range": f"bytes={SIZE}-"}), ("GET", {"Range": "bytes=5-2"}),
             ("GET", {"Range": "bytes=0-1,5-6"}), ("GET", {"Range": "pages=1-2"})]
    found = _serve(tmp_path / "storage", data, cases)
    assert found["stream"] == found["file"]
    statuses = [status for status, *_ in found["stream"]]
    assert statuses == [200, 200, 206, 206, 206, 206, 206, 206, 206, 416, 416, 416, 416]
    whole, head, first, across, *_ = found["stream"]
    assert whole[3] == data and int(whole[2]) == SIZE
    assert head[3] == b"" and int(head[2]) == SIZE
    assert first[1] == f"bytes 0-0/{SIZE}" and first[3] == data[:1]
    assert across[1] == f"bytes 1048575-1048576/{SIZE}" and across[3] == data[1048575:1048577]
    assert found["stream"][6][3] == data[-5000:]
    assert found["stream"][9][1] == f"bytes */{SIZE}"


def test_restore_puts_blobs_back_through_a_driver_without_local_files(tmp_path):
    blobs = [os.urandom(n) for n in (0, 1000, 2 * archive.CHUNK + 77)]
    path = tmp_path / "archive.tar"
    writer = archive.ArchiveWriter(path)
    snapshot = os.urandom(4096)
    writer.add_bytes(archive.SNAPSHOT, snapshot + hashlib.sha256(snapshot).digest())  # etcd's own trailer
    writer.add_bytes(archive.CA_CERT, b"cert")
    writer.add_bytes(archive.CA_KEY, b"key")
    for data in blobs:
        writer.add_stream(archive.blob_name(sha256(data)), len(data), [data], expect_digest=sha256(data))
    writer.finish(archive.new_manifest({"etcd_version": "3.4.0", "revision": 1, "replica": "r",
                                       "cluster_token": "t"}, True, len(blobs)))
    checked = archive.check(path, "3.4.23")
    storage = NoLocalFiles(tmp_path / "storage")
    already = blobs[1]

    async def scenario() -> tuple[tuple[int, int], list[bytes]]:
        await storage.write(sha256(already), already)
        written, present, moved = await restore_blobs(checked, storage)
        assert moved == {}   # the filesystem keeps blobs at their content address
        return (written, present), [await storage.read(sha256(data)) for data in blobs]

    (written, present), read = asyncio.run(scenario())
    assert (written, present) == (2, 1)
    assert read == blobs
    assert asyncio.run(storage.upload_files()) == [], "an upload's data was left behind"


def test_a_failing_file_system_is_the_storage_error_not_a_crash(tmp_path):
    """What the kernel refuses comes out as StorageError, one sentence (the api answers 500 with it)."""
    root = tmp_path / "storage"
    driver = FilesystemDriver(root)
    data = b"x" * 100
    digest = sha256(data)
    (root / "blobs" / "sha256").write_bytes(b"")   # a file where the driver needs a directory

    async def scenario() -> None:
        with pytest.raises(StorageError, match="^storage error: "):
            await driver.write(digest, data)
        upload = driver.new_upload_id()
        appender = await driver.open_upload(upload, 0)
        await appender.write(b"y" * 10)
        assert await appender.finish() == 10
        with pytest.raises(UploadDataLost):      # an offset past what the upload holds
            await driver.open_upload(upload, 11)
        with pytest.raises(StorageError, match="^storage error: "):
            await driver.commit_upload(upload, digest)

    asyncio.run(scenario())
