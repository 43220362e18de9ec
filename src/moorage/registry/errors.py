"""Domain errors, named by the OCI distribution spec's error codes.

The registry layer knows nothing of HTTP; the api layer turns each error into
the spec's status and JSON body. The few cases where the spec pairs a code
with an unusual status (416 for a chunk out of order, 413 for a body too
large, 503 when metadata is unreachable) are their own classes, so the api can
map them without the domain naming statuses.
"""

from __future__ import annotations

from typing import Any


class RegistryError(Exception):
    """An error a client caused or must hear about, with its OCI code."""

    code = "UNKNOWN"

    def __init__(self, message: str, detail: Any = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.detail = detail
        if code is not None:
            self.code = code


def _error(name: str, code: str) -> type[RegistryError]:
    return type(name, (RegistryError,), {"code": code, "__doc__": f"OCI error {code}."})


BlobUnknown = _error("BlobUnknown", "BLOB_UNKNOWN")
BlobUploadInvalid = _error("BlobUploadInvalid", "BLOB_UPLOAD_INVALID")
BlobUploadUnknown = _error("BlobUploadUnknown", "BLOB_UPLOAD_UNKNOWN")
DigestInvalid = _error("DigestInvalid", "DIGEST_INVALID")
ManifestBlobUnknown = _error("ManifestBlobUnknown", "MANIFEST_BLOB_UNKNOWN")
ManifestInvalid = _error("ManifestInvalid", "MANIFEST_INVALID")
ManifestUnknown = _error("ManifestUnknown", "MANIFEST_UNKNOWN")
NameInvalid = _error("NameInvalid", "NAME_INVALID")
NameUnknown = _error("NameUnknown", "NAME_UNKNOWN")
SizeInvalid = _error("SizeInvalid", "SIZE_INVALID")
Unsupported = _error("Unsupported", "UNSUPPORTED")
Denied = _error("Denied", "DENIED")


class BadParameter(Unsupported):
    """A query parameter the request cannot be served with (a malformed `n`).

    The spec's list has no code for it; UNSUPPORTED is the nearest, sent
    with 400 because the method itself is fine.
    """


class RangeInvalid(BlobUploadInvalid):
    """A chunk that does not start where the upload ends (out of order, repeated)."""


class TooLarge(SizeInvalid):
    """A body over a configured limit (manifest size, blob size)."""


class MetadataUnavailable(RegistryError):
    """The metadata store (etcd quorum) cannot be reached; writes must wait."""

    code = "UNAVAILABLE"

    @classmethod
    def because(cls, cause: Exception) -> "MetadataUnavailable":
        return cls("writes are refused: the metadata store did not answer; this replica has lost "
                   f"contact with the etcd quorum or its etcd is down ({cause})")
