"""The HTTP application: routing of the distribution API, errors, health.

Repository names contain slashes, so `/v2/` paths are matched from the right
by a handful of anchored patterns rather than by a router's segments; the raw
(still percent-encoded) path is matched, so an encoded ".." can never pass
the name grammar.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiohttp import web

from moorage.api import console, openapi
from moorage.api.admin import AdminApi
from moorage.api.audit import USER_KEY, RequestAudit
from moorage.api.auth import CATALOG_SCOPE, Auth, Denied, Need
from moorage.api.blobs import BlobHandlers
from moorage.api.connections import ClientCounts, GuardedServer
from moorage.api.errors import ERRORS, error_response, from_error
from moorage.api.manifests import ManifestHandlers
from moorage.api.metrics_endpoint import MetricsEndpoint
from moorage.api.routes import ANY, DELETE, PULL, PUSH, Route, Routes, route
from moorage.api.token_endpoint import TokenEndpoint
from moorage.metrics import Metrics
from moorage.registry.names import check_name
from moorage.registry.repositories import Repositories
from moorage.registry.uploads import Uploads

log = logging.getLogger(__name__)

API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}

READ_BUFFER = 2 << 20
# Limits on a request's head (aiohttp answers 400 past them): a header field
# fits a bearer token of a few kilobytes with room to spare; the request line
# fits a 255-character name, a digest and an upload's state; no client needs
# a hundred headers. Together they bound a head to about 1.6 MiB.
MAX_HEADER_FIELD = 16 << 10
MAX_REQUEST_LINE = 8 << 10
MAX_HEADERS = 100
# Idle keep-alive connections close after this (nginx's default); HAProxy in
# front keeps its own idle connections for 30 s, so it always closes first.
KEEPALIVE_SECONDS = 75.0

_READS = ("GET", "HEAD")
_ACTIONS = (PULL, PUSH, DELETE)


class Dispatcher:
    """The whole HTTP surface, as one callable for aiohttp's low-level server.

    Bypassing aiohttp's Application (router, middleware chain, signals) is
    worth a fifth of the CPU of a manifest GET, the hottest request there is.
    Each surface is a table of routes (api/routes.py): the distribution API
    here, the admin API (api/admin.py) and the web console (api/console/).
    """

    def __init__(self, repositories: Repositories, uploads: Uploads, health: Callable[[], dict],
                 ping: Callable[[], tuple[bool, str]], admin: AdminApi | None = None,
                 writable: Callable[[], tuple[bool, str]] | None = None,
                 readonly: Callable[[], bool] | None = None, audit: RequestAudit | None = None,
                 ca_pem: bytes | None = None, auth: Auth | None = None, metrics: Metrics | None = None,
                 metrics_token: Callable[[], str | None] = lambda: None):
        m = ManifestHandlers(repositories)
        b = BlobHandlers(repositories, uploads, metrics.pulled_bytes.inc if metrics is not None else None)
        manifest, upload, blob = (r"^/v2/(.+)/manifests/([^/]+)$", r"^/v2/(.+)/blobs/uploads/([^/]+)$",
                                  r"^/v2/(.+)/blobs/([^/]+)$")
        # The distribution API. A repository's routes name the action they need on it; the
        # base and the catalog authenticate their callers themselves. The last field is
        # distribution's name for the route in the request metrics (`handler`).
        self.v2 = Routes([
            route("GET", manifest, m.get, PULL, "manifest"), route("HEAD", manifest, m.get, PULL, "manifest"),
            route("PUT", manifest, m.put, PUSH, "manifest"), route("DELETE", manifest, m.delete, DELETE, "manifest"),
            route("GET", r"^/v2/(.+)/tags/list$", m.tags, PULL, "tags"),
            route("GET", r"^/v2/(.+)/referrers/([^/]+)$", m.referrers, PULL, "referrers"),
            route("POST", r"^/v2/(.+)/blobs/uploads/?$", b.start_upload, PUSH, "blob_upload"),
            route("GET", upload, b.status, PUSH, "blob_upload_chunk"),
            route("PATCH", upload, b.patch, PUSH, "blob_upload_chunk"),
            route("PUT", upload, b.put, PUSH, "blob_upload_chunk"),
            route("DELETE", upload, b.cancel, PUSH, "blob_upload_chunk"),
            route("GET", blob, b.get, PULL, "blob"), route("HEAD", blob, b.get, PULL, "blob"),
            route("DELETE", blob, b.delete, DELETE, "blob"),
            route("GET", r"^/v2/_catalog$", self._catalog, metric="catalog"),
            route(ANY, r"^/v2/?$", self._base, metric="base"),
        ])
        self.metrics = metrics
        self.metrics_endpoint = MetricsEndpoint(metrics, auth, metrics_token) if metrics is not None else None
        # The other fixed paths: anyone may ask (/metrics checks its own credentials).
        self.other = Routes([
            route(ANY, r"^/token$", self._token, metric="token"),
            route("GET", r"^/_ping$", self._ping, metric="ping"), route("HEAD", r"^/_ping$", self._ping, metric="ping"),
            route("GET", r"^/metrics$", self._metrics),
            route("GET", r"^/ca$", self._ca), route("HEAD", r"^/ca$", self._ca),
            route("GET", r"^/health$", self._health),
            route("GET", r"^/openapi\.json$", self._openapi), route("HEAD", r"^/openapi\.json$", self._openapi),
        ])
        self.catalog = m.catalog
        self.health = health
        self.ping = ping
        self.admin = admin
        self.writable = writable
        self.readonly = readonly
        self.audit = audit
        self.ca_pem = ca_pem  # served at /ca so clients can bootstrap trust
        self.auth = auth  # None only where nothing needs protecting (unit tests of the routing)
        self.token = TokenEndpoint(auth, auth.tokens, audit) if auth is not None else None
        self.console = console.build(repositories, auth, admin, audit, self._refuse_writes) \
            if auth is not None and admin is not None else None  # the web console: api/console/

    def routes(self) -> list[Route]:
        """Every route of every surface, the admin API's and the console's included."""
        return [*self.v2, *self.other, *(self.admin.routes if self.admin else ()),
                *(self.console.routes if self.console else ())]

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.rel_url.raw_path
        # A /v2/ path is matched once, here: for its route and its metrics' handler label.
        matched = self.v2.match(request.method, path) if path.startswith("/v2") else None
        metrics = self.metrics
        if metrics is not None:  # every request counted in one place, whatever answers it
            handler = self._handler_label(request.method, path, matched)
            started = metrics.request_started(handler)
        status = 499  # no response: the client went away, or the replica shut down
        try:
            if matched is None:
                try:
                    response = await self._other(request, path)
                except ERRORS as e:  # a body that stalled (BodyTimeout) on /token or /_admin/
                    response = from_error(e)
                status = response.status
                return response
            try:
                response = await self._v2(request, path, matched)
            except ERRORS as e:
                response = from_error(e)
            except Denied as e:
                response = e.response
            except (ConnectionResetError, asyncio.CancelledError):
                if self.audit is not None and request.method not in _READS:
                    self.audit.record(request, "write", 499, detail="no response: the client went away "
                                      "or the replica shut down")
                raise  # the client went away, or we are shutting down
            except Exception:
                log.exception("unhandled error", extra={"method": request.method, "path": path[:200]})
                response = error_response(500, "UNKNOWN", "internal error; the replica's log has the details")
            response.headers.update(API_VERSION)
            # Reads return without audit work: only writes and refusals are kept,
            # except the bare `GET /v2/` without credentials, which is how every
            # client starts (it asks for the auth challenge), not an attack.
            if self.audit is not None and (request.method not in _READS or response.status in (401, 403)) \
                    and not (path in ("/v2/", "/v2") and "Authorization" not in request.headers):
                self.audit.v2(request, response)
            status = response.status
            return response
        finally:
            if metrics is not None:
                metrics.request_done(request.method, status, handler, started)

    def _handler_label(self, method: str, path: str, matched) -> str:
        """distribution's name for what a request asks (metrics.HANDLERS)."""
        if matched is not None:
            return matched[0].metric if matched[0] is not None else "other"
        if path.startswith("/_admin/"):
            return "admin"
        if path in ("/", "/console") or path.startswith("/console/"):
            return "console"
        found, _, _ = self.other.match(method, path)
        return found.metric if found is not None else "other"

    async def _v2(self, request: web.BaseRequest, path: str, matched) -> web.StreamResponse:
        # Authorization comes before anything that could tell a stranger about
        # the registry (existence, read-only mode, quorum); only the route's
        # shape and the name's grammar are checked first, as they say nothing.
        found, m, allowed = matched
        if found is None:
            if allowed:
                return _method_not_allowed(allowed)
            return error_response(404, "NAME_UNKNOWN" if path.count("/") > 2 else "UNSUPPORTED",
                                  f"no such endpoint: {request.method} {path[:200]}")
        action = found.need
        if action not in _ACTIONS:
            return await found.handler(request)
        assert m is not None
        name, *rest = m.groups()
        check_name(name)
        auth = self.auth
        if auth is not None:
            # The hot path (a token, or nothing) awaits nothing.
            need = (name, action)
            caller = auth.quick(request, need) or await auth.authenticate(request, need)
            request[USER_KEY] = caller.user
            auth.authorize(request, caller, name, action)
            if request.method == "POST" and "mount" in request.query:
                # Mounting reads the source: without pull there, a plain upload session instead.
                source = request.query.get("from", "")
                request["moorage.mount"] = bool(source) and auth.may(caller, source, PULL)
        if request.method not in _READS:
            refused = self._refuse_writes()
            if refused is not None:
                return refused
        return await found.handler(request, name, *rest)

    async def _base(self, request: web.BaseRequest) -> web.StreamResponse:
        """`/v2/`: clients ask it first, for the auth challenge."""
        if self.auth is not None:
            self.auth.require_credentials(request, await self._caller(request))
        return web.Response(body=b"{}", content_type="application/json")

    async def _catalog(self, request: web.BaseRequest) -> web.StreamResponse:
        visible = None
        if self.auth is not None:
            visible = self.auth.authorize_catalog(request, await self._caller(request, CATALOG_SCOPE))
        return await self.catalog(request, visible)

    async def _caller(self, request: web.BaseRequest, scope: Need = None):
        assert self.auth is not None
        request[USER_KEY] = None  # until proven otherwise: refusals are audited as anonymous
        caller = await self.auth.authenticate(request, scope)
        request[USER_KEY] = caller.user
        return caller

    def _refuse_writes(self) -> web.Response | None:
        if self.readonly is not None and self.readonly():
            if self.metrics is not None:
                self.metrics.writes_refused.labels("readonly").inc()
            # As the reference registry's maintenance mode answers.
            return error_response(405, "UNSUPPORTED", "the registry is read-only (maintenance); "
                                  "writes are refused until the readonly setting is cleared")
        if self.writable is not None:
            ok, reason = self.writable()
            if not ok:
                if self.metrics is not None:
                    self.metrics.writes_refused.labels("no_quorum").inc()
                return error_response(503, "UNAVAILABLE", f"writes are refused: {reason}")
        return None

    async def _other(self, request: web.BaseRequest, path: str) -> web.StreamResponse:
        found, _, _ = self.other.match(request.method, path)
        if found is not None:
            return await found.handler(request)
        if path.startswith("/_admin/") and self.admin is not None:
            return await self.admin(request, path)
        if self.console is not None and (path in ("/", "/console") or path.startswith("/console/")):
            return await self.console(request, path)
        return _not_found()

    async def _token(self, request: web.BaseRequest) -> web.StreamResponse:
        return await self.token(request) if self.token is not None else _not_found()

    async def _ping(self, request: web.BaseRequest) -> web.StreamResponse:
        ok, reason = self.ping()
        if request.query.get("reads"):
            # A running replica can always serve what it knows: load
            # balancers fall back to this when no replica has quorum.
            return web.json_response({"ok": True, "writes": ok, "reason": reason})
        return web.json_response({"ok": ok, "reason": reason}, status=200 if ok else 503)

    async def _metrics(self, request: web.BaseRequest) -> web.StreamResponse:
        return await self.metrics_endpoint(request) if self.metrics_endpoint is not None else _not_found()

    async def _ca(self, request: web.BaseRequest) -> web.StreamResponse:
        if self.ca_pem is None:
            return web.json_response({"error": "this replica has no cluster CA"}, status=404)
        return web.Response(body=self.ca_pem, content_type="application/x-pem-file")

    async def _health(self, request: web.BaseRequest) -> web.StreamResponse:
        return web.json_response({**self.health(), "time": time.time()})

    async def _openapi(self, request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(body=openapi.document_json(), content_type="application/json")


def _not_found() -> web.Response:
    return web.json_response({"error": "not found"}, status=404)


def _method_not_allowed(methods) -> web.Response:
    allow = ", ".join(sorted(methods))
    return error_response(405, "UNSUPPORTED", f"method not allowed here; allowed: {allow}",
                          headers={"Allow": allow})


def create_server(repositories: Repositories, uploads: Uploads, health: Callable[[], dict],
                  ping: Callable[[], tuple[bool, str]], access_log: logging.Logger | None,
                  admin: AdminApi | None = None, writable: Callable[[], tuple[bool, str]] | None = None,
                  readonly: Callable[[], bool] | None = None,
                  audit: RequestAudit | None = None, ca_pem: bytes | None = None,
                  auth: Auth | None = None, client_counts: ClientCounts | None = None,
                  metrics: Metrics | None = None,
                  metrics_token: Callable[[], str | None] = lambda: None) -> web.Server:
    # A larger read buffer lets the socket keep filling while a writer thread
    # hashes and stores the previous megabyte of an upload.
    # GuardedServer adds a deadline for request heads and a per-client
    # connection cap (connections.py); body limits live in bodies.py.
    return GuardedServer(Dispatcher(repositories, uploads, health, ping, admin, writable, readonly,
                                    audit=audit, ca_pem=ca_pem, auth=auth, metrics=metrics,
                                    metrics_token=metrics_token),
                         access_log=access_log,
                         read_bufsize=READ_BUFFER, max_field_size=MAX_HEADER_FIELD,
                         max_line_size=MAX_REQUEST_LINE, max_headers=MAX_HEADERS,
                         keepalive_timeout=KEEPALIVE_SECONDS, client_counts=client_counts)
