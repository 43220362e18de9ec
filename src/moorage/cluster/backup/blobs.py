"""The archive's blobs, back into the storage: through the blob driver, as uploads, never by path."""

from __future__ import annotations

import hashlib

from moorage.cluster.backup.archive import CHUNK, Checked, Progress, damaged, digest_of, read_member
from moorage.storage.base import BlobDriver


async def restore_blobs(checked: Checked, storage: BlobDriver, progress: Progress | None = None,
                        locations: dict[str, str] | None = None) -> tuple[int, int, dict[str, str]]:
    """Put the archive's blobs into the storage: each one an upload, checked, then committed
    (the driver makes it appear whole or not at all), as a push would.

    A blob already there, where its record says (`locations`: digest to the restored record's
    location), is kept (blobs are content-addressed and immutable). Returns (written, already
    present, the blobs the driver put elsewhere than their records say: digest to location).
    """
    written = present = 0
    moved: dict[str, str] = {}
    locations = locations or {}
    for name, f in read_member(checked, checked.blobs):
        digest = digest_of(name)
        assert digest is not None
        size = checked.files[name]["size"]
        if await storage.exists(digest, locations.get(digest, "")) == size:
            present += 1
            if progress is not None:
                progress(size)
            continue
        upload = storage.new_upload_id()
        sha = hashlib.sha256()
        appender = await storage.open_upload(upload, 0, sha)
        try:
            while chunk := f.read(CHUNK):  # a local archive: the command has nothing else to do meanwhile
                await appender.write(chunk)
                if progress is not None:
                    progress(len(chunk))
            await appender.finish()
            # Checked again: the archive could have changed since it was checked.
            if sha.hexdigest() != checked.files[name]["sha256"]:
                raise damaged(checked.path, f"{name} changed while it was being restored")
            location = await storage.commit_upload(upload, digest, size=size)
        except BaseException:
            await appender.abort()
            await storage.delete_upload(upload, unrecorded=True)
            raise
        await storage.delete_upload(upload)
        if location != locations.get(digest, ""):
            moved[digest] = location
        written += 1
    return written, present, moved
