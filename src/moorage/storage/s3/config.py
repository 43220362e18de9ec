"""Where an S3 driver's blobs live and how patient it is with the store, and S3's size limits.

Nothing here is secret (credentials come from the AWS chain inside the
client), so a configuration may be saved in replica.json, handed to a
joining replica and shown in `moorage status`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from moorage.storage.errors import StorageMisconfigured

MiB = 1 << 20
# S3's multipart rules (AWS; MinIO, Ceph RGW and SeaweedFS follow them).
MIN_PART = 5 * MiB          # every part but the last
MAX_PART = 5 << 30
MAX_PARTS = 10_000
DELETE_BATCH = 1000         # keys per DeleteObjects request
READ_CHUNK = MiB

# https://docs.aws.amazon.com/AmazonS3/latest/userguide/bucketnamingrules.html
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True, slots=True)
class S3Config:
    """Where the blobs live and how patient to be with the store. Holds no secret:
    it can be written to etcd in clear and shown in `moorage status`."""

    bucket: str
    prefix: str = ""                  # "" or "a/b/" (from_url normalises)
    endpoint: str | None = None       # None: AWS itself
    region: str | None = None         # None: from the AWS chain, else us-east-1
    ca_cert: str | None = None        # a PEM file to trust besides the system's
    path_style: bool = False          # http://host/bucket/key rather than http://bucket.host/key
    profile: str | None = None        # a named profile of the shared files
    connect_timeout: float = 5.0
    read_timeout: float = 20.0        # for one socket read
    deadline: float = 60.0            # for a whole operation, retries included...
    min_rate: float = float(MiB)      # ...plus one second per this many body bytes
    attempts: int = 6
    backoff: float = 0.2              # the first retry waits up to this; doubling
    backoff_max: float = 5.0
    presign_seconds: int = 300        # a redirect is followed at once; keep URLs short-lived
    part_size: int = 8 * MiB          # what upload sessions buffer before sending a part

    def __post_init__(self) -> None:
        if not _BUCKET.match(self.bucket) or ".." in self.bucket:
            raise StorageMisconfigured(f"{self.bucket!r} is not a valid S3 bucket name")
        if self.prefix and not self.prefix.endswith("/"):
            object.__setattr__(self, "prefix", self.prefix + "/")
        if not MIN_PART <= self.part_size <= MAX_PART:
            raise StorageMisconfigured(f"an S3 part size must be 5 MiB to 5 GiB, not {self.part_size} bytes")

    @classmethod
    def from_url(cls, url: str, **options: Any) -> "S3Config":
        """`s3://BUCKET[/PREFIX]` (as `--storage` takes it) and the other settings."""
        m = re.match(r"^s3://([^/]+)(?:/(.*))?$", url)
        if m is None:
            raise StorageMisconfigured(f"{url!r} is not an s3://BUCKET[/PREFIX] URL")
        prefix = "/".join(p for p in (m.group(2) or "").split("/") if p)
        return cls(bucket=m.group(1), prefix=prefix, **options)

    @property
    def where(self) -> str:
        """The store as a sentence names it."""
        return f"bucket {self.bucket} at {self.endpoint or 'AWS S3'}"
