"""Request bodies, read within limits: never whole in memory unless bounded, never left to stall.

Every handler that reads a body reads it here: streamed in chunks as it
arrives (blob uploads) or whole up to a limit (manifests, forms, the admin
API's JSON), with an idle timeout and a minimum rate so a client cannot hold
a request open for days.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from moorage.registry.errors import BLOB_UPLOAD_INVALID, RegistryError, TooLarge

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
