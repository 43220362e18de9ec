"""S3 blob driver, core: blobs by digest and multipart uploads on any S3-compatible store.

The client is aiobotocore. bench/s3_clients.py measured it against obstore
(the Rust object_store): obstore is several times cheaper per request, but it
cannot resume a multipart upload by its id, list parts or uploads, copy a
part server-side, or read the shared credentials file, and an upload session
whose requests land on different replicas needs all of those. The hot paths
do not reach S3 (HEAD and manifest GET come from the index; blob GET is a
redirect to a presigned URL), so per-request cost matters less than reach.

Layout under the configured prefix (decided here; distribution's
`docker/registry/v2/blobs/sha256/ab/<hex>/data` nests one level more for no
gain on S3, which partitions by key prefix itself):

    blobs/<algorithm>/<2 hex>/<hex>   a blob written whole, its digest known first
    blobs/u/<upload id>               a blob assembled by a multipart upload
                                      session; committed, etcd's blob record
                                      points at it (no second copy)
    uploads/<upload id>/<offset hex>  a session's bytes past its last part
                                      (less than a part) until they join one
    probe/<nonce>                     the start-up and join probe

Only `uploads/` and in-progress multipart uploads under `blobs/u/` are ever
listed (GC of crashed uploads); blobs themselves are found through etcd.

Every call has a deadline (connect, per read, and a whole-operation budget
that grows with the body) and is retried with exponential backoff and full
jitter on connection errors, timeouts, 500/502/503/504 and SlowDown; botocore's
own retries are off so that one policy holds. Errors come out as the storage
layer's own (storage/errors.py), one sentence each. Credentials come from the
standard AWS chain (environment, shared credentials and config files, SSO,
container and instance roles); this module never sees, stores or logs them.
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import logging
import os
import random
import re
import time
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, AsyncIterator

import aiobotocore.session
import aiohttp
import botocore.config
import botocore.exceptions as bce

from moorage import digest as digests
from moorage.storage.base import checked_name, is_upload_id
from moorage.storage.errors import (
    ObjectMissing,
    StorageError,
    StorageMisconfigured,
    StorageUnavailable,
    UploadDataLost,
    UploadInvalid,
)

log = logging.getLogger(__name__)

MiB = 1 << 20
# S3's multipart rules (AWS; MinIO, Ceph RGW and SeaweedFS follow them).
MIN_PART = 5 * MiB          # every part but the last
MAX_PART = 5 << 30
MAX_PARTS = 10_000
DELETE_BATCH = 1000         # keys per DeleteObjects request
READ_CHUNK = MiB

# https://docs.aws.amazon.com/AmazonS3/latest/userguide/bucketnamingrules.html
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

_RETRY_CODES = {"500", "502", "503", "504", "SlowDown", "InternalError", "ServiceUnavailable",
                "RequestTimeout", "RequestTimeoutException", "ThrottlingException", "Throttling",
                "RequestLimitExceeded", "TooManyRequestsException"}
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}
_BAD_KEY_CODES = {"InvalidAccessKeyId", "InvalidToken", "ExpiredToken", "InvalidClientTokenId"}
_UPLOAD_CODES = {"NoSuchUpload", "EntityTooSmall", "EntityTooLarge", "InvalidPart", "InvalidPartOrder"}
_NETWORK_ERRORS = (bce.ConnectionError, bce.HTTPClientError, bce.IncompleteReadError,
                   aiohttp.ClientError, OSError, TimeoutError)


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


@dataclass(frozen=True, slots=True)
class Part:
    number: int
    etag: str
    size: int


@dataclass(frozen=True, slots=True)
class MultipartUpload:
    upload_id: str          # the session's id (the key's last segment)
    s3_upload_id: str       # the store's id for the multipart upload
    key: str
    initiated: float        # epoch seconds


@dataclass(frozen=True, slots=True)
class StoredObject:
    key: str                # relative to the prefix
    size: int
    modified: float         # epoch seconds


class PartBody(io.RawIOBase):
    """A seekable reader over a buffer, so a part goes out without a second copy.

    botocore turns a bytes or bytearray body into a BytesIO (a copy of a
    bytearray), reads it once to sign it and again to send it; a reader over
    the caller's buffer lets both passes read the one copy there is. Measured
    with 16 MiB parts: about 40 MiB over the buffer with a bytearray body,
    about 1 MiB with this.
    """

    def __init__(self, data: bytes | bytearray | memoryview):
        super().__init__()
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def __len__(self) -> int:
        return len(self._view)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = min(max(base + offset, 0), len(self._view))
        return self._pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), len(self._view) - self._pos)
        buffer[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else min(self._pos + size, len(self._view))
        out = self._view[self._pos:end].tobytes()
        self._pos = end
        return out


class S3Driver:
    """Blobs and multipart uploads in one bucket, under one prefix.

    Use as `async with S3Driver(config) as driver:`, or `await open()` /
    `await close()`; the client (its connection pool) lives in between.
    """

    def __init__(self, config: S3Config):
        self.config = config
        self._stack: AsyncExitStack | None = None
        self._client: Any = None

    # -- life ------------------------------------------------------------------

    async def open(self) -> "S3Driver":
        c = self.config
        boto_config = botocore.config.Config(
            connect_timeout=c.connect_timeout, read_timeout=c.read_timeout,
            retries={"mode": "standard", "total_max_attempts": 1},  # ours, below
            s3={"addressing_style": "path" if c.path_style else "auto"},
            signature_version="s3v4", max_pool_connections=64,
            # Checksums only where S3 requires them (DeleteObjects): the CRC32
            # that botocore adds to every body by default costs CPU, and several
            # S3-compatible stores refuse its headers.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required")
        stack = AsyncExitStack()
        try:
            session = aiobotocore.session.AioSession(profile=c.profile)
            self._client = await stack.enter_async_context(session.create_client(
                "s3", endpoint_url=c.endpoint, region_name=c.region or session.get_config_variable("region")
                or "us-east-1", config=boto_config, verify=c.ca_cert))
        except bce.ProfileNotFound:
            await stack.aclose()
            raise StorageMisconfigured(f"there is no AWS profile {c.profile!r} in the shared credentials "
                                       "or config file") from None
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def close(self) -> None:
        if self._stack is not None:
            stack, self._stack, self._client = self._stack, None, None
            await stack.aclose()

    async def __aenter__(self) -> "S3Driver":
        return await self.open()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- keys ------------------------------------------------------------------

    def blob_key(self, digest: str) -> str:
        algorithm, hexdigest = digests.parse(digest)  # a ValueError (DigestError) for anything else
        return f"{self.config.prefix}blobs/{algorithm}/{hexdigest[:2]}/{hexdigest}"

    def session_key(self, upload_id: str) -> str:
        """The object a multipart upload session assembles, and where its blob stays."""
        return f"{self.config.prefix}blobs/u/{self._checked(upload_id)}"

    def tail_key(self, upload_id: str, offset: int) -> str:
        # Fixed-width hex, so a listing returns a session's pieces in offset order.
        return f"{self.config.prefix}uploads/{self._checked(upload_id)}/{offset:016x}"

    @staticmethod
    def _checked(upload_id: str) -> str:
        if not is_upload_id(upload_id):
            raise ValueError(f"bad upload id {upload_id[:40]!r}")
        return upload_id

    def relative(self, key: str) -> str:
        return key[len(self.config.prefix):] if key.startswith(self.config.prefix) else key

    # -- calls, retries and errors -------------------------------------------------

    def _translate(self, e: Exception, what: str) -> tuple[bool, StorageError]:
        """(retry?, the error to raise if not) for a failed call."""
        where = self.config.where
        if isinstance(e, bce.ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code") or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?"))
            retry, error = self._client_error(code, str(err.get("Message") or "")[:200], what)
            error.code = code
            return retry, error
        if isinstance(e, bce.SSLError):
            m = re.search(r"(certificate verify failed: [^(]+?)\s*\(", str(e))
            reason = m.group(1) if m else type(e).__name__
            return False, StorageMisconfigured(
                f"TLS with the object store at {self.config.endpoint} failed ({reason}); "
                "give its CA with --s3-ca-cert")
        if isinstance(e, (bce.NoCredentialsError, bce.PartialCredentialsError, bce.CredentialRetrievalError)):
            return False, StorageMisconfigured(
                "no usable AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "or a shared credentials file or profile")
        if isinstance(e, _NETWORK_ERRORS):
            reason = type(e).__name__ if isinstance(e, TimeoutError) else str(e) or type(e).__name__
            return True, StorageUnavailable(f"cannot reach the object store ({where}) to {what}: {reason[:200]}")
        return False, StorageError(f"the object store ({where}) failed to {what}: {e!r}"[:400])

    def _client_error(self, code: str, message: str, what: str) -> tuple[bool, StorageError]:
        """The store answered with an error `code`: what it means here."""
        where = self.config.where
        if code in _RETRY_CODES:
            return True, StorageUnavailable(f"the object store ({where}) failed to {what}: {code}")
        if code in _MISSING_CODES:
            return False, ObjectMissing(f"cannot {what}: no such object in {where}")
        if code == "NoSuchBucket":
            return False, StorageMisconfigured(f"{where}: the bucket does not exist")
        if code in _BAD_KEY_CODES:
            return False, StorageMisconfigured(
                f"{where} does not know the access key in use ({code}): check the AWS credentials "
                "(AWS_ACCESS_KEY_ID, the shared credentials file or the profile)")
        if code == "SignatureDoesNotMatch":
            return False, StorageMisconfigured(
                f"{where} refused the signature of the request ({code}): the secret access key "
                "does not match the access key")
        if code in ("AccessDenied", "403", "AllAccessDisabled"):
            return False, StorageMisconfigured(
                f"{where} refused to let these credentials {what} ({code}): check the credentials "
                "and the bucket policy")
        if code in _UPLOAD_CODES:
            return False, UploadInvalid(f"the object store refused to {what}: {code}")
        return False, StorageError(f"the object store ({where}) refused to {what}: {code} {message}".rstrip())

    def _backoff(self, attempt: int) -> float:
        # Full jitter: spreads the retries of many clients hitting one SlowDown.
        return random.uniform(0, min(self.config.backoff_max, self.config.backoff * 2 ** (attempt - 1)))

    async def _call(self, what: str, op: str, *, body_size: int = 0, **params: Any) -> dict:
        """One S3 operation under the deadline, retried as the module doc says."""
        if self._client is None:
            raise RuntimeError("S3Driver used before open()")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.deadline + body_size / self.config.min_rate
        body = params.get("Body")
        attempt = 0
        while True:
            attempt += 1
            if isinstance(body, PartBody):
                body.seek(0)  # a retried call must send the whole body again
            try:
                async with asyncio.timeout(max(deadline - loop.time(), 0.001)):
                    return await getattr(self._client, op)(**params)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - every failure is translated below
                retry, error = self._translate(e, what)
                wait = self._backoff(attempt)
                if not retry or attempt >= self.config.attempts or loop.time() + wait >= deadline:
                    if retry:
                        error = StorageUnavailable(f"{error} (gave up after {attempt} attempt"
                                                   f"{'s' if attempt > 1 else ''})", error.code)
                    raise error from e
                log.debug("s3 retry", extra={"op": op, "attempt": attempt, "error": str(error)})
                await asyncio.sleep(wait)

    # -- objects ---------------------------------------------------------------------

    async def head_key(self, key: str) -> int | None:
        """The object's size, or None when there is none."""
        try:
            r = await self._call(f"look up {self.relative(key)}", "head_object", Bucket=self.config.bucket, Key=key)
        except ObjectMissing:
            return None
        return r["ContentLength"]

    async def put_key(self, key: str, data: bytes | bytearray | memoryview, if_absent: bool = False) -> bool:
        """Store a whole object; with `if_absent` (If-None-Match: *) only if there is none,
        returning False when there was one."""
        body = PartBody(data)
        extra = {"IfNoneMatch": "*"} if if_absent else {}
        try:
            await self._call(f"write {self.relative(key)}", "put_object", body_size=len(body),
                             Bucket=self.config.bucket, Key=key, Body=body, ContentLength=len(body), **extra)
        except StorageError as e:
            if if_absent and e.code in ("PreconditionFailed", "412"):
                return False
            raise
        return True

    async def stream_key(self, key: str, start: int = 0, end: int | None = None,
                         chunk: int = READ_CHUNK) -> AsyncIterator[bytes]:
        """The bytes [start, end) of an object (to its end when `end` is None).

        Each read waits at most `read_timeout`. A connection lost mid-body is
        resumed where it broke with a Range request pinned to the object's
        ETag, up to `attempts` times (no overall deadline: a big blob read by
        a slow client may rightly take long; each request has its own).
        """
        if end is not None and end <= start:
            return
        what = f"read {self.relative(key)}"
        pos, etag, resumes = start, None, 0
        while True:
            params: dict[str, Any] = {"Bucket": self.config.bucket, "Key": key}
            if pos or end is not None:
                params["Range"] = f"bytes={pos}-{'' if end is None else end - 1}"
            if etag:
                params["IfMatch"] = etag
            r = await self._call(what, "get_object", **params)
            etag = r.get("ETag")
            try:
                async with r["Body"] as body:
                    while True:
                        async with asyncio.timeout(self.config.read_timeout):
                            data = await body.read(chunk)
                        if not data:
                            break
                        pos += len(data)
                        yield data
                if end is not None and pos < end:
                    raise bce.IncompleteReadError(actual_bytes=pos - start, expected_bytes=end - start)
                return
            except _NETWORK_ERRORS as e:
                resumes += 1
                _, error = self._translate(e, what)
                if resumes >= self.config.attempts:
                    raise StorageUnavailable(f"{error} (the body broke off {resumes} times)") from e
                log.debug("s3 resume", extra={"key": key, "offset": pos, "error": str(error)})
                await asyncio.sleep(self._backoff(resumes))

    async def read_key(self, key: str) -> bytes:
        """A whole object in memory: for manifests and other small things."""
        return b"".join([c async for c in self.stream_key(key)])

    async def delete_keys(self, keys: list[str]) -> None:
        """Delete objects, 1,000 a DeleteObjects request; keys already gone are fine."""
        for i in range(0, len(keys), DELETE_BATCH):
            batch = keys[i:i + DELETE_BATCH]
            r = await self._call(f"delete {len(batch)} objects", "delete_objects", Bucket=self.config.bucket,
                                 Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            failed = [e for e in r.get("Errors", ()) if e.get("Code") != "NoSuchKey"]
            if failed:
                first = failed[0]
                raise StorageError(f"the object store ({self.config.where}) did not delete {len(failed)} of "
                                   f"{len(batch)} objects, {self.relative(first.get('Key', '?'))} first: "
                                   f"{first.get('Code')}")

    async def list_keys(self, relative_prefix: str) -> list[StoredObject]:
        """Every object under PREFIX/relative_prefix (ListObjectsV2, 1,000 a page)."""
        out: list[StoredObject] = []
        params: dict[str, Any] = {"Bucket": self.config.bucket, "Prefix": self.config.prefix + relative_prefix}
        while True:
            r = await self._call(f"list {relative_prefix}", "list_objects_v2", **params)
            out.extend(StoredObject(self.relative(o["Key"]), o["Size"], o["LastModified"].timestamp())
                       for o in r.get("Contents", ()))
            if not r.get("IsTruncated"):
                return out
            params["ContinuationToken"] = r["NextContinuationToken"]

    async def presign_key(self, key: str, seconds: int | None = None) -> str:
        """A GET URL for the object that works without credentials for a short while.

        Signed locally (no request). The URL carries the access key id, never
        the secret; it must not be logged all the same.
        """
        return await self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.config.bucket, "Key": key},
            ExpiresIn=seconds or self.config.presign_seconds)

    # -- blobs by digest -----------------------------------------------------------

    async def exists(self, digest: str) -> int | None:
        return await self.head_key(self.blob_key(digest))

    async def write(self, digest: str, data: bytes | bytearray | memoryview) -> None:
        """Store a blob whose digest the caller has verified. Same digest, same
        bytes: a concurrent twin overwriting it is harmless."""
        await self.put_key(self.blob_key(digest), data)

    async def read(self, digest: str) -> bytes:
        return await self.read_key(self.blob_key(digest))

    def stream(self, digest: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        return self.stream_key(self.blob_key(digest), start, end)

    async def delete(self, digest: str) -> None:
        await self.delete_keys([self.blob_key(digest)])

    async def delete_many(self, digests: list[str]) -> None:
        await self.delete_keys([self.blob_key(d) for d in digests])

    async def presign(self, digest: str, seconds: int | None = None) -> str:
        return await self.presign_key(self.blob_key(digest), seconds)

    # -- multipart uploads (the primitives of upload sessions) ------------------------

    async def create_upload(self, upload_id: str, key: str | None = None) -> str:
        """Start the multipart upload of a session; returns the store's upload id.

        A retry after a lost answer can leave a second, unused multipart upload
        behind: `list_uploads` shows it, and GC aborts what no session names.
        """
        r = await self._call(f"start upload {upload_id}", "create_multipart_upload",
                             Bucket=self.config.bucket, Key=key or self.session_key(upload_id))
        return r["UploadId"]

    async def upload_part(self, upload_id: str, s3_upload_id: str, number: int,
                          data: bytes | bytearray | memoryview, key: str | None = None) -> Part:
        """Send one part. Parts may be sent again (same number: the last one wins).
        Sizes are checked at `complete_upload`, when it is known which part is last."""
        body = PartBody(data)
        if not 1 <= number <= MAX_PARTS:
            raise UploadInvalid(f"a multipart upload has parts 1 to {MAX_PARTS}, not {number}")
        if not 0 < len(body) <= MAX_PART:
            raise UploadInvalid(f"a part holds 1 byte to 5 GiB, not {len(body)} bytes")
        r = await self._call(f"write part {number} of upload {upload_id}", "upload_part", body_size=len(body),
                             Bucket=self.config.bucket, Key=key or self.session_key(upload_id),
                             UploadId=s3_upload_id, PartNumber=number, Body=body, ContentLength=len(body))
        return Part(number, r["ETag"], len(body))

    async def copy_part(self, upload_id: str, s3_upload_id: str, number: int, source_key: str,
                        start: int, end: int, key: str | None = None) -> Part:
        """A part made by the store from bytes [start, end) of another object (UploadPartCopy):
        nothing passes through this process."""
        if not 1 <= number <= MAX_PARTS:
            raise UploadInvalid(f"a multipart upload has parts 1 to {MAX_PARTS}, not {number}")
        if not 0 <= start < end or end - start > MAX_PART:
            raise UploadInvalid(f"a copied part holds 1 byte to 5 GiB, not bytes {start} to {end}")
        r = await self._call(f"copy part {number} of upload {upload_id}", "upload_part_copy",
                             body_size=end - start, Bucket=self.config.bucket,
                             Key=key or self.session_key(upload_id),
                             UploadId=s3_upload_id, PartNumber=number,
                             CopySource={"Bucket": self.config.bucket, "Key": source_key},
                             CopySourceRange=f"bytes={start}-{end - 1}")
        return Part(number, r["CopyPartResult"]["ETag"], end - start)

    async def list_parts(self, upload_id: str, s3_upload_id: str) -> list[Part]:
        """The parts the store holds, as it lists them. AWS lists the last version
        of a part sent twice; SeaweedFS lists every version, in no set order. So
        a session completes with the parts it recorded, and this is for checks."""
        parts: list[Part] = []
        params: dict[str, Any] = {"Bucket": self.config.bucket, "Key": self.session_key(upload_id),
                                  "UploadId": s3_upload_id}
        while True:
            r = await self._call(f"list the parts of upload {upload_id}", "list_parts", **params)
            parts.extend(Part(p["PartNumber"], p["ETag"], p["Size"]) for p in r.get("Parts", ()))
            if not r.get("IsTruncated"):
                return parts
            params["PartNumberMarker"] = r["NextPartNumberMarker"]

    @staticmethod
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

    async def complete_upload(self, upload_id: str, s3_upload_id: str, parts: list[Part],
                              key: str | None = None) -> int:
        """Assemble the parts into the session's object; returns its size.

        A retry whose first try did complete finds no upload any more: the
        object of the right size under the session's key is then the answer.
        """
        size = self.check_parts(parts)
        key = key or self.session_key(upload_id)
        try:
            await self._call(f"complete upload {upload_id}", "complete_multipart_upload",
                             Bucket=self.config.bucket, Key=key, UploadId=s3_upload_id,
                             MultipartUpload={"Parts": [{"PartNumber": p.number, "ETag": p.etag} for p in parts]})
        except UploadInvalid as e:
            if e.code != "NoSuchUpload" or await self.head_key(key) != size:
                raise
        return size

    async def abort_upload(self, upload_id: str, s3_upload_id: str, key: str | None = None) -> None:
        """Drop a multipart upload and its parts; one already gone is fine."""
        try:
            await self._call(f"abort upload {upload_id}", "abort_multipart_upload", Bucket=self.config.bucket,
                             Key=key or self.session_key(upload_id), UploadId=s3_upload_id)
        except (UploadInvalid, ObjectMissing):
            pass

    async def list_uploads(self, under: str = "blobs/u/") -> list[MultipartUpload]:
        """Multipart uploads in progress under `under` (ListMultipartUploads, paged: it lists
        uploads in progress only, never the objects)."""
        out: list[MultipartUpload] = []
        params: dict[str, Any] = {"Bucket": self.config.bucket, "Prefix": self.config.prefix + under}
        while True:
            r = await self._call("list multipart uploads", "list_multipart_uploads", **params)
            for u in r.get("Uploads", ()):
                upload_id = u["Key"].rsplit("/", 1)[-1]
                if is_upload_id(upload_id) or under != "blobs/u/":
                    out.append(MultipartUpload(upload_id, u["UploadId"], u["Key"], u["Initiated"].timestamp()))
            if not r.get("IsTruncated"):
                return out
            params["KeyMarker"] = r["NextKeyMarker"]
            params["UploadIdMarker"] = r["NextUploadIdMarker"]

    # -- the probe -------------------------------------------------------------------

    async def probe(self) -> None:
        """Write, read back and delete a small object: what a replica must be able
        to do before it serves. Raises StorageMisconfigured or StorageUnavailable
        with the one sentence an operator needs."""
        key = f"{self.config.prefix}probe/{uuid.uuid4().hex}"
        data = os.urandom(64)
        await self.put_key(key, data)
        try:
            if await self.read_key(key) != data:
                raise StorageMisconfigured(f"{self.config.where} returned other bytes than were written "
                                           f"to {self.relative(key)}")
        finally:
            await self.delete_keys([key])
        if await self.head_key(key) is not None:
            raise StorageMisconfigured(f"{self.config.where} still has {self.relative(key)} after deleting it")


    # -- what BlobDriver adds (storage/base.py) ----------------------------------------
    #
    # An upload session's bytes are pieces under uploads/<id>/<offset>: each
    # request appends pieces of up to one part (`part_size`, the memory an
    # upload in flight holds), written as it receives them, and nothing about
    # the session lives in a replica: the next request, on any replica, lists
    # the pieces (a short prefix) and goes on from the acknowledged offset.
    # Pieces past that offset were never acknowledged (a request that broke
    # off); the chain from 0 is followed only up to the offset, and a later
    # request at that offset overwrites the first of them. Committing
    # assembles the pieces at the blob's content address with server-side
    # copies (UploadPartCopy; no byte through the replica) and reads back only
    # pieces too small to be parts.

    name = "s3"

    def local_path(self, digest: str) -> None:
        return None

    def new_upload_id(self) -> str:
        return uuid.uuid4().hex

    async def _pieces(self, upload_id: str) -> dict[int, StoredObject]:
        found: dict[int, StoredObject] = {}
        for o in await self.list_keys(f"uploads/{self._checked(upload_id)}/"):
            try:
                found[int(o.key.rsplit("/", 1)[-1], 16)] = o
            except ValueError:
                continue
        return found

    async def _chain(self, upload_id: str, length: int) -> list[tuple[str, int]]:
        """(key, size) of the pieces holding bytes [0, length); UploadDataLost when they don't."""
        if length == 0:
            return []
        pieces, chain, pos = await self._pieces(upload_id), [], 0
        while pos < length:
            piece = pieces.get(pos)
            if piece is None or piece.size == 0 or pos + piece.size > length:
                raise UploadDataLost(f"the object store ({self.config.where}) holds {pos} bytes of upload "
                                     f"{upload_id}, which was at {length}")
            chain.append((self.config.prefix + piece.key, piece.size))
            pos += piece.size
        return chain

    async def open_upload(self, upload_id: str, offset: int, hasher=None) -> "PieceAppender":
        if offset:
            await self._chain(upload_id, offset)   # the acknowledged bytes are all there
        return PieceAppender(self, upload_id, offset, hasher)

    async def _stream_chain(self, chain: list[tuple[str, int]]) -> AsyncIterator[bytes]:
        for key, _ in chain:
            async for data in self.stream_key(key):
                yield data

    async def hash_upload(self, upload_id: str, algorithm: str, length: int) -> str:
        h = digests.new_hasher(algorithm)
        async for data in self._stream_chain(await self._chain(upload_id, length)):
            h.update(data)
        return h.hexdigest()

    async def copy_key(self, source: str, target: str) -> None:
        await self._call(f"copy {self.relative(source)}", "copy_object", Bucket=self.config.bucket, Key=target,
                         CopySource={"Bucket": self.config.bucket, "Key": source})

    async def commit_upload(self, upload_id: str, digest: str, keep: bool = False, size: int = 0) -> None:
        """Make bytes [0, size) of the upload the blob `digest` (verified by the caller).

        The pieces stay (`keep` or not) until `delete_upload`: the blob is a
        copy, and placing it again after a GC sweep copies again.
        """
        chain = await self._chain(upload_id, size)
        target = self.blob_key(digest)
        if not chain:
            await self.put_key(target, b"")
        elif len(chain) == 1:
            await self.copy_key(chain[0][0], target)
        elif size < MIN_PART:
            await self.put_key(target, b"".join([d async for d in self._stream_chain(chain)]))
        else:
            await self._assemble(upload_id, chain, target)

    async def _assemble(self, upload_id: str, chain: list[tuple[str, int]], target: str) -> None:
        # Parts: a piece of at least MIN_PART on its own is copied by the store;
        # smaller ones are read back and joined until they make a part.
        groups: list[list[tuple[str, int]]] = []
        current: list[tuple[str, int]] = []
        for key, size in chain:
            if not current and size >= MIN_PART:
                groups.append([(key, size)])
                continue
            current.append((key, size))
            if sum(s for _, s in current) >= MIN_PART:
                groups.append(current)
                current = []
        if current:
            groups.append(current)
        s3id = await self.create_upload(upload_id, key=target)
        limit = asyncio.Semaphore(COMMIT_CONCURRENCY)

        async def part(number: int, group: list[tuple[str, int]]) -> Part:
            async with limit:
                if len(group) == 1:
                    return await self.copy_part(upload_id, s3id, number, group[0][0], 0, group[0][1], key=target)
                data = b"".join([d async for d in self._stream_chain(group)])
                return await self.upload_part(upload_id, s3id, number, data, key=target)
        try:
            try:
                # A failed part cancels the others: none is left running against an aborted upload.
                async with asyncio.TaskGroup() as group:
                    tasks = [group.create_task(part(n, g)) for n, g in enumerate(groups, 1)]
            except BaseExceptionGroup as e:
                raise e.exceptions[0] from None
            await self.complete_upload(upload_id, s3id, [t.result() for t in tasks], key=target)
        except BaseException:
            await asyncio.shield(self.abort_upload(upload_id, s3id, key=target))
            raise

    async def delete_upload(self, upload_id: str) -> None:
        try:
            pieces = await self._pieces(upload_id)
        except ValueError:
            return
        await self.delete_keys([self.config.prefix + o.key for o in pieces.values()])

    # -- the join proof: an object under cluster/ ----------------------------------------

    @staticmethod
    def _proof_name(name: str) -> str:
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"bad proof name {name[:40]!r}")
        return f"cluster/{name}"

    async def write_proof(self, name: str, data: bytes) -> None:
        await self.put_file(self._proof_name(name), data)

    async def read_proof(self, name: str) -> bytes | None:
        return await self.read_file(self._proof_name(name))

    # -- files beside the blobs (the audit log) ----------------------------------------------

    def _file_key(self, name: str) -> str:
        return self.config.prefix + checked_name(name)

    async def put_file(self, name: str, data: bytes) -> None:
        await self.put_key(self._file_key(name), data)

    async def read_file(self, name: str) -> bytes | None:
        try:
            return await self.read_key(self._file_key(name))
        except ObjectMissing:
            return None

    async def _list(self, prefix: str, dirs: bool) -> list[str]:
        params: dict[str, Any] = {"Bucket": self.config.bucket, "Prefix": self._file_key(prefix),
                                  "Delimiter": "/"}
        out: list[str] = []
        while True:
            r = await self._call(f"list {prefix}", "list_objects_v2", **params)
            if dirs:
                out.extend(self.relative(p["Prefix"]).rstrip("/").rsplit("/", 1)[-1]
                           for p in r.get("CommonPrefixes", ()))
            else:
                out.extend(self.relative(o["Key"]) for o in r.get("Contents", ()))
            if not r.get("IsTruncated"):
                return sorted(out)
            params["ContinuationToken"] = r["NextContinuationToken"]

    async def list_files(self, prefix: str) -> list[str]:
        return await self._list(prefix, dirs=False)

    async def list_dirs(self, prefix: str) -> list[str]:
        return await self._list(prefix, dirs=True)

    async def delete_files(self, names: list[str]) -> None:
        await self.delete_keys([self._file_key(n) for n in names])

    # -- garbage collection ----------------------------------------------------------------

    async def blob_files(self) -> list[tuple[str, int, float]]:
        """Nothing: blobs are found through etcd, never by listing blobs/ (which grows with
        the registry; GC must not take days on object storage)."""
        return []

    async def upload_files(self) -> list[tuple[str, int, float]]:
        """(upload id, bytes, newest piece's time) of every session with pieces (uploads/ only)."""
        sessions: dict[str, tuple[int, float]] = {}
        for o in await self.list_keys("uploads/"):
            parts = o.key.split("/")
            if len(parts) == 3 and is_upload_id(parts[1]):
                size, stamp = sessions.get(parts[1], (0, 0.0))
                sessions[parts[1]] = (size + o.size, max(stamp, o.modified))
        return [(uid, size, stamp) for uid, (size, stamp) in sessions.items()]

    async def tmp_files(self) -> list[tuple[str, int, float]]:
        """Multipart uploads left in progress by a commit that crashed (ListMultipartUploads
        lists uploads in progress, not objects)."""
        return [(f"{self.relative(u.key)}?{u.s3_upload_id}", 0, u.initiated)
                for u in await self.list_uploads("blobs/")]

    async def delete_tmp(self, name: str) -> None:
        key, _, s3id = name.partition("?")
        if key.startswith("blobs/") and s3id:
            await self.abort_upload("", s3id, key=self.config.prefix + key)

    async def clock_offset(self) -> float:
        """The store's clock (its Date header) minus ours: the times it stamps on objects."""
        before = time.time()
        r = await self._call("look up the bucket", "head_bucket", Bucket=self.config.bucket)
        after = time.time()
        date = r.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        if not date:
            return 0.0
        # Date has whole seconds: the offset is known to within one.
        return email.utils.parsedate_to_datetime(date).timestamp() + 0.5 - (before + after) / 2

    # -- pulls ---------------------------------------------------------------------------------

    async def redirect_url(self, digest: str) -> str | None:
        return await self.presign(digest)


