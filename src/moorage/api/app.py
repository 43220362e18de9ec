"""The HTTP application: routing of the distribution API, errors, health.

Repository names contain slashes, so `/v2/` paths are matched from the right
by a handful of anchored patterns rather than by a router's segments; the raw
(still percent-encoded) path is matched, so an encoded ".." can never pass
the name grammar.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from moorage.api.blobs import BlobHandlers
from moorage.api.errors import error_response, from_error
from moorage.api.manifests import ManifestHandlers
from moorage.registry.errors import RegistryError
from moorage.registry.names import check_name
from moorage.registry.service import Registry
from moorage.registry.uploads import Uploads

log = logging.getLogger(__name__)

API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}

Handler = Callable[..., Awaitable[web.StreamResponse]]


class Routes:
    """Maps (pattern, method) to a handler taking the path's captures."""

    def __init__(self, manifests: ManifestHandlers, blobs: BlobHandlers):
        m, b = manifests, blobs
        self.table: list[tuple[re.Pattern, dict[str, Handler]]] = [
            (re.compile(r"^/v2/(.+)/manifests/([^/]+)$"),
             {"GET": m.get, "HEAD": m.get, "PUT": m.put, "DELETE": m.delete}),
            (re.compile(r"^/v2/(.+)/tags/list$"), {"GET": m.tags}),
            (re.compile(r"^/v2/(.+)/referrers/([^/]+)$"), {"GET": m.referrers}),
            (re.compile(r"^/v2/(.+)/blobs/uploads/?$"), {"POST": b.start_upload}),
            (re.compile(r"^/v2/(.+)/blobs/uploads/([^/]+)$"),
             {"GET": b.status, "PATCH": b.patch, "PUT": b.put, "DELETE": b.cancel}),
            (re.compile(r"^/v2/(.+)/blobs/([^/]+)$"),
             {"GET": b.get, "HEAD": b.get, "DELETE": b.delete}),
        ]
        self.catalog = m.catalog

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.rel_url.raw_path
        if path in ("/v2/", "/v2"):
            return web.json_response({})
        if path == "/v2/_catalog":
            if request.method != "GET":
                return _method_not_allowed(("GET",))
            return await self.catalog(request)
        for pattern, methods in self.table:
            m = pattern.match(path)
            if m is None:
                continue
            handler = methods.get(request.method)
            if handler is None:
                return _method_not_allowed(methods)
            name, *rest = m.groups()
            check_name(name)
            return await handler(request, name, *rest)
        return error_response(404, "NAME_UNKNOWN" if path.count("/") > 2 else "UNSUPPORTED",
                              f"no such endpoint: {request.method} {path[:200]}")


def _method_not_allowed(methods) -> web.Response:
    allow = ", ".join(sorted(methods))
    return error_response(405, "UNSUPPORTED", f"method not allowed here; allowed: {allow}",
                          headers={"Allow": allow})


@web.middleware
async def errors_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Every failure becomes an OCI error body; a bug becomes a 500 without a traceback."""
    try:
        return await handler(request)
    except RegistryError as e:
        return from_error(e)
    except web.HTTPException:
        raise
    except (ConnectionResetError, OSError) as e:
        if request.transport is None or request.transport.is_closing():
            raise  # the client went away; nobody to answer
        log.exception("storage error", extra={"path": request.path})
        return error_response(500, "UNKNOWN", f"storage error: {e.strerror or e}")
    except Exception:
        log.exception("unhandled error", extra={"method": request.method, "path": request.path})
        return error_response(500, "UNKNOWN", "internal error; the replica's log has the details")


async def _add_api_version(request: web.Request, response: web.StreamResponse) -> None:
    if request.path.startswith("/v2"):
        response.headers.update(API_VERSION)


def create_app(registry: Registry, health: Callable[[], dict], ping: Callable[[], tuple[bool, str]]
               ) -> web.Application:
    routes = Routes(ManifestHandlers(registry), BlobHandlers(registry, Uploads(registry)))
    app = web.Application(middlewares=[errors_middleware], client_max_size=registry.limits.max_manifest_bytes)
    app.on_response_prepare.append(_add_api_version)

    async def ping_handler(request: web.Request) -> web.Response:
        ok, reason = ping()
        return web.json_response({"ok": ok, "reason": reason}, status=200 if ok else 503)

    async def health_handler(request: web.Request) -> web.Response:
        return web.json_response({**health(), "time": time.time()})

    app.router.add_get("/_ping", ping_handler)
    app.router.add_get("/health", health_handler)
    app.router.add_route("*", "/v2{tail:.*}", routes.dispatch)
    return app
