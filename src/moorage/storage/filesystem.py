"""Filesystem blob driver: one directory every replica mounts.

Layout (all on one filesystem, so renames are atomic):

    blobs/<algorithm>/<2 hex>/<hex>   immutable blob data
    uploads/<upload id>               data of an upload in progress
    tmp/                              files being written
    cluster/<name>                    a joining replica's proof that it sees this directory

A blob appears under blobs/ only by rename, after its data is fsynced and its
digest verified, so a crash leaves either the whole blob or nothing there.
Blocking file work runs in the default thread pool; hashlib and os.write drop
the GIL, so hashing and writing overlap the event loop's network reads. A
failing file system (no space, an I/O error) raises StorageError, saying so.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar

from moorage.digest import DigestError, parse
from moorage.storage.base import checked_name, is_upload_id
from moorage.storage.durable import fsync_dir, write_all
from moorage.storage.errors import StorageError, UploadDataLost

T = TypeVar("T")

# How much of an upload is buffered before it goes to the writer thread: big
# enough that thread hand-offs are rare, small enough to bound memory per upload.
FLUSH_BYTES = 4 << 20
READ_BYTES = 1 << 20
# Syncing as we go keeps the kernel from throttling a writer that has piled up
# hundreds of megabytes of dirty pages, and leaves little for the final fsync:
# measured here, a 256 MiB upload writes in half the time.
SYNC_EVERY = 16 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a range to disk without waiting for it (Linux), else sync it."""
    if _sync_file_range is None or _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE) != 0:
        os.fdatasync(fd)


def _failed(e: OSError) -> StorageError:
    return StorageError(f"storage error: {e.strerror or e}")


async def _io(work: Callable[..., T], *args) -> T:
    """Blocking file work in the thread pool; what the file system refuses, as the storage's error."""
    try:
        return await asyncio.get_running_loop().run_in_executor(None, work, *args)
    except OSError as e:
        raise _failed(e) from e


