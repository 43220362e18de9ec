"""Small request helpers shared by the handlers."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

from aiohttp import web

from moorage.registry.errors import BLOB_UPLOAD_INVALID, BadParameter, BlobUploadInvalid, RegistryError, TooLarge

_CONTENT_RANGE = re.compile(r"^(?:bytes[ =])?(\d+)-(\d+)(?:/(?:\d+|\*))?$")

# A client that sends no body byte for this long has stalled or is holding
# the connection on purpose; real clients on slow links still send something
# every few seconds (Apache's mod_reqtimeout uses the same 20 s).
BODY_IDLE_SECONDS = 20.0
# Past the grace period, a body must average at least this rate, so that a
# byte every few seconds cannot keep a request alive for days. 1 KiB/s is
# far below any real link, and twice Apache's MinRate.
MIN_BODY_RATE = 1024
BODY_RATE_GRACE_SECONDS = 20.0


class BodyTimeout(RegistryError):
    """The client stopped sending its body, or sends it too slowly (answered 408, then closed)."""

    code = BLOB_UPLOAD_INVALID
    status = 408


async def _continue(request: web.BaseRequest) -> None:
    """Answer `Expect: 100-continue` once we decide to read the body.

    curl and others wait up to a second for this before sending; a request
    refused before its body is read never asks the client to send it.
    """
    if request.headers.get("Expect", "").lower() == "100-continue" and request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")


async def body_chunks(request: web.BaseRequest, code: str = "BLOB_UPLOAD_INVALID") -> AsyncIterator[bytes]:
    """The request body as it arrives, never buffered whole, within the idle and rate limits.

    `code` is the OCI code of the BodyTimeout raised when the client stalls.
    """
    await _continue(request)
    content = request.content
    loop = asyncio.get_running_loop()
    started = loop.time()
    received = 0
    while True:
        # What is buffered already needs no timer: the hot path of a fast upload.
        chunk = content.read_nowait()
        if not chunk:
            if content.is_eof():
                return
            try:
                async with asyncio.timeout(BODY_IDLE_SECONDS):
                    chunk = await content.readany()
            except TimeoutError:
                raise BodyTimeout(f"no body bytes for {BODY_IDLE_SECONDS:.0f} s; request abandoned",
                                  {"received": received}, code) from None
            if not chunk:
                return
        received += len(chunk)
        elapsed = loop.time() - started
        if elapsed > BODY_RATE_GRACE_SECONDS and received < MIN_BODY_RATE * elapsed:
            raise BodyTimeout(f"body slower than {MIN_BODY_RATE} bytes/s; request abandoned",
                              {"received": received, "seconds": round(elapsed, 1)}, code)
        yield chunk


def has_body(request: web.BaseRequest) -> bool:
    return bool(request.content_length) or request.headers.get("Transfer-Encoding", "").lower() == "chunked"


async def read_bounded(request: web.BaseRequest, limit: int) -> bytes:
    """The whole body, refused past `limit` bytes (checked before reading when declared)."""
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"body over {limit} bytes", {"size": request.content_length, "limit": limit})
    data = bytearray()
    async for chunk in body_chunks(request, "MANIFEST_INVALID"):
        data += chunk
        if len(data) > limit:
            raise TooLarge(f"body over {limit} bytes", {"limit": limit})
    return bytes(data)


def content_range(request: web.BaseRequest) -> tuple[int | None, int | None]:
    """(start, length) from a chunk's Content-Range, checked against Content-Length."""
    value = request.headers.get("Content-Range")
    if value is None:
        return None, None
    m = _CONTENT_RANGE.match(value.strip())
    if m is None:
        raise BlobUploadInvalid(f"malformed Content-Range {value[:60]!r}; expected <start>-<end>")
    start, end = int(m.group(1)), int(m.group(2))
    if end < start:
        raise BlobUploadInvalid(f"Content-Range {value!r} ends before it starts")
    length = end - start + 1
    if request.content_length is not None and request.content_length != length:
        raise BlobUploadInvalid(f"Content-Range covers {length} bytes, Content-Length says "
                                f"{request.content_length}")
    return start, length


def page_args(request: web.BaseRequest) -> tuple[int | None, str | None]:
    n = request.query.get("n")
    last = request.query.get("last") or None
    if n is None or n == "":
        return None, last
    if not n.isdigit():
        raise BadParameter(f"n must be a non-negative integer, not {n[:20]!r}")
    return int(n), last


def upload_range(offset: int) -> str:
    """The Range header of an upload: the bytes received, inclusive."""
    return f"0-{max(offset - 1, 0)}"
