"""The admin API's webhook endpoints (routes for AdminApi).

    GET    /_admin/webhooks              {"webhooks": [endpoint, ...]}: each with its pending events,
                                         the replica delivering it and how delivery went lately
    POST   /_admin/webhooks              {name, url, events?, repositories?, headers?, secret?, ca_pem?,
                                          timeout?, max_pending?, backoff_max?}: add; 409 if it exists
    DELETE /_admin/webhooks/<name>       with its queue: events not yet delivered are gone
    POST   /_admin/webhooks/<name>/test  send one `test` event now: {delivered, milliseconds | error}

A secret and the headers' values are written, never read back: an endpoint
is shown with `secret: true|false` and its header names.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from moorage.api.audit import USER_KEY
from moorage.api.routes import ADMIN, Route, route
from moorage.api.webhooks import Deliverer
from moorage.cluster.operations import ClusterError
from moorage.meta.webhooks import EndpointRecord, WebhookStore
from moorage.registry.webhooks import MAX_ENDPOINTS, WebhookError, endpoint_record, shown_url

_NAME = r"([a-z0-9][a-z0-9_.-]{0,62})"


def webhook_routes(store: WebhookStore, deliverer: Deliverer) -> list[Route]:
    async def add(request: web.BaseRequest, body: Any) -> dict:
        if not isinstance(body, dict):
            raise ClusterError("invalid", "the request body must be a JSON object")
        try:
            record = endpoint_record(body, request.get(USER_KEY))
        except WebhookError as e:
            raise ClusterError("invalid", str(e)) from None
        if record.name not in store.endpoints and len(store.endpoints) >= MAX_ENDPOINTS:
            raise ClusterError("refused", f"a cluster has at most {MAX_ENDPOINTS} webhook endpoints")
        if not await store.add(record):
            raise ClusterError("refused", f"a webhook named {record.name} exists; remove it first")
        return shown(store, record)

    async def remove(request: web.BaseRequest, body: Any, name: str) -> dict:
        if not await store.remove(name):
            raise ClusterError("unknown", f"no webhook named {name}")
        return {"removed": name}

    async def test(request: web.BaseRequest, body: Any, name: str) -> dict:
        try:
            return await deliverer.test(name)
        except KeyError:
            raise ClusterError("unknown", f"no webhook named {name}") from None

    async def listed(request: web.BaseRequest, body: Any) -> dict:
        return {"webhooks": [shown(store, e) for _, e in sorted(store.endpoints.items())]}

    return [
        route("GET", r"^/_admin/webhooks$", listed, ADMIN),
        route("POST", r"^/_admin/webhooks$", add, ADMIN),
        route("DELETE", rf"^/_admin/webhooks/{_NAME}$", remove, ADMIN),
        route("POST", rf"^/_admin/webhooks/{_NAME}/test$", test, ADMIN),
    ]


def shown(store: WebhookStore, e: EndpointRecord) -> dict:
    """An endpoint as the admin API shows it: no secret, no header value."""
    state = store.states.get(e.name)
    return {
        "name": e.name, "url": shown_url(e.url), "events": e.events, "repositories": e.repositories,
        "headers": sorted(e.headers), "secret": e.secret is not None, "ca_cert": e.ca_pem is not None,
        "timeout": e.timeout, "max_pending": e.max_pending, "backoff_max": e.backoff_max,
        "created": e.created, "created_by": e.created_by,
        "pending": store.pending(e.name), "delivering_replica": store.locks.get(e.name),
        "last_success": state.last_success if state else None,
        "failing_since": state.failing_since if state else None,
        "last_error": state.last_error if state and state.failing_since else None,
    }



