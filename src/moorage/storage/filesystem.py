"""Filesystem blob driver: one directory every replica mounts.

Layout (all on one filesystem, so renames are atomic):

    blobs/<algorithm>/<2 hex>/<hex>   immutable blob data
    uploads/<upload id>               data of an upload in progress
    tmp/                              files being written
    cluster/<name>                    a joining replica's proof that it sees this directory

A blob appears under blobs/ only by rename, after its data is fsynced and its
digest verified, so a crash leaves either the whole blob or nothing there.
Blocking file work runs in the default thread pool; hashlib and os.write drop
the GIL, so hashing and writing overlap the event loop's network reads.
Uploads are written with O_DIRECT where the file system allows it (FileAppender
says why). A failing file system (no space, an I/O error) raises StorageError,
saying so.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import hashlib
import mmap
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
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
# Buffers kept for the next upload once one ends: a fresh mapping costs a page
# fault per 4 KiB on first use, which measured a third of the CPU of a push of
# 8 MiB chunks (two new buffers per chunk). Four serve two uploads at once.
SPARE_BUFFERS = 4
# O_DIRECT's unit: offsets and lengths of direct writes are multiples of it (the
# largest logical block size in use; FLUSH_BYTES is a multiple of it).
BLOCK = 4096
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


def _open_direct(path: Path) -> int:
    """A second descriptor of the file for O_DIRECT writes, or -1 where the file system has
    none (tmpfs refuses the flag)."""
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT) if hasattr(os, "O_DIRECT") else -1
    except OSError as e:
        if e.errno == errno.EINVAL:
            return -1
        raise


def _failed(e: OSError) -> StorageError:
    return StorageError(f"storage error: {e.strerror or e}")


async def _io(work: Callable[..., T], *args) -> T:
    """Blocking file work in the thread pool; what the file system refuses, as the storage's error."""
    try:
        return await asyncio.get_running_loop().run_in_executor(None, work, *args)
    except OSError as e:
        raise _failed(e) from e


class Buffers:
    """The driver's spare upload buffers (page-aligned anonymous mappings of FLUSH_BYTES)."""

    def __init__(self, spares: int = SPARE_BUFFERS):
        self._free: list[mmap.mmap] = []
        self._spares = spares

    def take(self) -> mmap.mmap:
        # list.pop and append are atomic: appenders are made in the thread pool.
        try:
            return self._free.pop()
        except IndexError:
            return mmap.mmap(-1, FLUSH_BYTES)

    def give(self, buf: mmap.mmap) -> None:
        if len(self._free) < self._spares:
            self._free.append(buf)


