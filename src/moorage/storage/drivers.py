"""Which blob driver serves a storage location.

A replica, `moorage join` (proving it sees the cluster's storage) and
`moorage restore` open the cluster's storage here, never a driver class of
their own: a directory is the filesystem driver's. (The S3 driver,
storage/s3.py, is to be chosen here for an s3:// location.)
"""

from __future__ import annotations

from pathlib import Path

from moorage.storage.base import BlobDriver
from moorage.storage.filesystem import FilesystemDriver


def storage_at(location: Path | str) -> BlobDriver:
    """The driver for `location`, not yet opened (`await driver.open()`, later `close()`)."""
    return FilesystemDriver(Path(location))