class FileAppender:
    """Buffered append to an upload file, hashing and writing in parallel.

    Chunks are gathered (not copied) until FLUSH_BYTES, then handed to two
    thread-pool lanes at once: one writes them, one feeds the hasher. Each
    lane has at most one batch in flight while the next one fills, so memory
    per upload stays under about 2 x FLUSH_BYTES whatever the client sends.
    """

    def __init__(self, fd: int, offset: int, hasher=None):
        self._fd = fd
        self.offset = offset
        self.hasher = hasher
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        self._writing: asyncio.Future | None = None
        self._hashing: asyncio.Future | None = None
        self._written = offset
        # From 0, not `offset`: the previous chunk's pages start going to disk
        # while this one arrives, rather than just before its offset is
        # committed, where they would delay etcd's own fsync on the same disk.
        self._synced = 0

    def _write(self, batch: list[bytes]) -> None:
        # One writev a batch: each system call gives the GIL away and must win
        # it back from a busy event loop, so fewer calls mean less waiting.
        size = sum(map(len, batch))
        done = os.writev(self._fd, batch)
        if done < size:  # rare: a short write; finish it piece by piece
            rest = memoryview(b"".join(batch))[done:]
            while rest:
                rest = rest[os.write(self._fd, rest):]
        self._written += size
        if self._written - self._synced >= SYNC_EVERY:
            _start_writeback(self._fd, self._synced, self._written - self._synced)
            self._synced = self._written

    def _hash(self, batch: list[bytes]) -> None:
        # Likewise one update a batch; joining 4 MiB costs less than the waits.
        self.hasher.update(batch[0] if len(batch) == 1 else b"".join(batch))

    async def _wait(self) -> None:
        for lane in ("_writing", "_hashing"):
            fut = getattr(self, lane)
            if fut is not None:
                setattr(self, lane, None)
                try:
                    await fut
                except OSError as e:
                    raise _failed(e) from e

    async def _flush(self) -> None:
        await self._wait()
        if self._batch:
            batch, self._batch, self._batch_bytes = self._batch, [], 0
            loop = asyncio.get_running_loop()
            self._writing = loop.run_in_executor(None, self._write, batch)
            if self.hasher is not None:
                self._hashing = loop.run_in_executor(None, self._hash, batch)

    async def write(self, chunk: bytes) -> None:
        self._batch.append(chunk)
        self._batch_bytes += len(chunk)
        self.offset += len(chunk)
        if self._batch_bytes >= FLUSH_BYTES:
            await self._flush()

    async def finish(self) -> int:
        """Write and hash what is buffered and close; returns the new size.

        No fsync here: an acknowledged chunk that a power loss takes is caught
        by the digest check when the upload closes. The blob itself is
        synced before it is committed (`commit_upload`).
        """
        await self._flush()
        await self._wait()
        os.close(self._fd)
        self._fd = -1
        return self.offset

    async def abort(self) -> None:
        try:
            await self._wait()
        except StorageError:
            pass
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class FilesystemDriver:
    name = "filesystem"
    lists_blobs = True

    def __init__(self, root: Path):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.uploads = self.root / "uploads"
        self.tmp = self.root / "tmp"
        self.proofs = self.root / "cluster"
        for d in (self.blobs, self.uploads, self.tmp):
            d.mkdir(parents=True, exist_ok=True)

    async def open(self) -> "FilesystemDriver":
        return self  # nothing to connect: every call opens what it needs

    async def close(self) -> None:
        pass

    async def probe(self) -> None:
        """Nothing to prove before serving: a directory that cannot be written fails the first write."""

    async def redirect_url(self, digest: str) -> str | None:
        return None

    def local_path(self, digest: str) -> Path:
        return self._path(digest)

    def _path(self, digest: str) -> Path:
        algorithm, hexdigest = parse(digest)
        return self.blobs / algorithm / hexdigest[:2] / hexdigest

    def upload_path(self, upload_id: str) -> Path:
        # Upload ids are minted by us (uuid hex) and checked at the api edge;
        # the check here keeps a bad id from ever naming another file.
        if not is_upload_id(upload_id):
            raise ValueError(f"bad upload id {upload_id!r}")
        return self.uploads / upload_id

    async def exists(self, digest: str) -> int | None:
        return await _io(_size, self._path(digest))

    async def read(self, digest: str) -> bytes:
        return await _io(self._path(digest).read_bytes)

    async def stream(self, digest: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Reads of READ_BYTES in the thread pool: for readers that cannot send the file itself."""
        f = await _io(open, self._path(digest), "rb")
        try:
            await _io(f.seek, start)
            left = None if end is None else end - start
            while left is None or left > 0:
                chunk = await _io(f.read, READ_BYTES if left is None else min(READ_BYTES, left))
                if not chunk:
                    return
                if left is not None:
                    left -= len(chunk)
                yield chunk
        finally:
            f.close()

    def _sync_and_place(self, src: Path, digest: str, keep: bool = False) -> None:
        # O_CREAT: an empty upload never wrote a byte, so it has no file yet.
        fd = os.open(src, os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if keep:  # a second name for the same inode, so the upload's data stays too
            link = self.tmp / uuid.uuid4().hex
            os.link(src, link)
            try:
                self._place(link, digest)
            except BaseException:
                link.unlink(missing_ok=True)
                raise
        else:
            self._place(src, digest)

    def _place(self, src: Path, digest: str) -> None:
        dest = self._path(digest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Same digest, same bytes: replacing a concurrent twin is harmless, and
        # readers holding the old inode keep reading it.
        os.replace(src, dest)
        fsync_dir(dest.parent)

    def _write_small(self, digest: str, data: bytes) -> None:
        tmp = self.tmp / uuid.uuid4().hex
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
        try:
            self._place(tmp, digest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    async def write(self, digest: str, data: bytes) -> None:
        await _io(self._write_small, digest, data)

    async def delete(self, digest: str) -> None:
        await _io(self._unlink, self._path(digest))

    @staticmethod
    def _unlink(path: Path) -> None:
        path.unlink(missing_ok=True)

    def _open_at(self, upload_id: str, offset: int) -> int:
        path = self.upload_path(upload_id)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            # Bytes past the acknowledged offset are from a request that failed
            # or a crash mid-chunk: they were never acknowledged, so drop them.
            size = os.fstat(fd).st_size
            if size < offset:
                raise UploadDataLost(f"upload {upload_id} has {size} bytes, {offset} were acknowledged")
            if size > offset:
                os.ftruncate(fd, offset)
            os.lseek(fd, offset, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        return fd

    async def open_upload(self, upload_id: str, offset: int, hasher=None) -> FileAppender:
        """Append at `offset`; the file is created on first write.

        Like every file operation here it runs off the event loop: creating a
        file can wait behind a journal commit, and the loop must not.
        """
        fd = await _io(self._open_at, upload_id, offset)
        return FileAppender(fd, offset, hasher)

    def _hash_file(self, path: Path, algorithm: str, length: int) -> str:
        h = hashlib.new(algorithm)
        remaining = length
        if length == 0:
            return h.hexdigest()
        with open(path, "rb") as f:
            while remaining > 0:
                chunk = f.read(min(READ_BYTES, remaining))
                if not chunk:
                    break
                h.update(chunk)
                remaining -= len(chunk)
        return h.hexdigest()

    async def hash_upload(self, upload_id: str, algorithm: str, length: int) -> str:
        return await _io(self._hash_file, self.upload_path(upload_id), algorithm, length)

    async def commit_upload(self, upload_id: str, digest: str, keep: bool = False, size: int = 0) -> None:
        # The file holds exactly the acknowledged bytes: open_upload cut off the rest.
        await _io(self._sync_and_place, self.upload_path(upload_id), digest, keep)

    async def delete_upload(self, upload_id: str) -> None:
        try:
            path = self.upload_path(upload_id)
        except ValueError:
            return
        await _io(self._unlink, path)

    def new_upload_id(self) -> str:
        return uuid.uuid4().hex

    # -- the join proof: a file the admitting replica writes and the joining one reads ---

    def _proof_path(self, name: str) -> Path:
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"bad proof name {name[:40]!r}")
        return self.proofs / name

    def _write_proof(self, name: str, data: bytes) -> None:
        self.proofs.mkdir(parents=True, exist_ok=True)
        self._proof_path(name).write_bytes(data)

    async def write_proof(self, name: str, data: bytes) -> None:
        await _io(self._write_proof, name, data)

    def _read_proof(self, name: str) -> bytes | None:
        try:
            return self._proof_path(name).read_bytes()
        except OSError:  # missing or unreadable: either way this node does not see the proof
            return None

    async def read_proof(self, name: str) -> bytes | None:
        return await _io(self._read_proof, name)

    # -- files beside the blobs ----------------------------------------------------

    def _put_file(self, name: str, data: bytes) -> None:
        path = self.root / checked_name(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / f"file-{uuid.uuid4().hex}"
        tmp.write_bytes(data)
        os.replace(tmp, path)

    async def put_file(self, name: str, data: bytes) -> None:
        await _io(self._put_file, name, data)

    def _read_file(self, name: str) -> bytes | None:
        try:
            return (self.root / checked_name(name)).read_bytes()
        except FileNotFoundError:
            return None

    async def read_file(self, name: str) -> bytes | None:
        return await _io(self._read_file, name)

    def _entries(self, prefix: str, dirs: bool) -> list[str]:
        try:
            found = list(os.scandir(self.root / checked_name(prefix)))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(e.name if dirs else prefix + e.name for e in found if e.is_dir() == dirs)

    async def list_files(self, prefix: str) -> list[str]:
        return await _io(self._entries, prefix, False)

    async def list_dirs(self, prefix: str) -> list[str]:
        return await _io(self._entries, prefix, True)

    async def delete_files(self, names: list[str]) -> None:
        paths = [self.root / checked_name(n) for n in names]
        await _io(lambda: [p.unlink(missing_ok=True) for p in paths])

    # -- garbage collection: what is on disk, and removing it --------------------

    def _scan(self, directory: Path, depth: int) -> list[tuple[str, int, float]]:
        """(path relative to `directory`, size, newest of mtime and ctime) of files `depth` levels down.

        ctime too: a rename (an upload placed as a blob) changes it, not the mtime.
        """
        out: list[tuple[str, int, float]] = []
        stack = [(directory, "", depth)]
        while stack:
            path, rel, left = stack.pop()
            try:
                entries = list(os.scandir(path))
            except FileNotFoundError:
                continue
            for e in entries:
                name = f"{rel}/{e.name}" if rel else e.name
                try:
                    if left and e.is_dir(follow_symlinks=False):
                        stack.append((Path(e.path), name, left - 1))
                    elif not left and e.is_file(follow_symlinks=False):
                        st = e.stat(follow_symlinks=False)
                        out.append((name, st.st_size, max(st.st_mtime, st.st_ctime)))
                except FileNotFoundError:
                    continue
        return out

    async def blob_files(self) -> list[tuple[str, int, float]]:
        """(digest, size, age stamp) of every blob file, records or not."""
        found = await _io(self._scan, self.blobs, 2)
        out = []
        for name, size, ts in found:
            algorithm, _, hexdigest = name.split("/")
            digest = f"{algorithm}:{hexdigest}"
            try:
                parse(digest)
            except DigestError:
                continue  # not a blob's name: not ours to judge
            out.append((digest, size, ts))
        return out

    async def upload_files(self) -> list[tuple[str, int, float]]:
        found = await _io(self._scan, self.uploads, 0)
        return [f for f in found if is_upload_id(f[0])]

    async def tmp_files(self) -> list[tuple[str, int, float]]:
        return await _io(self._scan, self.tmp, 0)

    def _probe_clock(self) -> float:
        # A shared filesystem stamps files with its server's clock (the kernel's, locally), which
        # need not be this process's: garbage collection compares file ages on the storage's scale.
        probe = self.tmp / f"clock-{uuid.uuid4().hex}"
        try:
            before = time.time()
            probe.write_bytes(b"")
            stamp = probe.stat().st_mtime
            return stamp - (before + time.time()) / 2
        finally:
            probe.unlink(missing_ok=True)

    async def clock_offset(self) -> float:
        return await _io(self._probe_clock)

    async def delete_tmp(self, name: str) -> None:
        if "/" not in name and name not in ("", ".", ".."):
            await _io(self._unlink, self.tmp / name)

    async def delete_many(self, digests: list[str]) -> None:
        """Remove blob files, in one trip to the thread pool."""
        paths = [self._path(d) for d in digests]
        await _io(lambda: [p.unlink(missing_ok=True) for p in paths])


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None
