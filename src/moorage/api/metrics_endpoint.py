"""GET /metrics: the replica's Prometheus metrics, for Prometheus or a cluster admin.

Prometheus sends `Authorization: Bearer <token>` (its `authorization:
credentials_file`); the token is the cluster setting `metrics.token`, kept
only as a hash and compared in constant time. A cluster admin's Basic
credentials do too, for a look by hand. Anything else is a 401 that says
nothing about the registry. `moorage serve --metrics-listen` serves the same
body without authentication on an address of the operator's choosing
(metrics_site below).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from moorage.api.auth import Auth, Denied
from moorage.cluster.settings import secret_matches
from moorage.metrics import CONTENT_TYPE, Metrics

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="moorage metrics"'}


class MetricsEndpoint:
    def __init__(self, metrics: Metrics, auth: Auth | None, token_hash: Callable[[], str | None]):
        self.metrics = metrics
        self.auth = auth
        self.token_hash = token_hash

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        refused = await self._refused(request)
        if refused is not None:
            return refused
        return await exposition(self.metrics)

    async def _refused(self, request: web.BaseRequest) -> web.Response | None:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and secret_matches(self.token_hash(), value):
            return None
        if scheme.lower() == "basic" and self.auth is not None:
            try:
                user = await self.auth.basic(request, value)
            except Denied as e:
                if e.response.status == 429:
                    return e.response
                user = None
            if user is not None and self.auth.access.is_admin(user):
                return None
            if user is not None:
                return web.json_response({"error": f"the user {user} is not a cluster admin"}, status=403)
        return web.json_response({"error": "the metrics token (Authorization: Bearer) or a cluster "
                                  "admin's credentials are required"}, status=401, headers=_CHALLENGE)


async def exposition(metrics: Metrics) -> web.Response:
    metrics.fold()  # this process's latest requests, on the loop's thread where they are tallied
    # Reading a replica's metrics (every worker's files, in multiprocess mode) takes a few
    # to tens of milliseconds: not on the event loop.
    body = await asyncio.to_thread(metrics.exposition)
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE
    return response


def metrics_site(metrics: Metrics) -> web.Server:
    """The --metrics-listen server: /metrics and nothing else, plain HTTP, no authentication."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if request.rel_url.raw_path != "/metrics":
            return web.json_response({"error": "only /metrics is served here"}, status=404)
        if request.method not in ("GET", "HEAD"):
            return web.json_response({"error": "only GET"}, status=405, headers={"Allow": "GET, HEAD"})
        return await exposition(metrics)

    return web.Server(handle, access_log=None)
