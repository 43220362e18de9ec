"""The admin API under /_admin/: cluster membership, status and settings.

Every call needs the admin's credentials (HTTP Basic). Errors are JSON
objects with one sentence in `error`, which the CLI prints as is.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from moorage.api.audit import USER_KEY, RequestAudit
from moorage.api.accessadmin import access_routes
from moorage.api.backup import backup_routes
from moorage.api.auth import Auth, Denied
from moorage.api.gcadmin import gc_routes
from moorage.api.errors import ERRORS, as_registry_error
from moorage.api.bodies import read_bounded
from moorage.api.routes import ADMIN, Route, Routes, route
from moorage.cluster.operations import ClusterError, ClusterOperations
from moorage.registry.access import Access, AccessError
from moorage.registry.errors import TooLarge
from moorage.registry.gc_runner import GcRunner
from moorage.registry.repositories import Repositories

MAX_BODY = 64 << 10
_READ: Any = object()  # dispatch(): read the body from the request
STATUS = {"invalid": 400, "unknown": 404, "refused": 409, "unavailable": 503}


def _json(body, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(body), status=status, content_type="application/json")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    response = _json({"error": message}, status)
    if headers:
        response.headers.update(headers)
    return response


class AdminApi:
    def __init__(self, cluster: ClusterOperations, auth: Auth, audit: RequestAudit | None = None,
                 access: Access | None = None, gc: GcRunner | None = None, repositories: Repositories | None = None,
                 webhooks: list[Route] | None = None):
        self.cluster = cluster
        self.auth = auth  # shared with /v2/: Basic parsing, the verification cache, the login slowdown
        self.audit = audit
        c = cluster
        # Every route needs a cluster admin; its handler takes (request, JSON body, *path parts).
        self.routes = Routes([
            route("GET", r"^/_admin/cluster/status$", lambda r, b: c.status(), ADMIN),
            route("POST", r"^/_admin/cluster/join$",
                  lambda r, b: c.join(_str(b, "replica_id"), _str(b, "peer_url")), ADMIN),
            route("POST", r"^/_admin/cluster/promote$",
                  lambda r, b: self._promoted(c.promote(_int(b, "member_id"))), ADMIN),
            route("POST", r"^/_admin/cluster/abandon$",
                  lambda r, b: self._done(c.abandon_join(_int(b, "member_id"))), ADMIN),
            route("DELETE", r"^/_admin/cluster/replicas/([0-9a-f]{1,64})$",
                  lambda r, b, rid: c.remove(rid, r.query.get("force", "") in ("1", "true", "yes")), ADMIN),
            route("GET", r"^/_admin/config$", lambda r, b: _now(c.settings_view()), ADMIN),
            route("PUT", r"^/_admin/config/([a-z0-9_.]{1,64})$",
                  lambda r, b, key: c.set_setting(key, b.get("value") if isinstance(b, dict) else None), ADMIN),
            route("DELETE", r"^/_admin/config/([a-z0-9_.]{1,64})$", lambda r, b, key: c.unset_setting(key), ADMIN),
            route("GET", r"^/_admin/audit$", lambda r, b: self._audit_query(r), ADMIN),
        ])
        if access is not None:  # users, teams, grants, visibility: see api/accessadmin.py
            self.routes.add(access_routes(access))
        if gc is not None:  # garbage collection runs: see api/gcadmin.py
            self.routes.add(gc_routes(gc))
        self.routes.add(backup_routes(cluster, repositories))  # snapshot, blobs: see api/backup.py
        if webhooks is not None:  # webhook endpoints: see api/webhookadmin.py
            self.routes.add(webhooks)

    @staticmethod
    async def _promoted(operation) -> dict:
        return {"promoted": await operation}

    @staticmethod
    async def _done(operation) -> dict:
        await operation
        return {"ok": True}

    async def _audit_query(self, request: web.BaseRequest) -> dict:
        if self.audit is None:
            raise ClusterError("unavailable", "this replica keeps no audit log")
        try:
            return await self.audit.query(request.query)
        except ValueError as e:
            raise _BadField(str(e)) from None

    async def __call__(self, request: web.BaseRequest, path: str) -> web.Response:
        response = await self._handle(request, path)
        # Audited: every call that changes something, and every one refused for credentials;
        # and every backup snapshot, as it carries every secret of the cluster.
        if self.audit is not None and (request.method not in ("GET", "HEAD") or response.status in (401, 403)
                                       or path == "/_admin/backup/snapshot"):
            self.audit.admin(request, response)
        return response

    async def _handle(self, request: web.BaseRequest, path: str) -> web.Response:
        try:
            admin = await self._is_admin(request)
        except _Refused as e:
            return e.response
        if not admin:
            return _error(401, "admin credentials are required",
                          {"WWW-Authenticate": 'Basic realm="moorage admin"'})
        return await self.dispatch(request, path)

    async def dispatch(self, request: web.BaseRequest, path: str, body: Any = _READ) -> web.Response:
        """Run the route for `path` for a caller already known to be a cluster admin.

        Over HTTP after `_handle`'s check, the body read from the request; the
        web console calls it with its own signed-in admin and a body built
        from a form, so both get the same handlers, validation and errors.
        """
        found, m, allowed = self.routes.match(request.method, path)
        if found is None:
            if allowed:
                return _error(405, f"{request.method} is not allowed on {path}")
            return _error(404, f"no admin endpoint {path}")
        assert m is not None
        if body is _READ:
            try:
                body = msgspec.json.decode(await read_bounded(request, MAX_BODY)) if request.can_read_body else {}
            except (msgspec.DecodeError, TooLarge):
                return _error(400, "the request body must be a JSON object of at most 64 KiB")
        try:
            result = await found.handler(request, body, *m.groups())
            # A streamed answer (a backup's snapshot or blobs) goes out as it is.
            return result if isinstance(result, web.StreamResponse) else _json(result)
        except (ClusterError, AccessError) as e:
            return _error(STATUS.get(e.kind, 500), e.message)
        except ERRORS as e:
            error = as_registry_error(e)
            return _error(error.status, error.message)
        except _BadField as e:
            return _error(400, str(e))

    async def _is_admin(self, request: web.BaseRequest) -> bool:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return False
        return self._admin_named(request, await self._basic(request, header[6:]))

    async def _basic(self, request: web.BaseRequest, value: str) -> str | None:
        try:
            return await self.auth.basic(request, value)
        except Denied as e:
            if e.response.status in (429, 503):
                headers = {"Retry-After": e.response.headers["Retry-After"]} \
                    if "Retry-After" in e.response.headers else None
                raise _Refused(_error(e.response.status, e.message, headers)) from None
            return None

    def _admin_named(self, request: web.BaseRequest, name: str | None) -> bool:
        if name is None:
            return False
        request[USER_KEY] = name  # who did it (or tried to), for the audit log
        if not self.auth.access.is_admin(name):
            raise _Refused(_error(403, f"the user {name} is not a cluster admin"))
        return True


class _Refused(Exception):
    """Valid-looking credentials refused (403), or not checked now (429, 503)."""

    def __init__(self, response: web.Response):
        super().__init__(response.status)
        self.response = response


class _BadField(ValueError):
    pass


async def _now(value):
    return value


def _str(body, field: str) -> str:
    value = body.get(field) if isinstance(body, dict) else None
    if not isinstance(value, str) or not value or len(value) > 512:
        raise _BadField(f"{field} is required (a string)")
    return value


def _int(body, field: str) -> int:
    value = body.get(field) if isinstance(body, dict) else None
    if not isinstance(value, int) or isinstance(value, bool):
        raise _BadField(f"{field} is required (an integer)")
    return value
