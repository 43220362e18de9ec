"""The push receive path: request bodies into upload files (storage/filesystem.py's FileAppender).

Bodies are copied once into page-aligned buffers, hashed from them in a
thread and written with O_DIRECT where the file system allows it (whole
blocks; an upload's partial last block through the page cache). Checked
here: on the driver, odd offsets and sizes across buffers, direct and
buffered, an abandoned append, and the
bound on buffers; over HTTPS and plain HTTP, odd sizes monolithic and
chunked, a client that stops mid-body, and a digest that does not match.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from conftest import Registry, scratch, wait_for
from moorage.storage import filesystem
from moorage.storage.filesystem import FLUSH_BYTES, Buffers, FilesystemDriver
from oci import (assert_oci_error, finish_upload, new_repo, patch_chunk, pull_blob, range_end, sha256,
                 start_upload, with_digest)

pytestmark = pytest.mark.storage

MiB = 1 << 20
# Pieces that leave every offset unaligned and cross the buffers' edges.
PIECES = [1, 4095, FLUSH_BYTES + 3, MiB + 17, 2 * FLUSH_BYTES - 5, 777]


class CountingBuffers(Buffers):
    """The driver's buffers, counting how many are out at once."""

    def __init__(self) -> None:
        super().__init__()
        self.out = self.most = 0

    def take(self):
        self.out += 1
        self.most = max(self.most, self.out)
        return super().take()

    def give(self, buf) -> None:
        self.out -= 1
        super().give(buf)


@pytest.fixture(params=["direct", "buffered"])
def driver_root(request, tmp_path, monkeypatch) -> Path:
    """The test's directory, written with O_DIRECT; or as on a file system that refuses the flag
    (tmpfs before Linux 6.6, some network file systems), where the driver writes through the
    page cache."""
    if request.param == "buffered":
        monkeypatch.setattr(filesystem, "_open_direct", lambda path: -1)
    else:
        probe = tmp_path / "probe"
        probe.write_bytes(b"")
        fd = filesystem._open_direct(probe)
        assert fd >= 0, "the test directory's file system refuses O_DIRECT"
        os.close(fd)
    return tmp_path


def test_appends_at_odd_offsets_across_buffers(driver_root):
    """Each piece appended by an appender of its own (a PATCH each), then the whole checked:
    the file holds every byte, the hasher saw each once, no more than two buffers per upload."""
    data = os.urandom(sum(PIECES))

    async def scenario() -> tuple[bytes, str, int]:
        driver = FilesystemDriver(driver_root)
        driver._buffers = buffers = CountingBuffers()
        upload, hasher, offset = driver.new_upload_id(), hashlib.sha256(), 0
        for size in PIECES:
            appender = await driver.open_upload(upload, offset, hasher)
            piece = data[offset:offset + size]
            for i in range(0, size, 300_000):  # as aiohttp hands a body over: in pieces
                await appender.write(piece[i:i + 300_000])
            offset = await appender.finish()
            assert buffers.out == 0
        return driver.upload_path(upload).read_bytes(), hasher.hexdigest(), buffers.most

    stored, digest, most = asyncio.run(scenario())
    assert stored == data
    assert digest == hashlib.sha256(data).hexdigest()
    assert most == 2


def test_an_abandoned_append_leaves_the_acknowledged_bytes(driver_root):
    """A body cut off mid-way: what it wrote past the acknowledged offset is gone at the next open."""
    first, rest = os.urandom(FLUSH_BYTES + 5), os.urandom(3 * MiB + 1)

    async def scenario() -> bytes:
        driver = FilesystemDriver(driver_root)
        upload = driver.new_upload_id()
        appender = await driver.open_upload(upload, 0)
        await appender.write(first)
        acknowledged = await appender.finish()
        appender = await driver.open_upload(upload, acknowledged)
        await appender.write(os.urandom(FLUSH_BYTES + 9))  # a buffer went to disk, then the client left
        await appender.abort()
        appender = await driver.open_upload(upload, acknowledged)
        await appender.write(rest)
        await appender.finish()
        return driver.upload_path(upload).read_bytes()

    assert asyncio.run(scenario()) == first + rest


# -- over the wire -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain(request) -> Iterator[Registry]:
    reg = Registry(scratch(request, "plain") / "data", extra_args=["--insecure-http"]).start()
    yield reg
    reg.stop()


@pytest.fixture(params=["https", "http"])
def server(request, registry) -> Registry:
    return registry if request.param == "https" else request.getfixturevalue("plain")


