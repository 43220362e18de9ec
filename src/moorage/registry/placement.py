"""Putting a blob file in place and committing its record, safely against a GC sweep.

A writer places the file first and commits the etcd record second; a GC
sweep of the same digest commits first (deleting the record, leaving a
marker) and deletes the file second. `place_and_commit` is the writer's half
of the protocol registry/gc.py explains: a commit refused because a marker is
present waits for the marker to go and places the file again; a commit that
succeeded after a marker came and went since the file was placed checks the
file and puts it back if the sweep took it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from moorage.meta.etcd import EtcdUnavailable
from moorage.meta.store import BlobBeingCollected, MetaStore
from moorage.registry.errors import MetadataUnavailable
from moorage.storage.base import BlobDriver

T = TypeVar("T")
log = logging.getLogger(__name__)

# A marker lives for one file deletion, or until its collector's lease expires
# (registry/gc.py: LOCK_TTL) if the collector died: wait a little longer than that.
MARKER_WAIT_SECONDS = 30.0
ATTEMPTS = 5


async def place_and_commit(meta: MetaStore, storage: BlobDriver, digest: str,
                           place: Callable[[], Awaitable[None]], commit: Callable[[], Awaitable[T]]) -> T:
    """Run `place` (write the file) then `commit` (the etcd transaction that records it)."""
    for _ in range(ATTEMPTS):
        placed_after = meta.index.applied
        await place()
        try:
            result = await commit()
        except BlobBeingCollected:
            log.info("blob commit waited for a GC sweep", extra={"digest": digest})
            await _wait_marker_gone(meta, digest)
            continue
        if meta.file_may_be_collected(placed_after) and await storage.exists(digest) is None:
            log.info("blob file placed again after a GC sweep", extra={"digest": digest})
            await place()
        return result
    raise MetadataUnavailable(f"blob {digest} is being garbage-collected again and again; push it again")


async def _wait_marker_gone(meta: MetaStore, digest: str) -> None:
    deadline = time.monotonic() + MARKER_WAIT_SECONDS
    delay = 0.02
    while time.monotonic() < deadline:
        try:
            if not await meta.collecting(digest):
                return
        except EtcdUnavailable as e:
            raise MetadataUnavailable.because(e) from None
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)
    raise MetadataUnavailable(f"blob {digest} is still being garbage-collected; push it again")
