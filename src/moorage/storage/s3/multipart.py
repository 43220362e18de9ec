"""S3 multipart uploads at a key: start, send parts, complete, abort, list.

The primitives upload sessions (uploads.py) build blobs with, in place. S3's rules
(parts 1 to 10,000, every part but the last at least 5 MiB) are checked here
first, so that the error says which part. `upload_id` only names the
session in messages; `s3_upload_id` is the store's id for the upload.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moorage.storage.errors import ObjectMissing, UploadInvalid
from moorage.storage.s3.client import PartBody, S3Client
from moorage.storage.s3.config import MAX_PART, MAX_PARTS, MIN_PART


@dataclass(frozen=True, slots=True)
class Part:
    number: int
    etag: str
    size: int


@dataclass(frozen=True, slots=True)
class MultipartUpload:
    name: str               # the key's last segment
    s3_upload_id: str       # the store's id for the multipart upload
    key: str
    initiated: float        # epoch seconds


def check_parts(parts: list[Part]) -> int:
    """S3's rules for completing, checked here so that the error says which part:
    numbers ascending within 1..10,000, every part but the last at least 5 MiB.
    Returns the total size."""
    if not parts:
        raise UploadInvalid("a multipart upload needs at least one part")
    previous = 0
    for p in parts:
        if not previous < p.number <= MAX_PARTS:
            raise UploadInvalid(f"part numbers must rise within 1 to {MAX_PARTS}; part {p.number} "
                                f"follows part {previous}")
        previous = p.number
    for p in parts[:-1]:
        if p.size < MIN_PART:
            raise UploadInvalid(f"part {p.number} has {p.size} bytes; every part but the last needs "
                                f"at least {MIN_PART}")
    return sum(p.size for p in parts)


class Multipart:
    """The multipart calls of one bucket, through its client."""

    def __init__(self, client: S3Client):
        self.client = client
        self.bucket = client.config.bucket

    async def create_upload(self, upload_id: str, key: str) -> str:
        """Start a multipart upload at `key`; returns the store's upload id.

        A retry after a lost answer can leave a second, unused multipart upload
        behind: `list_uploads` shows it, and GC aborts what no session names.
        """
        r = await self.client.call(f"start upload {upload_id}", "create_multipart_upload",
                                   Bucket=self.bucket, Key=key)
        return r["UploadId"]

    async def upload_part(self, upload_id: str, s3_upload_id: str, number: int,
                          data: bytes | bytearray | memoryview, key: str) -> Part:
        """Send one part. Parts may be sent again (same number: the last one wins).
        Sizes are checked at `complete_upload`, when it is known which part is last."""
        body = PartBody(data)
        if not 1 <= number <= MAX_PARTS:
            raise UploadInvalid(f"a multipart upload has parts 1 to {MAX_PARTS}, not {number}")
        if not 0 < len(body) <= MAX_PART:
            raise UploadInvalid(f"a part holds 1 byte to 5 GiB, not {len(body)} bytes")
        r = await self.client.call(f"write part {number} of upload {upload_id}", "upload_part",
                                   body_size=len(body), Bucket=self.bucket, Key=key, UploadId=s3_upload_id,
                                   PartNumber=number, Body=body, ContentLength=len(body))
        return Part(number, r["ETag"], len(body))

    async def list_parts(self, upload_id: str, s3_upload_id: str, key: str) -> list[Part]:
        """The parts the store holds, as it lists them. AWS lists the last version
        of a part sent twice; SeaweedFS lists every version, in no set order. So
        a session completes with the parts it recorded, and this is for checks."""
        parts: list[Part] = []
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "UploadId": s3_upload_id}
        while True:
            r = await self.client.call(f"list the parts of upload {upload_id}", "list_parts", **params)
            parts.extend(Part(p["PartNumber"], p["ETag"], p["Size"]) for p in r.get("Parts", ()))
            if not r.get("IsTruncated"):
                return parts
            params["PartNumberMarker"] = r["NextPartNumberMarker"]

    async def complete_upload(self, upload_id: str, s3_upload_id: str, parts: list[Part], key: str) -> int:
        """Assemble the parts into the object at `key`; returns its size.

        A retry whose first try did complete finds no upload any more: the
        object of the right size at the key is then the answer.
        """
        size = check_parts(parts)
        try:
            await self.client.call(
                f"complete upload {upload_id}", "complete_multipart_upload", Bucket=self.bucket, Key=key,
                UploadId=s3_upload_id,
                MultipartUpload={"Parts": [{"PartNumber": p.number, "ETag": p.etag} for p in parts]})
        except UploadInvalid as e:
            if e.code != "NoSuchUpload" or await self.client.head_key(key) != size:
                raise
        return size

    async def abort_upload(self, upload_id: str, s3_upload_id: str, key: str) -> None:
        """Drop a multipart upload and its parts; one already gone is fine."""
        try:
            await self.client.call(f"abort upload {upload_id}", "abort_multipart_upload", Bucket=self.bucket,
                                   Key=key, UploadId=s3_upload_id)
        except (UploadInvalid, ObjectMissing):
            pass

    async def list_uploads(self, under: str) -> list[MultipartUpload]:
        """Multipart uploads in progress under PREFIX/under (ListMultipartUploads, paged: it
        lists uploads in progress only, never the objects)."""
        out: list[MultipartUpload] = []
        params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.client.config.prefix + under}
        while True:
            r = await self.client.call("list multipart uploads", "list_multipart_uploads", **params)
            out.extend(MultipartUpload(u["Key"].rsplit("/", 1)[-1], u["UploadId"], u["Key"],
                                       u["Initiated"].timestamp()) for u in r.get("Uploads", ()))
            if not r.get("IsTruncated"):
                return out
            params["KeyMarker"] = r["NextKeyMarker"]
            params["UploadIdMarker"] = r["NextUploadIdMarker"]
