"""Webhook endpoints and their queues of events, in etcd: what survives any one replica.

An event is written as a key under its endpoint's queue in the same
transaction as the change it tells of (MetaStore's writes take `events=`),
so an acknowledged push always has its event and a failed one never does.
Each queue key holds one batch of events, already serialized (one event for
a push or a delete, up to a hundred pulls); a queue is in etcd's order, the
keys' revisions (and a batch's own order within one). Each write of an event
is nested in a comparison that its endpoint still exists, so an endpoint
removed meanwhile never leaves an orphan queue.

Whichever replica holds an endpoint's lock (a key under a lease) delivers
its queue and deletes what was delivered, on condition that it still holds
the lock; a replica that dies stops renewing its lease, the lock goes with
it, and any other takes the queue over.

Every replica's index watch brings the endpoints, the queues, the locks and
the delivery states into memory here (`WebhookStore`): the push path decides
from memory (no read per push), and a deliverer reads its queue from memory.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import msgspec

from moorage.meta import keys
from moorage.meta.errors import boundary
from moorage.meta.etcd import EtcdClient, Event, cmp_absent, cmp_exists, cmp_value, op_delete, op_put, op_txn
from moorage.meta.index import Index


class EndpointRecord(msgspec.Struct, kw_only=True, frozen=True):
    """A webhook endpoint as configured (registry/webhooks.py checks every field)."""

    name: str
    url: str
    events: list[str]                      # push, pull, delete, gc
    repositories: list[str]                # patterns as grants take them: NAME, NS/*, *
    headers: dict[str, str] = {}           # sent with every request; values are secrets
    secret: str | None = None              # HMAC-SHA256 key of the signature header
    ca_pem: str | None = None              # a receiver's own CA, for https
    timeout: float = 5.0                   # seconds per request
    max_pending: int = 10_000              # events queued at most; newer ones are dropped
    backoff_max: float = 60.0              # seconds between retries at most
    created: float = 0.0
    created_by: str | None = None


class DeliveryState(msgspec.Struct, kw_only=True):
    """How delivery went lately, written by the deliverer when it changes (not per attempt)."""

    replica: str | None = None
    last_success: float | None = None
    last_failure: float | None = None
    failing_since: float | None = None
    last_error: str | None = None


_endpoint = msgspec.json.Decoder(EndpointRecord)
_state = msgspec.json.Decoder(DeliveryState)
_batch = msgspec.json.Decoder(list[msgspec.Raw])
encode = msgspec.json.encode


@dataclass(frozen=True, slots=True)
class QueuedEvent:
    """Events for one endpoint, written by a change's transaction (or a flush of pulls)."""

    endpoint: str
    body: bytes      # a JSON array of distribution events, serialized


@dataclass(slots=True)
class Batch:
    key: bytes
    revision: int
    count: int
    body: bytes | None    # kept only where deliveries are made


@dataclass(slots=True)
class Queue:
    batches: dict[bytes, Batch] = field(default_factory=dict)
    pending: int = 0                # events, summed over the batches
    _ordered: list[Batch] | None = None

    def ordered(self) -> list[Batch]:
        if self._ordered is None:
            self._ordered = sorted(self.batches.values(), key=lambda b: (b.revision, b.key))
        return self._ordered


def queue_ops(events: Iterable[QueuedEvent]) -> list:
    """The operations that queue `events`, to add to a change's transaction: each only while
    its endpoint still exists."""
    return [op_txn([cmp_exists(keys.webhook_endpoint(e.endpoint))],
                   [op_put(keys.webhook_queue(e.endpoint) + uuid.uuid4().hex.encode(), e.body)])
            for e in events]


def events_in(body: bytes) -> list[msgspec.Raw]:
    return _batch.decode(body)


