"""Handlers for blobs and blob uploads."""

from __future__ import annotations

import re

from aiohttp import web

from moorage.api.blobfile import Sent, blob_response
from moorage.api.bodies import body_chunks, has_body
from moorage.api.errors import from_error
from moorage.registry.errors import BlobUploadInvalid, DigestInvalid, RangeInvalid
from moorage.registry.names import check_digest, check_name
from moorage.registry.repositories import Repositories
from moorage.registry.sessions import Session
from moorage.registry.uploads import Uploads

_CONTENT_RANGE = re.compile(r"^(?:bytes[ =])?(\d+)-(\d+)(?:/(?:\d+|\*))?$")


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


def upload_range(offset: int) -> str:
    """The Range header of an upload: the bytes received, inclusive."""
    return f"0-{max(offset - 1, 0)}"


def _upload_headers(session: Session) -> dict[str, str]:
    return {
        "Location": session.location,
        "Range": upload_range(session.offset),
        "Docker-Upload-UUID": session.id,
    }


def _state(request: web.BaseRequest) -> str | None:
    return _upload_query(request)[0]


def _upload_query(request: web.BaseRequest) -> tuple[str | None, str | None]:
    """(_state, digest) of an upload URL.

    Scripts often append "?digest=..." to a Location that already has a query;
    the result, "?_state=S?digest=D", is read the way its author meant it.
    """
    state, digest = request.query.get("_state"), request.query.get("digest")
    if state and digest is None and "?digest=" in state:
        state, digest = state.split("?digest=", 1)
    return state, digest


def _created(name: str, digest: str) -> web.Response:
    return web.Response(status=201, headers={
        "Location": f"/v2/{name}/blobs/{digest}", "Docker-Content-Digest": digest})


class BlobHandlers:
    def __init__(self, repositories: Repositories, uploads: Uploads, sent: Sent | None = None):
        self.repositories = repositories
        self.uploads = uploads
        self.sent = sent  # bytes of each blob GET's answer, for moorage_pulled_bytes_total

    async def get(self, request: web.Request, name: str, digest: str) -> web.StreamResponse:
        record = await self.repositories.blob(name, digest)
        headers = {"Docker-Content-Digest": digest, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream", "ETag": f'"{digest}"'}
        if request.method == "HEAD":
            headers["Content-Length"] = str(record.size)
            return web.Response(headers=headers)
        return blob_response(await self.repositories.blob_body(digest, record.size), headers, self.sent)

    async def delete(self, request: web.Request, name: str, digest: str) -> web.Response:
        await self.repositories.delete_blob(name, digest)
        return web.Response(status=202)

    async def start_upload(self, request: web.Request, name: str) -> web.Response:
        mount, source = request.query.get("mount"), request.query.get("from")
        if mount is not None:
            check_digest(mount)
            # The dispatcher sets moorage.mount to False when the caller may not pull the source.
            if source and request.get("moorage.mount", True) and check_name(source) \
                    and await self.repositories.mount(name, mount, source):
                return _created(name, mount)
            # Not mountable: the spec says fall back to a new upload session.
        digest = request.query.get("digest")
        if digest is not None:
            await self.uploads.monolithic(name, digest, body_chunks(request), request.content_length)
            return _created(name, digest)
        return web.Response(status=202, headers=_upload_headers(self.uploads.start(name)))

    async def status(self, request: web.Request, name: str, upload_id: str) -> web.Response:
        session = await self.uploads.status(name, upload_id, _state(request))
        return web.Response(status=204, headers=_upload_headers(session))

    async def patch(self, request: web.Request, name: str, upload_id: str) -> web.Response:
        start, length = content_range(request)
        try:
            session = await self.uploads.append(name, upload_id, _state(request), body_chunks(request),
                                                start, length)
        except RangeInvalid as e:
            return await self._range_error(e, request, name, upload_id)
        return web.Response(status=202, headers=_upload_headers(session))

    async def put(self, request: web.Request, name: str, upload_id: str) -> web.Response:
        state, digest = _upload_query(request)
        if not digest:
            raise DigestInvalid("closing an upload needs ?digest=")
        start, length = content_range(request)
        body = body_chunks(request) if has_body(request) else None
        try:
            await self.uploads.finish(name, upload_id, state, digest, body, start, length,
                                      request.content_length)
        except RangeInvalid as e:
            return await self._range_error(e, request, name, upload_id)
        return _created(name, digest)

    async def cancel(self, request: web.Request, name: str, upload_id: str) -> web.Response:
        await self.uploads.cancel(name, upload_id, _state(request))
        return web.Response(status=204)

    async def _range_error(self, error: RangeInvalid, request: web.BaseRequest, name: str,
                           upload_id: str) -> web.Response:
        # A client that sent a chunk out of order learns where to resume.
        session = await self.uploads.status(name, upload_id, _state(request))
        return from_error(error, _upload_headers(session))