class FileAppender:
    """Append to an upload file through two page-aligned buffers: one fills while the other is
    hashed and written, each in a thread-pool lane of its own.

    Measured here per MiB of a push (CPU): the page cache's copy of a buffered
    write and its writeback cost 500-875 µs, an O_DIRECT write of the same bytes
    80 µs, sha256 about 600, TLS decryption about 450 and copying a chunk into
    the buffer 40. So the bytes aiohttp hands over are copied once, into the
    buffer; the hash reads that buffer (hashlib drops the GIL, so it runs while
    the event loop decrypts the next chunk) and the disk takes it by DMA
    (O_DIRECT) where the file system allows it, else by a buffered write.

    O_DIRECT moves whole blocks at block-aligned offsets: a buffer starts at
    the block holding the upload's offset, the part of that block already in
    the file read back into its head; only an upload's last partial block is
    written through the page cache. Memory per upload: two buffers, whatever
    the client sends.
    """

    def __init__(self, fd: int, offset: int, hasher=None, direct: int = -1, head: bytes = b"",
                 buffers: Buffers | None = None):
        self._fd, self._direct = fd, direct
        self.offset = offset
        self.hasher = hasher
        self._buffers = buffers or Buffers(0)
        self._spare: mmap.mmap | None = None
        self._buf = self._buffers.take()
        self._buf[:len(head)] = head
        self._base = offset - len(head)   # the file offset of the buffer's first byte
        self._fill = self._new = len(head)  # bytes in the buffer; where this upload's new ones start
        self._writing: asyncio.Future | None = None
        self._hashing: asyncio.Future | None = None
        # From 0, not `offset`: the previous chunk's pages start going to disk
        # while this one arrives, rather than just before its offset is
        # committed, where they would delay etcd's own fsync on the same disk.
        self._synced = 0

    def _write(self, buf: mmap.mmap, base: int, new: int, fill: int, final: bool) -> None:
        with memoryview(buf) as view:
            if self._direct >= 0:
                whole = fill if not final else fill - fill % BLOCK
                try:
                    _pwrite_all(self._direct, view[:whole], base)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    self._buffered_only()  # accepted at open, refused at the first write
                else:
                    if whole < fill:  # the last partial block: through the page cache
                        _pwrite_all(self._fd, view[whole:fill], base + whole)
                    return
            _pwrite_all(self._fd, view[new:fill], base + new)
        end = base + fill
        if end - self._synced >= SYNC_EVERY:
            _start_writeback(self._fd, self._synced, end - self._synced)
            self._synced = end

    def _buffered_only(self) -> None:
        os.close(self._direct)
        self._direct = -1

    def _hash(self, buf: mmap.mmap, new: int, fill: int) -> None:
        with memoryview(buf) as view:
            self.hasher.update(view[new:fill])

    async def _wait(self) -> None:
        for lane in ("_writing", "_hashing"):
            fut = getattr(self, lane)
            if fut is not None:
                setattr(self, lane, None)
                try:
                    await fut
                except OSError as e:
                    raise _failed(e) from e

    async def _flush(self, final: bool = False) -> None:
        """Hand the filled buffer to the lanes and start filling the other one."""
        await self._wait()  # the other buffer's lanes: done before it is filled again
        buf, base, new, fill = self._buf, self._base, self._new, self._fill
        if fill > new:
            loop = asyncio.get_running_loop()
            self._writing = loop.run_in_executor(None, self._write, buf, base, new, fill, final)
            if self.hasher is not None:
                self._hashing = loop.run_in_executor(None, self._hash, buf, new, fill)
        # Only a full buffer (whole blocks) is flushed before the end: the next starts at its end.
        self._buf, self._spare = self._spare or self._buffers.take(), buf
        self._base, self._fill, self._new = base + fill, 0, 0

    async def write(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            n = min(len(view), FLUSH_BYTES - self._fill)
            self._buf[self._fill:self._fill + n] = view[:n]
            self._fill += n
            self.offset += n
            view = view[n:]
            if self._fill == FLUSH_BYTES:
                await self._flush()

    async def finish(self) -> int:
        """Write and hash what is buffered and close; returns the new size.

        No fsync here: an acknowledged chunk that a power loss takes is caught
        by the digest check when the upload closes. The blob itself is
        synced before it is committed (`commit_upload`).
        """
        await self._flush(final=True)
        await self._wait()
        self._close()
        # Only here is no lane known to be still reading them (an abort may follow a
        # cancellation that left a thread running): the buffers serve the next upload.
        for buf in (self._buf, self._spare):
            if buf is not None:
                self._buffers.give(buf)
        self._spare = None
        return self.offset

    async def abort(self) -> None:
        try:
            await self._wait()
        except StorageError:
            pass
        self._close()

    def _close(self) -> None:
        for fd in (self._fd, self._direct):
            if fd >= 0:
                os.close(fd)
        self._fd = self._direct = -1


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


class FilesystemDriver:
    name = "filesystem"
    lists_blobs = True

    def __init__(self, root: Path):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.uploads = self.root / "uploads"
        self.tmp = self.root / "tmp"
        self.proofs = self.root / "cluster"
        self._buffers = Buffers()
        for d in (self.blobs, self.uploads, self.tmp):
            d.mkdir(parents=True, exist_ok=True)

    async def open(self) -> "FilesystemDriver":
        return self  # nothing to connect: every call opens what it needs

    async def close(self) -> None:
        pass

    async def probe(self) -> None:
        """Nothing to prove before serving: a directory that cannot be written fails the first write."""

    # Blobs live at their content address only (`location` is always ""): a rename places
    # an upload there without copying a byte.

    async def redirect_url(self, digest: str, location: str = "") -> str | None:
        return None

    def local_path(self, digest: str, location: str = "") -> Path:
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

    async def exists(self, digest: str, location: str = "") -> int | None:
        return await _io(_size, self._path(digest))

    async def read(self, digest: str, location: str = "") -> bytes:
        return await _io(self._path(digest).read_bytes)

    async def stream(self, digest: str, start: int = 0, end: int | None = None,
                     location: str = "") -> AsyncIterator[bytes]:
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

    async def delete(self, digest: str, location: str = "") -> None:
        await _io(self._unlink, self._path(digest))

    @staticmethod
    def _unlink(path: Path) -> None:
        path.unlink(missing_ok=True)

    def _open_at(self, upload_id: str, offset: int, hasher=None) -> FileAppender:
        path = self.upload_path(upload_id)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        direct = -1
        try:
            # Bytes past the acknowledged offset are from a request that failed
            # or a crash mid-chunk: they were never acknowledged, so drop them.
            size = os.fstat(fd).st_size
            if size < offset:
                raise UploadDataLost(f"upload {upload_id} has {size} bytes, {offset} were acknowledged")
            if size > offset:
                os.ftruncate(fd, offset)
            direct = _open_direct(path)
            # The start of the block the offset falls in: the direct writes rewrite it whole.
            head = os.pread(fd, offset % BLOCK, offset - offset % BLOCK) if direct >= 0 else b""
            return FileAppender(fd, offset, hasher, direct, head, self._buffers)
        except BaseException:
            os.close(fd)
            if direct >= 0:
                os.close(direct)
            raise

    async def open_upload(self, upload_id: str, offset: int, hasher=None) -> FileAppender:
        """Append at `offset`; the file is created on first write.

        Like every file operation here it runs off the event loop: creating a
        file can wait behind a journal commit, and the loop must not.
        """
        return await _io(self._open_at, upload_id, offset, hasher)

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

    def upload_location(self, upload_id: str, size: int) -> str:
        return ""

    async def commit_upload(self, upload_id: str, digest: str, keep: bool = False, size: int = 0) -> str:
        # The file holds exactly the acknowledged bytes: open_upload cut off the rest.
        await _io(self._sync_and_place, self.upload_path(upload_id), digest, keep)
        return ""

    async def delete_upload(self, upload_id: str, unrecorded: bool = False) -> None:
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

    async def tmp_files(self) -> list[tuple[str, int, float, str]]:
        # Files being written (a blob placed, a probe): none outlives the request that made it.
        return [(name, size, stamp, "") for name, size, stamp in await _io(self._scan, self.tmp, 0)]

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

    async def delete_many(self, blobs: Sequence[tuple[str, str]]) -> None:
        """Remove blob files, in one trip to the thread pool."""
        paths = [self._path(d) for d, _ in blobs]
        await _io(lambda: [p.unlink(missing_ok=True) for p in paths])


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None
