"""Webhook events: which endpoint hears of what, in distribution's notification format.

A push, a delete or the end of a garbage collection run becomes, for each
endpoint whose events and repository patterns cover it, one event in
distribution's envelope format (`application/vnd.docker.distribution.events.
v1+json`), queued in etcd in the change's own transaction (meta/webhooks.py):
deciding costs a look at memory, writing costs one more operation in a
transaction the change makes anyway, and nothing here waits for an
endpoint. An endpoint whose queue is full (`max_pending` events) loses the
new event: counted (moorage_webhook_dropped_total) and logged.

Pulls are hot: a manifest GET writes nothing unless an endpoint subscribes
to pulls, and then its event joins an in-memory batch that `flush_pulls`
writes once a second (one etcd write per endpoint per second at most). The
last second's pull events of a process that dies are lost; pushes' never.

Delivery (HTTP) is the api layer's (api/webhooks.py): the registry knows no
HTTP.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import re
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

import msgspec

from moorage.backoff import Backoff
from moorage.meta.errors import MetadataUnavailable
from moorage.meta.gc_store import GcRun
from moorage.meta.webhooks import EndpointRecord, QueuedEvent, WebhookStore
from moorage.metrics import Metrics
from moorage.registry.access import AccessError, check_pattern

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/vnd.docker.distribution.events.v1+json"
EVENTS = ("push", "pull", "delete", "gc")
DEFAULT_EVENTS = ("push", "delete")
MAX_ENDPOINTS = 32
NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")
# Headers the request itself sets: a configured one would break it or forge the signature.
RESERVED_HEADERS = {"host", "content-length", "content-type", "transfer-encoding", "connection",
                    "moorage-signature", "te", "upgrade", "trailer", "keep-alive", "proxy-connection"}
MAX_HEADERS = 16
MAX_URL = 2048
MAX_SECRET = 4096
PULL_FLUSH_SECONDS = 1.0
PULL_BATCH = 100
PULL_BUFFER = 1000          # events a process keeps per endpoint while etcd does not take them
DROP_WARNING_SECONDS = 10.0


class WebhookError(ValueError):
    """An endpoint's configuration refused; str() is one sentence."""


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """The request an event tells of, as distribution's `request` and `actor` records say it."""

    id: str
    addr: str
    host: str
    method: str
    useragent: str
    user: str | None


# -- configuration ------------------------------------------------------------------------

