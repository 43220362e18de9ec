"""The storage layer's own errors, which the registry translates to OCI errors.

Storage imports nothing from the layers above it (DESIGN.md), so a driver
says what went wrong in these terms, each with a message of one sentence fit
for an operator: `StorageUnavailable` is a 503 naming the store,
`StorageMisconfigured` stops a replica at start with that sentence.
"""

from __future__ import annotations


class StorageError(Exception):
    """A blob store could not do what was asked; str() is one sentence.

    `code` is the store's own name for the failure when it gave one (S3's
    `SlowDown`, `NoSuchUpload`, ...), for callers that must tell them apart.
    """

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


class StorageUnavailable(StorageError):
    """The store is down, too slow or overloaded, and stayed so through the retries."""


class StorageMisconfigured(StorageError):
    """The store answers but will not work as configured: credentials, bucket, permissions."""


class ObjectMissing(StorageError):
    """The object asked for is not in the store."""


class UploadInvalid(StorageError):
    """An upload broke the store's rules (part sizes, part count) or is no longer there."""


class UploadDataLost(UploadInvalid):
    """An upload's data is shorter than its acknowledged offset (lost in a crash)."""
