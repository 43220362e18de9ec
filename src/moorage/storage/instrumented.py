"""Any blob driver, timed: registry_storage_action_seconds and moorage_storage_errors_total.

storage_at() wraps the driver it builds in this, so every driver (the
filesystem's, S3's) is measured the same way under distribution's action
names, with `driver` the driver's own `name`. A blob that is not there
(ObjectMissing, or exists() answering None) is an answer, not a failure: only
other StorageErrors count as errors, since clients HEAD missing blobs on every
push and an alert on those would never stop.

A stream is timed to its first chunk (what distribution's Reader measures:
opening it), an upload to its appender being ready (Writer); the bytes that
follow are the client's pace, not the store's.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from moorage.metrics import STORAGE_ACTIONS, Metrics
from moorage.storage.base import Appender, BlobDriver
from moorage.storage.errors import ObjectMissing, StorageError


class _Children(dict):
    def __init__(self, make):
        super().__init__()
        self._make = make

    def __missing__(self, action: str):
        child = self[action] = self._make(action)
        return child


class InstrumentedDriver:
    """A BlobDriver that times and counts what the driver it wraps does."""

    def __init__(self, driver: BlobDriver, metrics: Metrics):
        self.driver = driver
        self.name: str = getattr(driver, "name", type(driver).__name__)
        # The errors' children exist at 0 from the start (an alert's increase() needs them);
        # the timings' only once an action was timed.
        self._seconds = _Children(lambda action: metrics.storage_seconds.labels(self.name, action))
        self._errors = {a: metrics.storage_errors.labels(self.name, a) for a in STORAGE_ACTIONS}

    def __getattr__(self, attribute: str) -> Any:
        # What is not a timed action (a driver's own attributes) is the driver's.
        return getattr(self.driver, attribute)

    async def _timed(self, action: str, call):
        started = time.perf_counter()
        try:
            return await call
        except ObjectMissing:
            raise
        except StorageError:
            self._errors[action].inc()
            raise
        finally:
            self._seconds[action].observe(time.perf_counter() - started)

    # -- life ------------------------------------------------------------------------

    async def open(self) -> "InstrumentedDriver":
        await self.driver.open()
        return self

    async def close(self) -> None:
        await self.driver.close()

    async def probe(self) -> None:
        await self.driver.probe()  # before serving: its failure is a refusal to start, not a metric

    # -- blobs -------------------------------------------------------------------------

    def local_path(self, digest: str, location: str = "") -> Path | None:
        return self.driver.local_path(digest, location)

    async def exists(self, digest: str, location: str = "") -> int | None:
        return await self._timed("Stat", self.driver.exists(digest, location))

    async def read(self, digest: str, location: str = "") -> bytes:
        return await self._timed("GetContent", self.driver.read(digest, location))

    async def stream(self, digest: str, start: int = 0, end: int | None = None,
                     location: str = "") -> AsyncIterator[bytes]:
        chunks = self.driver.stream(digest, start, end, location)
        started = time.perf_counter()
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            self._seconds["Reader"].observe(time.perf_counter() - started)
            return
        except ObjectMissing:
            raise
        except StorageError:
            self._errors["Reader"].inc()
            raise
        self._seconds["Reader"].observe(time.perf_counter() - started)
        yield first
        async for chunk in chunks:
            yield chunk

    async def write(self, digest: str, data: bytes) -> None:
        await self._timed("PutContent", self.driver.write(digest, data))

    async def redirect_url(self, digest: str, location: str = "") -> str | None:
        return await self._timed("URLFor", self.driver.redirect_url(digest, location))

    async def delete(self, digest: str, location: str = "") -> None:
        await self._timed("Delete", self.driver.delete(digest, location))

    async def delete_many(self, blobs: Sequence[tuple[str, str]]) -> None:
        await self._timed("Delete", self.driver.delete_many(blobs))

    # -- uploads -------------------------------------------------------------------------

    def new_upload_id(self) -> str:
        return self.driver.new_upload_id()

    async def open_upload(self, upload_id: str, offset: int, hasher=None) -> Appender:
        return await self._timed("Writer", self.driver.open_upload(upload_id, offset, hasher))

    async def hash_upload(self, upload_id: str, algorithm: str, length: int) -> str:
        return await self._timed("Reader", self.driver.hash_upload(upload_id, algorithm, length))

    def upload_location(self, upload_id: str, size: int) -> str:
        return self.driver.upload_location(upload_id, size)

    async def commit_upload(self, upload_id: str, digest: str, keep: bool = False, size: int = 0) -> str:
        return await self._timed("Move", self.driver.commit_upload(upload_id, digest, keep, size))

    async def delete_upload(self, upload_id: str, unrecorded: bool = False) -> None:
        await self._timed("Delete", self.driver.delete_upload(upload_id, unrecorded))

    # -- join's proof ------------------------------------------------------------------------

    async def write_proof(self, name: str, data: bytes) -> None:
        await self._timed("PutContent", self.driver.write_proof(name, data))

    async def read_proof(self, name: str) -> bytes | None:
        return await self._timed("GetContent", self.driver.read_proof(name))

    # -- garbage collection -------------------------------------------------------------------

    async def blob_files(self) -> list[tuple[str, int, float]]:
        return await self._timed("List", self.driver.blob_files())

    async def upload_files(self) -> list[tuple[str, int, float]]:
        return await self._timed("List", self.driver.upload_files())

    async def tmp_files(self) -> list[tuple[str, int, float, str]]:
        return await self._timed("List", self.driver.tmp_files())

    async def delete_tmp(self, name: str) -> None:
        await self._timed("Delete", self.driver.delete_tmp(name))

    async def clock_offset(self) -> float:
        return await self._timed("PutContent", self.driver.clock_offset())