def endpoint_record(body: dict, created_by: str | None) -> EndpointRecord:
    """An endpoint from the admin API's JSON, every field checked; WebhookError says what is wrong."""
    name = body.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise WebhookError("a webhook's name is 1 to 63 lowercase letters, digits, '.', '_' or '-', "
                           "starting with a letter or digit")
    url = body.get("url")
    if not isinstance(url, str) or len(url) > MAX_URL:
        raise WebhookError(f"a webhook needs --url, an http or https URL of at most {MAX_URL} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookError(f"the webhook URL {shown_url(url)!r} is not an http:// or https:// URL with a host")
    try:
        parts.port
    except ValueError:
        raise WebhookError(f"the webhook URL {shown_url(url)!r} has an invalid port") from None
    if parts.username is not None or parts.password is not None:
        raise WebhookError("a webhook URL carries no user or password: send credentials with "
                           "--header 'Authorization: ...' instead")
    events = body.get("events") or list(DEFAULT_EVENTS)
    if not isinstance(events, list) or not all(isinstance(e, str) and e in EVENTS for e in events):
        raise WebhookError(f"webhook events are some of {', '.join(EVENTS)}")
    repositories = body.get("repositories") or ["*"]
    if not isinstance(repositories, list) or len(repositories) > 64:
        raise WebhookError("a webhook takes at most 64 repository patterns")
    try:
        repositories = [check_pattern(p) for p in repositories]
    except AccessError as e:
        raise WebhookError(e.message) from None
    headers = body.get("headers") or {}
    if not isinstance(headers, dict) or len(headers) > MAX_HEADERS:
        raise WebhookError(f"a webhook takes at most {MAX_HEADERS} headers")
    for key, value in headers.items():
        if not isinstance(key, str) or not HEADER_NAME.match(key) or not isinstance(value, str) \
                or len(value) > 4096 or any(c in value for c in "\r\n\0"):
            raise WebhookError("a webhook header is 'Name: value', the name a token and the value one "
                               "line of at most 4096 characters")
        if key.lower() in RESERVED_HEADERS:
            raise WebhookError(f"the header {key} is set by the delivery itself and cannot be configured")
    secret = body.get("secret")
    if secret is not None and (not isinstance(secret, str) or not 1 <= len(secret) <= MAX_SECRET):
        raise WebhookError(f"a webhook secret is 1 to {MAX_SECRET} characters")
    ca_pem = body.get("ca_pem")
    if ca_pem is not None and (not isinstance(ca_pem, str) or "BEGIN CERTIFICATE" not in ca_pem
                               or len(ca_pem) > 64 << 10):
        raise WebhookError("a webhook's CA certificate is PEM text (BEGIN CERTIFICATE)")
    numbers = {}
    for key, low, high, default in (("timeout", 0.1, 60.0, 5.0), ("max_pending", 1, 1_000_000, 10_000),
                                    ("backoff_max", 0.1, 3600.0, 60.0)):
        value = body.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise WebhookError(f"a webhook's {key.replace('_', '-')} is between {low:g} and {high:g}")
        numbers[key] = value
    return EndpointRecord(name=name, url=url, events=sorted(set(events), key=EVENTS.index),
                          repositories=repositories, headers=headers, secret=secret, ca_pem=ca_pem,
                          timeout=float(numbers["timeout"]), max_pending=int(numbers["max_pending"]),
                          backoff_max=float(numbers["backoff_max"]), created=time.time(), created_by=created_by)


def shown_url(url: str) -> str:
    """A URL as logs and lists may show it: no user, password or query (they may hold secrets)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def covers(endpoint: EndpointRecord, action: str, repo: str | None) -> bool:
    if action not in endpoint.events:
        return False
    if repo is None:
        return True
    return any(p == "*" or p == repo or (p.endswith("/*") and repo.startswith(p[:-1]))
               for p in endpoint.repositories)


# -- events --------------------------------------------------------------------------------

def _timestamp(at: float) -> str:
    return dt.datetime.fromtimestamp(at, dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


class Notifier:
    """Turns the registry's changes into queued events. `source` is the replica's advertised
    host:port, `scheme` its API's (for each event's target URL)."""

    def __init__(self, store: WebhookStore, metrics: Metrics | None, source: str, scheme: str = "https"):
        self.store = store
        self.metrics = metrics
        self.source = {"addr": source, "instanceID": str(uuid.uuid4())}
        self.scheme = scheme
        self._pulls: dict[str, list[dict]] = {}
        self._dropped: dict[str, int] = {}
        self._warned_at: dict[str, float] = {}

    def _endpoints(self, action: str, repo: str | None) -> list[EndpointRecord]:
        return [e for e in self.store.endpoints.values() if covers(e, action, repo)]

    def event(self, action: str, request: RequestInfo | None, target: dict, at: float | None = None,
              **extra) -> dict:
        """One event in distribution's format."""
        event = {"id": str(uuid.uuid4()), "timestamp": _timestamp(at or time.time()), "action": action,
                 "target": target}
        if request is not None:
            event["request"] = {"id": request.id, "addr": request.addr, "host": request.host,
                                "method": request.method, "useragent": request.useragent}
            event["actor"] = {"name": request.user} if request.user else {}
        else:
            event["request"], event["actor"] = {}, {}
        event["source"] = self.source
        event.update(extra)
        return event

    def _target(self, repo: str, digest: str | None, media_type: str | None = None, size: int | None = None,
                tag: str | None = None, request: RequestInfo | None = None) -> dict:
        target: dict = {}
        if media_type:
            target["mediaType"] = media_type
        if size is not None:
            target["size"] = size
        if digest:
            target["digest"] = digest
        if size is not None:
            target["length"] = size
        target["repository"] = repo
        if digest:
            host = request.host if request is not None and request.host else self.source["addr"]
            target["url"] = f"{self.scheme}://{host}/v2/{repo}/manifests/{digest}"
        if tag:
            target["tag"] = tag
        return target

    def _queue(self, action: str, repo: str | None, event: dict) -> list[QueuedEvent]:
        body = msgspec.json.encode([event])
        queued = []
        for endpoint in self._endpoints(action, repo):
            if self.store.pending(endpoint.name) >= endpoint.max_pending:
                self._drop(endpoint.name, action, repo)
                continue
            queued.append(QueuedEvent(endpoint.name, body))
        return queued

    def pushed(self, repo: str, digest: str, media_type: str, size: int, tag: str | None,
               request: RequestInfo | None) -> list[QueuedEvent]:
        """The events of a manifest push, for its transaction."""
        if not self.store.endpoints:
            return []
        return self._queue("push", repo, self.event(
            "push", request, self._target(repo, digest, media_type, size, tag, request)))

    def deleted(self, repo: str, digest: str | None, tag: str | None,
                request: RequestInfo | None) -> list[QueuedEvent]:
        """The events of a manifest (by digest) or tag delete, for its transaction."""
        if not self.store.endpoints:
            return []
        return self._queue("delete", repo, self.event(
            "delete", request, self._target(repo, digest, tag=tag, request=request)))

    def collected(self, run: GcRun) -> list[QueuedEvent]:
        """The event of a finished garbage collection run (Moorage's own action, `gc`)."""
        if not self.store.endpoints or run.dry_run:
            return []
        return self._queue("gc", None, self.event("gc", None, {}, at=run.finished, gc={
            "run": run.id, "result": {"done": "success"}.get(run.state, run.state),
            "manifests_deleted": run.manifests_swept, "blobs_deleted": run.blobs_swept,
            "bytes_freed": run.bytes_freed, "error": run.error}))

    def pulled(self, repo: str, digest: str, media_type: str, size: int, tag: str | None,
               request: RequestInfo | None) -> None:
        """A manifest GET: buffered for the endpoints that subscribe to pulls (none: nothing)."""
        endpoints = self._endpoints("pull", repo)
        if not endpoints:
            return
        event = self.event("pull", request, self._target(repo, digest, media_type, size, tag, request))
        for endpoint in endpoints:
            buffer = self._pulls.setdefault(endpoint.name, [])
            if len(buffer) >= PULL_BUFFER:
                self._drop(endpoint.name, "pull", repo)
                continue
            buffer.append(event)

    async def flush_pulls(self) -> None:
        """Write buffered pull events, one batch per endpoint, every PULL_FLUSH_SECONDS: runs until cancelled."""
        delay, retry = PULL_FLUSH_SECONDS, Backoff(2 * PULL_FLUSH_SECONDS, 30.0)
        while True:
            await asyncio.sleep(delay)
            try:
                await self._flush()
                delay = PULL_FLUSH_SECONDS
                retry.reset()
            except MetadataUnavailable as e:
                delay = retry.next()
                log.warning("pull events not written yet; retrying", extra={"error": str(e),
                                                                             "retry_seconds": round(delay, 2)})

    async def _flush(self) -> None:
        if not self._pulls:
            return
        batches: list[QueuedEvent] = []
        taken: list[tuple[str, list[dict]]] = []
        for name, buffer in list(self._pulls.items()):
            endpoint = self.store.endpoints.get(name)
            if endpoint is None:
                del self._pulls[name]
                continue
            room = endpoint.max_pending - self.store.pending(name)
            for start in range(0, len(buffer), PULL_BATCH):
                chunk = buffer[start:start + PULL_BATCH]
                if room <= 0:
                    for _ in chunk:
                        self._drop(name, "pull", None)
                    continue
                kept = chunk[:room]
                for _ in chunk[room:]:
                    self._drop(name, "pull", None)
                room -= len(kept)
                batches.append(QueuedEvent(name, msgspec.json.encode(kept)))
            taken.append((name, buffer))
        for name, _ in taken:
            self._pulls.pop(name, None)
        try:
            await self.store.queue(batches)
        except MetadataUnavailable:
            for name, buffer in taken:  # back in front, within the bound
                self._pulls[name] = (buffer + self._pulls.get(name, []))[:PULL_BUFFER]
            raise

    def _drop(self, endpoint: str, action: str, repo: str | None) -> None:
        if self.metrics is not None:
            self.metrics.webhook_dropped.labels(endpoint).inc()
        self._dropped[endpoint] = self._dropped.get(endpoint, 0) + 1
        now = time.monotonic()
        if now - self._warned_at.get(endpoint, -DROP_WARNING_SECONDS) >= DROP_WARNING_SECONDS:
            self._warned_at[endpoint] = now
            log.warning("webhook events dropped: the endpoint's backlog is full", extra={
                "endpoint": endpoint, "action": action, "repository": repo,
                "dropped": self._dropped.pop(endpoint)})