COMMIT_CONCURRENCY = 4


class PieceAppender:
    """Appends to an upload session as pieces of up to one part, hashing on the way.

    A full piece goes out while the next one fills (one request in flight):
    receiving and sending overlap, and an upload holds at most two pieces.
    """

    def __init__(self, driver: S3Driver, upload_id: str, offset: int, hasher=None):
        self.driver = driver
        self.upload_id = upload_id
        self.offset = offset
        self._written = offset
        self._buffer = bytearray()
        self._hasher = hasher
        self._sending: asyncio.Task | None = None

    async def write(self, chunk: bytes) -> None:
        if self._hasher is not None:
            self._hasher.update(chunk)
        self._buffer += chunk
        self.offset += len(chunk)
        if len(self._buffer) >= self.driver.config.part_size:
            await self._flush()

    async def _flush(self) -> None:
        await self._sent()
        if self._buffer:
            data, self._buffer = self._buffer, bytearray()
            key = self.driver.tail_key(self.upload_id, self._written)
            self._written += len(data)
            self._sending = asyncio.create_task(self.driver.put_key(key, data))

    async def _sent(self) -> None:
        sending, self._sending = self._sending, None
        if sending is not None:
            await sending

    async def finish(self) -> int:
        await self._flush()
        await self._sent()
        return self.offset

    async def abort(self) -> None:
        self._buffer = bytearray()
        if self._sending is not None:
            self._sending.cancel()
            try:
                await self._sent()
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the request is failing already
                pass
