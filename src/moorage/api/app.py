"""The HTTP application: routing of the distribution API, errors, health.

Repository names contain slashes, so `/v2/` paths are matched from the right
by a handful of anchored patterns rather than by a router's segments; the raw
(still percent-encoded) path is matched, so an encoded ".." can never pass
the name grammar.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from moorage.api.admin import AdminApi
from moorage.api.blobs import BlobHandlers
from moorage.api.errors import error_response, from_error
from moorage.api.manifests import ManifestHandlers
from moorage.registry.errors import RegistryError
from moorage.registry.names import check_name
from moorage.registry.service import Registry
from moorage.registry.uploads import Uploads

log = logging.getLogger(__name__)

API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}

READ_BUFFER = 2 << 20
MAX_HEADER_FIELD = 16 << 10
KEEPALIVE_SECONDS = 75.0

Handler = Callable[..., Awaitable[web.StreamResponse]]


class Dispatcher:
    """The whole HTTP surface, as one callable for aiohttp's low-level server.

    Bypassing aiohttp's Application (router, middleware chain, signals) is
    worth a fifth of the CPU of a manifest GET, the hottest request there is.
    """

    def __init__(self, registry: Registry, uploads: Uploads, health: Callable[[], dict],
                 ping: Callable[[], tuple[bool, str]], admin: AdminApi | None = None,
                 writable: Callable[[], tuple[bool, str]] | None = None,
                 readonly: Callable[[], bool] | None = None):
        m = ManifestHandlers(registry)
        b = BlobHandlers(registry, uploads)
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
        self.health = health
        self.ping = ping
        self.admin = admin
        self.writable = writable
        self.readonly = readonly

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.rel_url.raw_path
        if not path.startswith("/v2"):
            return await self._other(request, path)
        try:
            response = await self._v2(request, path)
        except RegistryError as e:
            response = from_error(e)
        except (ConnectionResetError, asyncio.CancelledError):
            raise  # the client went away, or we are shutting down
        except OSError as e:
            log.exception("storage error", extra={"path": path[:200]})
            response = error_response(500, "UNKNOWN", f"storage error: {e.strerror or e}")
        except Exception:
            log.exception("unhandled error", extra={"method": request.method, "path": path[:200]})
            response = error_response(500, "UNKNOWN", "internal error; the replica's log has the details")
        response.headers.update(API_VERSION)
        return response

    async def _v2(self, request: web.BaseRequest, path: str) -> web.StreamResponse:
        if path in ("/v2/", "/v2"):
            return web.Response(body=b"{}", content_type="application/json")
        if request.method not in ("GET", "HEAD"):
            if self.readonly is not None and self.readonly():
                # As the reference registry's maintenance mode answers.
                return error_response(405, "UNSUPPORTED", "the registry is read-only (maintenance); "
                                      "writes are refused until the readonly setting is cleared")
            if self.writable is not None:
                ok, reason = self.writable()
                if not ok:
                    return error_response(503, "UNAVAILABLE", f"writes are refused: {reason}")
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

    async def _other(self, request: web.BaseRequest, path: str) -> web.StreamResponse:
        if path == "/_ping" and request.method in ("GET", "HEAD"):
            ok, reason = self.ping()
            if request.query.get("reads"):
                # A running replica can always serve what it knows: load
                # balancers fall back to this when no replica has quorum.
                return web.json_response({"ok": True, "writes": ok, "reason": reason})
            return web.json_response({"ok": ok, "reason": reason}, status=200 if ok else 503)
        if path == "/health" and request.method == "GET":
            return web.json_response({**self.health(), "time": time.time()})
        if path.startswith("/_admin/") and self.admin is not None:
            return await self.admin(request, path)
        return web.json_response({"error": "not found"}, status=404)


def _method_not_allowed(methods) -> web.Response:
    allow = ", ".join(sorted(methods))
    return error_response(405, "UNSUPPORTED", f"method not allowed here; allowed: {allow}",
                          headers={"Allow": allow})


def create_server(registry: Registry, uploads: Uploads, health: Callable[[], dict],
                  ping: Callable[[], tuple[bool, str]], access_log: logging.Logger | None,
                  admin: AdminApi | None = None, writable: Callable[[], tuple[bool, str]] | None = None,
                  readonly: Callable[[], bool] | None = None) -> web.Server:
    # A larger read buffer lets the socket keep filling while a writer thread
    # hashes and stores the previous megabyte of an upload.
    return web.Server(Dispatcher(registry, uploads, health, ping, admin, writable, readonly),
                      access_log=access_log,
                      read_bufsize=READ_BUFFER, max_field_size=MAX_HEADER_FIELD,
                      keepalive_timeout=KEEPALIVE_SECONDS)
