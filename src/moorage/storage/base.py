"""The blob driver interface: where content-addressed bytes live.

Drivers store immutable blobs by digest and the mutable data of upload
sessions. They never see repository names: a name can't steer a path.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

# Upload ids are minted by the driver (`new_upload_id`): 32 lowercase hex
# digits, so an id is always safe as a file name and cheap to reject.
_UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")


def is_upload_id(upload_id: str) -> bool:
    return bool(_UPLOAD_ID.match(upload_id))


class UploadDataLost(Exception):
    """An upload's data is shorter than its acknowledged offset (lost in a crash)."""


class Appender(Protocol):
    """Appends to an upload's data, feeding a hasher on the way."""

    offset: int

    async def write(self, chunk: bytes) -> None: ...
    async def finish(self) -> int: ...
    async def abort(self) -> None: ...


class BlobDriver(Protocol):
    def local_path(self, digest: str) -> Path | None:
        """A file to `sendfile` the blob from, or None for drivers without one."""

    async def exists(self, digest: str) -> int | None:
        """The blob's size, or None."""

    async def read(self, digest: str) -> bytes: ...

    async def write(self, digest: str, data: bytes) -> None:
        """Store a small blob whose digest the caller has verified."""

    async def delete(self, digest: str) -> None: ...

    async def open_upload(self, upload_id: str, offset: int, hasher=None) -> Appender:
        """Append at `offset` (creating the upload's data on first use),
        cutting off anything past it left by a crash."""

    async def hash_upload(self, upload_id: str, algorithm: str, length: int) -> str:
        """Hex digest of the first `length` bytes of an upload."""

    async def commit_upload(self, upload_id: str, digest: str, keep: bool = False) -> None:
        """Make the verified upload data the blob `digest`, atomically; with `keep`
        the upload's data stays too, to place the blob again from (registry/placement.py)."""

    async def delete_upload(self, upload_id: str) -> None: ...

    def new_upload_id(self) -> str: ...

    # Garbage collection (registry/gc.py): what is stored, and removing it.
    # Each listing is (name, size, a time no older than its last write or rename).

    async def blob_files(self) -> list[tuple[str, int, float]]: ...
    async def upload_files(self) -> list[tuple[str, int, float]]: ...
    async def tmp_files(self) -> list[tuple[str, int, float]]: ...
    async def delete_tmp(self, name: str) -> None: ...
    async def delete_many(self, digests: list[str]) -> None: ...

    async def clock_offset(self) -> float:
        """The storage's clock (what stamps those times) minus this process's, measured now."""