class WebhookStore:
    """The endpoints, queues, locks and delivery states as this process's index sees them.

    `keep_bodies`: whether queued events are kept in memory (where deliveries are made)
    or only counted (where events are only written)."""

    def __init__(self, client: EtcdClient, index: Index, keep_bodies: bool = True):
        self.client = client
        self.index = index
        self.keep_bodies = keep_bodies
        self.endpoints: dict[str, EndpointRecord] = {}
        self.queues: dict[str, Queue] = {}
        self.locks: dict[str, str] = {}
        self.states: dict[str, DeliveryState] = {}
        self.pulls = False               # whether any endpoint wants pull events (asked per manifest GET)
        self.changed = asyncio.Event()   # set on every change; deliverers clear it and look again
        index.subscribe(keys.WEBHOOK_ENDPOINT, self._endpoint_event, self.endpoints.clear)
        index.subscribe(keys.WEBHOOK_QUEUE, self._queue_event, self.queues.clear)
        index.subscribe(keys.WEBHOOK_LOCK, self._lock_event, self.locks.clear)
        index.subscribe(keys.WEBHOOK_STATE, self._state_event, self.states.clear)

    # -- the watch ----------------------------------------------------------------------

    def _endpoint_event(self, event: Event) -> None:
        name = event.kv.key[len(keys.WEBHOOK_ENDPOINT):].decode(errors="replace")
        if event.deleted:
            self.endpoints.pop(name, None)
        else:
            try:
                self.endpoints[name] = _endpoint.decode(event.kv.value)
            except msgspec.DecodeError:
                return  # written by a newer version
        self.pulls = any("pull" in e.events for e in self.endpoints.values())
        self.changed.set()

    def _queue_event(self, event: Event) -> None:
        name, _, _ = event.kv.key[len(keys.WEBHOOK_QUEUE):].decode(errors="replace").partition("/")
        queue = self.queues.get(name)
        key = event.kv.key
        if event.deleted:
            if queue is not None and (gone := queue.batches.pop(key, None)) is not None:
                queue.pending -= gone.count
                queue._ordered = None
                if not queue.batches:
                    del self.queues[name]
        else:
            try:
                count = len(events_in(event.kv.value))
            except msgspec.DecodeError:
                count = 1
            if queue is None:
                queue = self.queues[name] = Queue()
            queue.batches[key] = Batch(key, event.kv.mod_revision, count,
                                       event.kv.value if self.keep_bodies else None)
            queue.pending += count
            queue._ordered = None
        self.changed.set()

    def _lock_event(self, event: Event) -> None:
        name = event.kv.key[len(keys.WEBHOOK_LOCK):].decode(errors="replace")
        if event.deleted:
            self.locks.pop(name, None)
        else:
            self.locks[name] = event.kv.value.decode(errors="replace")
        self.changed.set()

    def _state_event(self, event: Event) -> None:
        name = event.kv.key[len(keys.WEBHOOK_STATE):].decode(errors="replace")
        if event.deleted:
            self.states.pop(name, None)
        else:
            try:
                self.states[name] = _state.decode(event.kv.value)
            except msgspec.DecodeError:
                return
        self.changed.set()

    # -- reading (memory) ------------------------------------------------------------------

    def pending(self, name: str) -> int:
        queue = self.queues.get(name)
        return queue.pending if queue is not None else 0

    def batches(self, name: str, at_most: int) -> list[Batch]:
        """The oldest batches of an endpoint's queue, holding at most `at_most` events (at least one batch)."""
        queue = self.queues.get(name)
        if queue is None:
            return []
        chosen: list[Batch] = []
        events = 0
        for batch in queue.ordered():
            if chosen and events + batch.count > at_most:
                break
            chosen.append(batch)
            events += batch.count
        return chosen

    # -- writing ---------------------------------------------------------------------------

    async def _applied(self, revision: int) -> None:
        await self.index.wait_applied(revision)

    @boundary
    async def add(self, record: EndpointRecord) -> bool:
        """Create an endpoint; False when the name is taken."""
        key = keys.webhook_endpoint(record.name)
        result = await self.client.txn([cmp_absent(key)], [op_put(key, encode(record))])
        if result.succeeded:
            await self._applied(result.revision)
        return result.succeeded

    @boundary
    async def remove(self, name: str) -> bool:
        """Delete an endpoint with its queue, lock and state; False when there is no such endpoint."""
        key = keys.webhook_endpoint(name)
        result = await self.client.txn([cmp_exists(key)], [
            op_delete(key), op_delete(keys.webhook_queue(name), prefix=True),
            op_delete(keys.webhook_lock(name)), op_delete(keys.webhook_state(name))])
        if result.succeeded:
            await self._applied(result.revision)
        return result.succeeded

    @boundary
    async def queue(self, events: Sequence[QueuedEvent]) -> None:
        """Queue events outside any other change (a flush of pulls)."""
        if events:
            await self.client.txn([], queue_ops(events))

    @boundary
    async def lease(self, ttl: int) -> int:
        return await self.client.grant_lease(ttl)

    @boundary
    async def keep_alive(self, lease: int) -> int:
        return await self.client.keep_alive(lease)

    @boundary
    async def revoke(self, lease: int) -> None:
        await self.client.revoke_lease(lease)

    @boundary
    async def acquire(self, name: str, replica: str, lease: int) -> bool:
        """Become the endpoint's deliverer, if it has none and still exists."""
        lock = keys.webhook_lock(name)
        result = await self.client.txn([cmp_absent(lock), cmp_exists(keys.webhook_endpoint(name))],
                                       [op_put(lock, replica.encode(), lease)])
        return result.succeeded

    @boundary
    async def release(self, name: str, replica: str) -> None:
        lock = keys.webhook_lock(name)
        await self.client.txn([cmp_value(lock, replica.encode())], [op_delete(lock)])

    @boundary
    async def delivered(self, name: str, replica: str, batches: Sequence[Batch]) -> bool:
        """Delete delivered batches, while `replica` still holds the endpoint's lock; False if it
        lost it (the next deliverer sends them again: at least once)."""
        result = await self.client.txn([cmp_value(keys.webhook_lock(name), replica.encode())],
                                       [op_delete(b.key) for b in batches])
        return result.succeeded

    @boundary
    async def set_state(self, name: str, replica: str, state: DeliveryState) -> None:
        await self.client.txn([cmp_value(keys.webhook_lock(name), replica.encode())],
                              [op_put(keys.webhook_state(name), encode(state))])

