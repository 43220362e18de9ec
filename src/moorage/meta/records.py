"""The records Moorage keeps in etcd, as msgspec structs (compact JSON).

They are written once per change and decoded by every replica's watch, so
they hold only what reads need; manifest bodies themselves live in blob
storage, addressed by digest. (GC's run records are meta/gc_store.py's,
the replicas' and settings' cluster/'s.)
"""

from __future__ import annotations

import msgspec


class BlobRecord(msgspec.Struct, frozen=True, omit_defaults=True):
    """Content that exists in blob storage, fully written and verified.

    `location` is where the driver keeps its bytes when that is not the blob's
    content address: on S3 a large upload's own key, completed in place so its
    bytes are never copied (storage/s3/uploads.py). "" (left out of the
    encoding, as in records written before it existed) is the content address.
    """

    size: int
    created: float
    location: str = ""


class ManifestRecord(msgspec.Struct, frozen=True):
    """A manifest in one repository. `created` is when it was last pushed
    (each push writes the record again) and `pushed_by` by whom: None for an
    anonymous push, and in records written before pushers were recorded."""

    media_type: str
    size: int
    created: float
    blobs: list[str] = []       # config and layers it references
    children: list[str] = []    # manifests an index references
    subject: str | None = None
    artifact_type: str | None = None
    annotations: dict[str, str] | None = None
    pushed_by: str | None = None


class Referrer(msgspec.Struct, frozen=True, omit_defaults=True, rename="camel"):
    """A descriptor in a referrers response, exactly as the spec spells it."""

    media_type: str
    digest: str
    size: int
    artifact_type: str | None = None
    annotations: dict[str, str] | None = None


class UploadRecord(msgspec.Struct, frozen=True):
    repo: str
    offset: int
    created: float
    updated: float


# -- who may do what (meta/access.py keeps them in memory, registry/access.py decides) --

class UserRecord(msgspec.Struct, frozen=True):
    password_hash: str          # argon2id
    admin: bool
    created: float


class TeamRecord(msgspec.Struct, frozen=True):
    created: float


class GrantRecord(msgspec.Struct, frozen=True):
    role: str                   # read, write or admin


class VisibilityRecord(msgspec.Struct, frozen=True):
    public: bool


# -- a writer's note (MetaStore.intend): when it was written, and where, when not at the content address --

def encode_note(stamp: float, location: str = "") -> bytes:
    return b"%.3f %s" % (stamp, location.encode()) if location else b"%.3f" % stamp


def decode_note(value: bytes) -> tuple[float, str]:
    """(time, location); an unreadable time is 0 (as old as can be)."""
    stamp, _, location = value.decode(errors="replace").partition(" ")
    try:
        return float(stamp), location
    except ValueError:
        return 0.0, location


_encoder = msgspec.json.Encoder()
encode = _encoder.encode


def decoder(kind: type) -> msgspec.json.Decoder:
    return msgspec.json.Decoder(kind)
