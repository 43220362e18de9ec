"""Webhook delivery: each endpoint's queue, sent in order by whichever replica holds it.

Every replica runs `Deliverer.run` (one of the replica's background tasks).
For each configured endpoint without a deliverer it tries to take the
endpoint's lock, a key under this replica's lease (meta/webhooks.py); the
one that gets it sends the queue in etcd's order, one request at a time, up
to BATCH events per body, and deletes what the endpoint accepted (a 2xx or
3xx, as distribution counts it) while it still holds the lock. A failure is
retried after a backoff with full jitter, doubling from 1 s to the endpoint's
`backoff_max`, for as long as it takes: nothing is dropped for age. A
replica that dies stops renewing its lease; within LEASE_TTL seconds the lock
is gone and another replica takes the queue over and sends what was not
acknowledged (at least once: a body may arrive twice, never out of order).

Each body is signed when the endpoint has a secret: `Moorage-Signature:
sha256=<hex HMAC-SHA256 of the body>`. Secrets and header values are never
logged; a URL is logged without user, password or query.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import ssl
import time
import uuid

import aiohttp
import msgspec
from aiohttp import web

from moorage.backoff import Backoff
from moorage.meta.errors import MetadataUnavailable
from moorage.meta.webhooks import Batch, DeliveryState, EndpointRecord, WebhookStore, events_in
from moorage.metrics import Metrics
from moorage.registry.webhooks import MEDIA_TYPE, Notifier, RequestInfo, shown_url

log = logging.getLogger(__name__)

LEASE_TTL = 10
BATCH = 20                 # events per body at most
FIRST_BACKOFF = 1.0
MAX_RESPONSE = 64 << 10    # of an endpoint's answer, read and thrown away
SIGNATURE = "Moorage-Signature"
USER_AGENT = "moorage-webhooks"


def request_info(request: web.BaseRequest, user: str | None) -> RequestInfo:
    """What an event says of the request that caused it (distribution's `request` and `actor`)."""
    headers = request.headers
    return RequestInfo(id=str(uuid.uuid4()), addr=request.remote or "", host=headers.get("Host", "")[:256],
                       method=request.method, useragent=headers.get("User-Agent", "")[:512], user=user)


def envelope(bodies: list[bytes]) -> bytes:
    """Distribution's envelope around the events of several queued batches, in their order."""
    events = [raw for body in bodies for raw in events_in(body)]
    return b'{"events":[' + b",".join(bytes(e) for e in events) + b"]}"


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class DeliveryFailed(Exception):
    """One sentence: why an endpoint did not take a body."""


class Deliverer:
    def __init__(self, store: WebhookStore, notifier: Notifier, replica_id: str, metrics: Metrics | None):
        self.store = store
        self.notifier = notifier
        self.replica_id = replica_id
        self.metrics = metrics
        self._lease: int | None = None
        self._tasks: dict[str, asyncio.Task] = {}
        self._session: aiohttp.ClientSession | None = None
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._known: set[str] = set()
        self._held: set[str] = set()      # the locks this process took, under self._lease

    # -- the replica's task -------------------------------------------------------------

    async def run(self) -> None:
        """Take and deliver the endpoints no live replica holds; renew our lease. Until cancelled."""
        keeper = asyncio.create_task(self._keep_lease())
        try:
            while True:
                self.store.changed.clear()
                self._observe()
                await self._take()
                try:
                    await asyncio.wait_for(self.store.changed.wait(), LEASE_TTL / 4)
                except asyncio.TimeoutError:
                    pass
        finally:
            keeper.cancel()
            for task in self._tasks.values():
                task.cancel()
            await asyncio.gather(keeper, *self._tasks.values(), return_exceptions=True)
            self._tasks.clear()
            if self._lease is not None:
                try:  # our locks go now, not in LEASE_TTL: another replica takes over at once
                    await asyncio.wait_for(self.store.revoke(self._lease), 2.0)
                except (MetadataUnavailable, asyncio.TimeoutError):
                    pass
            if self._session is not None:
                await self._session.close()

    def _observe(self) -> None:
        """The webhook gauges of every replica: the cluster's backlog per endpoint, from the watch."""
        if self.metrics is None:
            return
        names = set(self.store.endpoints)
        for name in names - self._known:
            self.metrics.webhook_endpoint(name)
        for name in self._known - names:
            self.metrics.webhook_endpoint_removed(name)
        self._known = names
        for name in names:
            self.metrics.webhook_pending.labels(name).set(self.store.pending(name))

    async def _take(self) -> None:
        for name, task in list(self._tasks.items()):
            if task.done() or name not in self.store.endpoints or self.store.locks.get(name) != self.replica_id:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    log.error("webhook delivery stopped by an error; restarting it", exc_info=task.exception(),
                              extra={"endpoint": name})
                task.cancel()
                del self._tasks[name]
        for name in self.store.endpoints:
            if name in self._tasks:
                continue
            holder = self.store.locks.get(name)
            if holder == self.replica_id and name in self._held:  # taken by us; its delivery ended by an error
                self._tasks[name] = asyncio.create_task(self._deliver(name), name=f"webhook-{name}")
                continue
            if holder is not None:
                continue
            try:
                lease = await self._ensure_lease()
                if await self.store.acquire(name, self.replica_id, lease):
                    self._held.add(name)
                    log.info("delivering a webhook endpoint's events", extra={"endpoint": name})
                    self._tasks[name] = asyncio.create_task(self._deliver(name), name=f"webhook-{name}")
            except MetadataUnavailable as e:
                log.debug("webhook lock not taken", extra={"endpoint": name, "error": str(e)})
                return

    async def _ensure_lease(self) -> int:
        if self._lease is None:
            self._lease = await self.store.lease(LEASE_TTL)
        return self._lease

    async def _keep_lease(self) -> None:
        while True:
            await asyncio.sleep(LEASE_TTL / 3)
            if self._lease is None:
                continue
            try:
                if await self.store.keep_alive(self._lease) <= 0:
                    self._lease_lost()
            except MetadataUnavailable:
                pass  # etcd away: the lease may lapse, and then another replica delivers

    def _lease_lost(self) -> None:
        log.warning("webhook lease expired; another replica takes over its endpoints")
        self._lease = None
        self._held.clear()
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()

    # -- one endpoint ---------------------------------------------------------------------

    async def _deliver(self, name: str) -> None:
        backoff: Backoff | None = None   # while deliveries fail
        state = self.store.states.get(name) or DeliveryState()
        while True:
            endpoint = self.store.endpoints.get(name)
            if endpoint is None or self.store.locks.get(name, self.replica_id) != self.replica_id:
                return
            batches = self.store.batches(name, BATCH)
            if not batches:
                self.store.changed.clear()
                await self.store.changed.wait()
                continue
            count = sum(b.count for b in batches)
            try:
                await self.send(endpoint, envelope([b.body or b"[]" for b in batches]))
            except DeliveryFailed as e:
                self._count(name, "failed", count)
                if state.failing_since is None or state.last_error != str(e):
                    state.failing_since = state.failing_since or time.time()
                    state.last_failure, state.last_error, state.replica = time.time(), str(e), self.replica_id
                    log.warning("webhook delivery failed; retrying", extra={
                        "endpoint": name, "url": shown_url(endpoint.url), "error": str(e), "pending": count})
                    await self._save_state(name, state)
                # Full jitter, as the module doc says.
                backoff = backoff or Backoff(min(FIRST_BACKOFF, endpoint.backoff_max), endpoint.backoff_max, least=0)
                await backoff.sleep()
                continue
            backoff = None
            self._count(name, "delivered", count)
            try:
                if not await self.store.delivered(name, self.replica_id, batches):
                    return  # the lock is someone else's now: they send from where etcd says
            except MetadataUnavailable:
                await asyncio.sleep(1.0)  # sent again later: at least once
                continue
            await self._wait_gone(name, batches)
            if state.failing_since is not None or state.last_success is None \
                    or time.time() - state.last_success > 60:
                if state.failing_since is not None:
                    log.info("webhook delivery recovered", extra={"endpoint": name})
                state.failing_since, state.last_success, state.replica = None, time.time(), self.replica_id
                await self._save_state(name, state)

    async def _wait_gone(self, name: str, batches: list[Batch]) -> None:
        """Until our watch has seen the delivered batches deleted (so they are not sent twice)."""
        queue = self.store.queues.get(name)
        while queue is not None and any(b.key in queue.batches for b in batches):
            self.store.changed.clear()
            await self.store.changed.wait()
            queue = self.store.queues.get(name)

    async def _save_state(self, name: str, state: DeliveryState) -> None:
        try:
            await self.store.set_state(name, self.replica_id, state)
        except MetadataUnavailable:
            pass

    def _count(self, name: str, result: str, count: int) -> None:
        if self.metrics is not None:
            self.metrics.webhook_deliveries.labels(name, result).inc(count)

    # -- HTTP -------------------------------------------------------------------------------

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers={"User-Agent": USER_AGENT})
        return self._session

    def _ssl(self, endpoint: EndpointRecord) -> ssl.SSLContext | bool:
        if not endpoint.url.startswith("https:") or endpoint.ca_pem is None:
            return True
        ctx = self._contexts.get(endpoint.ca_pem)
        if ctx is None:
            ctx = self._contexts[endpoint.ca_pem] = ssl.create_default_context(cadata=endpoint.ca_pem)
        return ctx

    async def send(self, endpoint: EndpointRecord, body: bytes) -> float:
        """POST one body to an endpoint; the seconds it took, or DeliveryFailed saying why."""
        headers = dict(endpoint.headers)
        headers["Content-Type"] = MEDIA_TYPE
        if endpoint.secret:
            headers[SIGNATURE] = sign(endpoint.secret, body)
        started = time.monotonic()
        try:
            async with self._client().post(endpoint.url, data=body, headers=headers, allow_redirects=False,
                                           ssl=self._ssl(endpoint),
                                           timeout=aiohttp.ClientTimeout(total=endpoint.timeout)) as response:
                await response.content.read(MAX_RESPONSE)
                status = response.status
        except asyncio.TimeoutError:
            raise DeliveryFailed(f"no answer within {endpoint.timeout:g} s") from None
        except aiohttp.ClientConnectorCertificateError as e:
            raise DeliveryFailed(f"its TLS certificate is not trusted ({e.certificate_error})") from None
        except aiohttp.ClientConnectorError as e:
            raise DeliveryFailed(f"cannot connect: {e.os_error.strerror or e.os_error}") from None
        except (aiohttp.ClientError, OSError, ValueError) as e:
            raise DeliveryFailed(f"{type(e).__name__}: {str(e)[:200]}") from None
        if not 200 <= status < 400:
            raise DeliveryFailed(f"it answered HTTP {status}")
        return time.monotonic() - started

    async def test(self, name: str) -> dict:
        """Send one `test` event to an endpoint now, outside its queue."""
        endpoint = self.store.endpoints.get(name)
        if endpoint is None:
            raise KeyError(name)
        event = self.notifier.event("test", None, {})
        body = b'{"events":[' + msgspec.json.encode(event) + b"]}"
        try:
            seconds = await self.send(endpoint, body)
        except DeliveryFailed as e:
            return {"name": name, "delivered": False, "error": str(e)}
        return {"name": name, "delivered": True, "milliseconds": round(seconds * 1000)}
