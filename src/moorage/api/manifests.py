"""Handlers for manifests, tags, referrers and the catalog."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import quote

import msgspec
from aiohttp import web

from moorage.api.audit import USER_KEY
from moorage.api.bodies import read_bounded
from moorage.api.webhooks import request_info
from moorage.registry.errors import BadParameter, ManifestUnknown
from moorage.registry.manifests import MANIFEST_TYPES, OCI_INDEX
from moorage.registry.repositories import Repositories


def page_args(request: web.BaseRequest) -> tuple[int | None, str | None]:
    n = request.query.get("n")
    last = request.query.get("last") or None
    if n is None or n == "":
        return None, last
    if not n.isdigit():
        raise BadParameter(f"n must be a non-negative integer, not {n[:20]!r}")
    return int(n), last


def _accepts(request: web.Request, media_type: str) -> bool:
    """Accept negotiation: a client that names manifest types gets only those."""
    accept = request.headers.getall("Accept", ())
    if not accept:
        return True
    types = {part.split(";")[0].strip() for value in accept for part in value.split(",")}
    if "*/*" in types or media_type in types:
        return True
    return not (types & MANIFEST_TYPES)


def _next_link(path: str, n: int, last: str) -> str:
    return f'<{path}?n={n}&last={quote(last, safe="")}>; rel="next"'


def _page(path: str, body: dict, items: list[str], more: bool, n: int | None) -> web.Response:
    """A page of a lexically sorted list, with the spec's Link to the next one."""
    headers = {}
    if more and items and n != 0:
        headers["Link"] = _next_link(path, len(items), items[-1])
    return web.Response(body=msgspec.json.encode(body), content_type="application/json", headers=headers)


class ManifestHandlers:
    def __init__(self, repositories: Repositories):
        self.repositories = repositories

    async def get(self, request: web.Request, name: str, reference: str) -> web.Response:
        digest, record = await self.repositories.manifest(name, reference)
        if not _accepts(request, record.media_type):
            raise ManifestUnknown(f"manifest {reference} is a {record.media_type}, "
                                  "which the Accept header does not allow",
                                  {"mediaType": record.media_type})
        headers = {"Docker-Content-Digest": digest, "ETag": f'"{digest}"'}
        if request.method == "HEAD":
            headers["Content-Length"] = str(record.size)
            return web.Response(headers=headers, content_type=record.media_type)
        body = await self.repositories.manifest_body(digest)
        notifier = self.repositories.notifier
        if notifier is not None and notifier.store.pulls:  # the one question a GET asks of webhooks
            self.repositories.pulled(name, reference, digest, record, request_info(request, request.get(USER_KEY)))
        return web.Response(body=body, headers=headers, content_type=record.media_type)

    async def put(self, request: web.Request, name: str, reference: str) -> web.Response:
        body = await read_bounded(request, self.repositories.limits.max_manifest_bytes)
        user = request.get(USER_KEY)
        digest, subject = await self.repositories.put_manifest(
            name, reference, request.headers.get("Content-Type"), body, user, request_info(request, user))
        headers = {"Location": f"/v2/{name}/manifests/{digest}", "Docker-Content-Digest": digest}
        if subject:
            headers["OCI-Subject"] = subject
        return web.Response(status=201, headers=headers)

    async def delete(self, request: web.Request, name: str, reference: str) -> web.Response:
        await self.repositories.delete_manifest(name, reference, request_info(request, request.get(USER_KEY)))
        return web.Response(status=202)

    async def tags(self, request: web.Request, name: str) -> web.Response:
        n, last = page_args(request)
        tags, more = await self.repositories.tags(name, n, last)
        return _page(f"/v2/{name}/tags/list", {"name": name, "tags": tags}, tags, more, n)

    async def catalog(self, request: web.Request, visible: Callable[[str], bool] | None = None) -> web.Response:
        n, last = page_args(request)
        repos, more = await self.repositories.catalog(n, last, visible)
        return _page("/v2/_catalog", {"repositories": repos}, repos, more, n)

    async def referrers(self, request: web.Request, name: str, digest: str) -> web.Response:
        artifact_type = request.query.get("artifactType") or None
        found = await self.repositories.referrers(name, digest, artifact_type)
        headers = {"OCI-Filters-Applied": "artifactType"} if artifact_type else {}
        body = msgspec.json.encode({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": found})
        return web.Response(body=body, content_type=OCI_INDEX, headers=headers)
