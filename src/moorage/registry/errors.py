"""The errors a client hears, in one table: each OCI error code registered once with its HTTP status.

As distribution's errcode registry does, a code carries the status it is
answered with; the registry raises errors by code and never builds a
response (api/errors.py does, from this table alone). The few errors the spec
pairs with another status than their code's (416 for a chunk out of order,
413 for a body too large, 400 for a bad parameter) say so where they are
declared.

The layers below raise their own errors: MetadataUnavailable when etcd does
not answer (meta/errors.py), StorageError when a blob driver fails
(storage/errors.py). `BELOW` names them and `from_below` says what the client
hears for each, here once rather than at every call that reaches them.
"""

from __future__ import annotations

import logging
from typing import Any

from moorage.meta.errors import MetadataUnavailable
from moorage.storage.errors import StorageError, StorageUnavailable

log = logging.getLogger(__name__)

STATUS: dict[str, int] = {}


def code(name: str, status: int) -> str:
    """Register an OCI error code with the HTTP status it answers with."""
    assert name not in STATUS, f"{name} is registered twice"
    STATUS[name] = status
    return name


# The OCI distribution spec's codes...
BLOB_UNKNOWN = code("BLOB_UNKNOWN", 404)
BLOB_UPLOAD_INVALID = code("BLOB_UPLOAD_INVALID", 400)
BLOB_UPLOAD_UNKNOWN = code("BLOB_UPLOAD_UNKNOWN", 404)
DIGEST_INVALID = code("DIGEST_INVALID", 400)
MANIFEST_BLOB_UNKNOWN = code("MANIFEST_BLOB_UNKNOWN", 400)
MANIFEST_INVALID = code("MANIFEST_INVALID", 400)
MANIFEST_UNKNOWN = code("MANIFEST_UNKNOWN", 404)
NAME_INVALID = code("NAME_INVALID", 400)
NAME_UNKNOWN = code("NAME_UNKNOWN", 404)
SIZE_INVALID = code("SIZE_INVALID", 400)
UNAUTHORIZED = code("UNAUTHORIZED", 401)
DENIED = code("DENIED", 403)
UNSUPPORTED = code("UNSUPPORTED", 405)
TOOMANYREQUESTS = code("TOOMANYREQUESTS", 429)
# ... and distribution's own two, for what the spec has no code for.
UNAVAILABLE = code("UNAVAILABLE", 503)
UNKNOWN = code("UNKNOWN", 500)


class RegistryError(Exception):
    """An error a client caused or must hear about: its OCI code, and the status it is answered with."""

    code = UNKNOWN
    status = STATUS[UNKNOWN]

    def __init__(self, message: str, detail: Any = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.detail = detail
        if code is not None:  # the same kind of error, worded for another request (a manifest's body)
            self.code = code


def _error(name: str, code: str, status: int | None = None,
           base: type[RegistryError] = RegistryError) -> type[RegistryError]:
    doc = f"OCI error {code}." if status is None else f"OCI error {code}, answered with {status}."
    return type(name, (base,), {"code": code, "status": STATUS[code] if status is None else status,
                                "__doc__": doc, "__module__": __name__})


BlobUnknown = _error("BlobUnknown", BLOB_UNKNOWN)
BlobUploadInvalid = _error("BlobUploadInvalid", BLOB_UPLOAD_INVALID)
BlobUploadUnknown = _error("BlobUploadUnknown", BLOB_UPLOAD_UNKNOWN)
DigestInvalid = _error("DigestInvalid", DIGEST_INVALID)
ManifestBlobUnknown = _error("ManifestBlobUnknown", MANIFEST_BLOB_UNKNOWN)
ManifestInvalid = _error("ManifestInvalid", MANIFEST_INVALID)
ManifestUnknown = _error("ManifestUnknown", MANIFEST_UNKNOWN)
NameInvalid = _error("NameInvalid", NAME_INVALID)
NameUnknown = _error("NameUnknown", NAME_UNKNOWN)
SizeInvalid = _error("SizeInvalid", SIZE_INVALID)
Unsupported = _error("Unsupported", UNSUPPORTED)
# A chunk that does not start where the upload ends (out of order, repeated): the spec's 416.
RangeInvalid = _error("RangeInvalid", BLOB_UPLOAD_INVALID, 416, base=BlobUploadInvalid)
# A body over a configured limit (manifest size, blob size).
TooLarge = _error("TooLarge", SIZE_INVALID, 413, base=SizeInvalid)
# A query parameter the request cannot be served with (a malformed `n`): the spec's list has no
# code for it; UNSUPPORTED is the nearest, sent with 400 because the method itself is fine.
BadParameter = _error("BadParameter", UNSUPPORTED, 400, base=Unsupported)
# The metadata store (etcd quorum) or the blob store cannot be reached now: writes must wait.
Unavailable = _error("Unavailable", UNAVAILABLE)
# The blob storage failed (an I/O error, no space left).
StorageFailed = _error("StorageFailed", UNKNOWN)

# What the layers below raise that a client must hear about.
BELOW = (MetadataUnavailable, StorageError)


def from_below(error: MetadataUnavailable | StorageError) -> RegistryError:
    """The client's error for a failure of the metadata store or of the blob storage."""
    if isinstance(error, (MetadataUnavailable, StorageUnavailable)):
        return Unavailable(str(error))
    log.error("storage error", exc_info=error)  # not the client's doing: the operator must hear of it
    return StorageFailed(str(error))
