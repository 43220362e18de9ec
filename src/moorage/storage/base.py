"""The blob driver interface: where content-addressed bytes live.

Drivers store immutable blobs by digest and the mutable data of upload
sessions. They never see repository names: a name can't steer a path.
Everything above storage/ reaches blobs through this interface only.

A driver may keep blobs as local files (the filesystem driver) or not at all
(an object store): `local_path` is then None, and every reader streams
instead (`stream`): blob GETs and backups. Writers never need a path: a blob
is written whole (`write`, small ones) or through an upload (`open_upload`,
then `commit_upload`), which is also how restore puts blobs back. Errors are
the storage layer's own (storage/errors.py).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Protocol

# Upload ids are minted by the driver (`new_upload_id`): 32 lowercase hex
# digits, so an id is always safe as a file name or a key, and cheap to reject.
_UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")


def is_upload_id(upload_id: str) -> bool:
    return bool(_UPLOAD_ID.match(upload_id))


def checked_name(name: str) -> str:
    """A file beside the blobs: a relative path of plain segments (a prefix ends with "/"),
    else ValueError, so no name reaches outside the storage."""
    parts = name.split("/")
    if name.startswith("/") or any(p in (".", "..") for p in parts) or "" in parts[:-1]:
        raise ValueError(f"bad file name {name[:60]!r}")
    return name


class Appender(Protocol):
    """Appends to an upload's data, feeding a hasher on the way."""

    offset: int

    async def write(self, chunk: bytes) -> None: ...
    async def finish(self) -> int: ...
    async def abort(self) -> None: ...


class BlobDriver(Protocol):
    name: str   # "filesystem", "s3": what logs and metrics call the driver
    # Whether GC may list every blob (`blob_files`) to find those without a record. A store
    # where that would be too slow (an object store) says False, and its writers note each
    # write in etcd first instead (registry/placement.py).
    lists_blobs: bool

    # -- life: between open() and close() (an object store's connection pool) -------

    async def open(self) -> "BlobDriver": ...

    async def close(self) -> None: ...

    async def probe(self) -> None:
        """Prove the storage works as configured (write, read back, delete) before a replica
        serves; StorageMisconfigured or StorageUnavailable with the sentence an operator needs."""

    # -- blobs by digest ---------------------------------------------------------
    # `location` is the blob record's (meta/records.py BlobRecord): "" for the content
    # address, else where the driver's upload commit put the bytes (`upload_location`).

    def local_path(self, digest: str, location: str = "") -> Path | None:
        """A file to `sendfile` the blob from, or None for drivers without local files."""

    async def exists(self, digest: str, location: str = "") -> int | None:
        """The blob's size, or None."""

    async def read(self, digest: str, location: str = "") -> bytes:
        """A small blob whole (a manifest, an image configuration)."""

    def stream(self, digest: str, start: int = 0, end: int | None = None,
               location: str = "") -> AsyncIterator[bytes]:
        """The blob's bytes [start, end) (to its end when `end` is None), chunk by chunk."""

    async def write(self, digest: str, data: bytes) -> None:
        """Store a small blob whose digest the caller has verified (at its content address)."""

    async def redirect_url(self, digest: str, location: str = "") -> str | None:
        """A short-lived URL clients may fetch the blob from themselves (an object store's
        presigned GET, signed locally), or None when the bytes must go through the replica."""

    async def delete(self, digest: str, location: str = "") -> None: ...

    async def delete_many(self, blobs: Sequence[tuple[str, str]]) -> None:
        """Delete blobs given as (digest, location)."""

    # -- uploads -------------------------------------------------------------------

    def new_upload_id(self) -> str: ...

    async def open_upload(self, upload_id: str, offset: int, hasher=None) -> Appender:
        """Append at `offset` (creating the upload's data on first use),
        cutting off anything past it left by a crash; UploadDataLost when
        less than `offset` is there."""

    async def hash_upload(self, upload_id: str, algorithm: str, length: int) -> str:
        """Hex digest of the first `length` bytes of an upload."""

    def upload_location(self, upload_id: str, size: int) -> str:
        """Where `commit_upload` will put the upload's `size` bytes: "" for the blob's content
        address, or a location of the upload's own (never shared with another upload or blob),
        which a writer's note names before the commit (registry/placement.py)."""

    async def commit_upload(self, upload_id: str, digest: str, keep: bool = False, size: int = 0) -> str:
        """Make the verified upload data, its first `size` bytes, the blob `digest`, atomically;
        returns its location (`upload_location`). At the content address, `keep` leaves the
        upload's data too, to place the blob again from (registry/placement.py); at a location
        of its own the data becomes the blob, and nothing needs placing again."""

    async def delete_upload(self, upload_id: str, unrecorded: bool = False) -> None:
        """Drop the upload's data; with `unrecorded` (no record will ever name its blob: the
        upload was cancelled, or its digest did not match) also what `hash_upload` or
        `commit_upload` made of it at its own location."""

    # -- the proof that a joining replica sees this very storage (join) -------------

    async def write_proof(self, name: str, data: bytes) -> None: ...

    async def read_proof(self, name: str) -> bytes | None: ...

    # -- files beside the blobs (the audit log on a store no replica shares a directory of) ------
    # Names are relative paths of plain segments ("audit/<replica>/<day>/<name>").

    async def put_file(self, name: str, data: bytes) -> None: ...

    async def read_file(self, name: str) -> bytes | None:
        """The file's bytes, or None when there is none."""

    async def list_files(self, prefix: str) -> list[str]:
        """The names of the files directly under `prefix` (which ends with "/"), sorted."""

    async def list_dirs(self, prefix: str) -> list[str]:
        """The names of the directories directly under `prefix`, sorted (one segment each)."""

    async def delete_files(self, names: list[str]) -> None: ...

    # -- garbage collection (registry/gc.py): what is stored, and removing it --------
    # Each listing is (name, size, a time no older than its last write or rename).

    async def blob_files(self) -> list[tuple[str, int, float]]: ...
    async def upload_files(self) -> list[tuple[str, int, float]]: ...
    async def tmp_files(self) -> list[tuple[str, int, float, str]]:
        """With, last, the upload session a file serves ("" for none): GC keeps an active session's."""
    async def delete_tmp(self, name: str) -> None: ...

    async def clock_offset(self) -> float:
        """The storage's clock (what stamps those times) minus this process's, measured now."""