def test_odd_sizes_monolithic_and_chunked(server):
    repo = new_repo("receive")
    data = os.urandom(sum(PIECES))
    with server.client() as c:
        r = c.post(f"/v2/{repo}/blobs/uploads/", params={"digest": sha256(data[:-3])}, content=data[:-3],
                   headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text
        assert pull_blob(c, repo, sha256(data[:-3])) == data[:-3]
        location, offset = start_upload(c, repo), 0
        for size in PIECES[:-1]:
            location = patch_chunk(c, location, data[offset:offset + size], offset)
            offset += size
        finish_upload(c, location, sha256(data), data[offset:])
        assert pull_blob(c, repo, sha256(data)) == data


def _send_half(server: Registry, method: str, path: str, body: bytes, headers: dict[str, str]) -> None:
    """Announce `body`, send half of it, and close the connection."""
    conn = server.connection()
    conn.putrequest(method, path, skip_accept_encoding=True)
    for name, value in {"Authorization": server.authorization(method, path),
                        "Content-Length": str(len(body)), **headers}.items():
        conn.putheader(name, value)
    conn.endheaders()
    conn.send(body[:len(body) // 2])
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()


def test_a_client_leaving_mid_body_commits_nothing(server):
    """Half a chunk, then the connection closes: the upload stays at its acknowledged offset and
    resumes there; half a monolithic blob leaves no blob."""
    repo = new_repo("receive")
    first, second = os.urandom(MiB + 3), os.urandom(5 * MiB + 1)
    with server.client() as c:
        location = patch_chunk(c, start_upload(c, repo), first, 0)
        path = str(c.build_request("PATCH", location).url.raw_path, "ascii")
        _send_half(server, "PATCH", path, second, {"Content-Range": f"{len(first)}-{len(first) + len(second) - 1}"})
        assert range_end(c.get(location)) == len(first)

        def resumed() -> bool:
            r = c.patch(location, content=second, headers={
                "Content-Range": f"{len(first)}-{len(first) + len(second) - 1}"})
            return r.status_code == 202  # 416 while the abandoned request still holds the upload
        wait_for(resumed, 10, "the upload to take the chunk again")
        finish_upload(c, location, sha256(first + second))
        assert pull_blob(c, repo, sha256(first + second)) == first + second

        whole = os.urandom(3 * MiB + 5)
        _send_half(server, "POST", f"/v2/{repo}/blobs/uploads/?digest={sha256(whole)}", whole, {})
        assert c.head(f"/v2/{repo}/blobs/{sha256(whole)}").status_code == 404


def test_a_digest_mismatch_is_refused_and_nothing_committed(server):
    repo = new_repo("receive")
    data, claimed = os.urandom(2 * MiB + 3), sha256(b"something else")
    with server.client() as c:
        location = patch_chunk(c, start_upload(c, repo), data[:MiB], 0)
        r = c.put(with_digest(location, claimed), content=data[MiB:])
        assert_oci_error(r, 400, "DIGEST_INVALID")
        assert c.get(location).status_code == 404  # the session is closed with its data
        r = c.post(f"/v2/{repo}/blobs/uploads/", params={"digest": claimed}, content=data)
        assert_oci_error(r, 400, "DIGEST_INVALID")
        def blob_file(digest: str) -> Path:
            return server.blob_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]
        for digest in (claimed, sha256(data)):
            assert c.head(f"/v2/{repo}/blobs/{digest}").status_code == 404
            assert not blob_file(digest).exists()
        r = c.post(f"/v2/{repo}/blobs/uploads/", params={"digest": sha256(data)}, content=data)
        assert r.status_code == 201 and blob_file(sha256(data)).exists()  # where a blob would be


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A file system of 6 MiB (tmpfs), to run out of space for real."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)], check=True)
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=False)


def test_a_chunk_the_disk_refused_is_sent_again(tmp_path, small_disk):
    """A PATCH's offset is recorded in etcd while its last bytes are still being written; when
    the disk then refuses them, the record goes back: the chunk is not acknowledged, the upload
    still stands where it stood, and once there is room the same chunk is taken and the blob
    is whole."""
    reg = Registry(tmp_path / "data", storage_dir=small_disk).start()
    repo = new_repo("receive")
    first, second = os.urandom(2 * MiB), os.urandom(5 * MiB)  # 7 MiB: past what the disk holds
    try:
        with reg.client() as c:
            location = patch_chunk(c, start_upload(c, repo), first, 0)
            r = c.patch(location, content=second, headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{len(first)}-{len(first) + len(second) - 1}"})
            assert r.status_code >= 500, (r.status_code, r.text)
            assert range_end(c.get(location)) == len(first), "the refused chunk's offset stayed recorded"
            subprocess.run(["mount", "-o", "remount,size=32m", str(small_disk)], check=True)
            location = patch_chunk(c, location, second, len(first))
            finish_upload(c, location, sha256(first + second))
            assert pull_blob(c, repo, sha256(first + second)) == first + second
    finally:
        reg.stop()
