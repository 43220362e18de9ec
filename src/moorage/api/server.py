"""The registry and its HTTP API on a running replica: what cluster/replica.py serves on top.

`RegistryService.build` wires the registry's parts (uploads, access,
tokens, garbage collection, the audit log) to the replica's metadata stores
and storage, and the HTTP side (the dispatcher, the admin API, the console,
the listener) to those; the replica starts it once its metadata view is
loaded and stops it on shutdown, after the requests in flight.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import msgspec
from aiohttp import web

from moorage.api.admin import AdminApi
from moorage.api.app import create_server
from moorage.api.audit import RequestAudit
from moorage.api.auth import Auth
from moorage.api.metrics_endpoint import metrics_site
from moorage.api.proxy_protocol import ApiSite
from moorage.api.throttle import RemoteThrottle
from moorage.api.webhookadmin import webhook_routes
from moorage.api.webhooks import Deliverer
from moorage.cluster.addresses import in_use
from moorage.cluster.blob_storage import shared_directory
from moorage.cluster.channel import Channel
from moorage.cluster.replica import DRAIN_SECONDS, Replica
from moorage.cluster.replica_config import StartError
from moorage.cluster.store_probe import StoreState
from moorage.cluster.upload_locks import WriterLocks
from moorage.meta.webhooks import WebhookStore
from moorage.registry.access import Access
from moorage.registry.audit import AuditEvent, AuditLog, BucketAuditLog
from moorage.registry.gc_runner import GcRunner
from moorage.registry.limits import Limits
from moorage.registry.placement import Placement
from moorage.registry.repositories import Repositories
from moorage.registry.sessions import Sessions
from moorage.registry.tokens import Tokens
from moorage.registry.uploads import Uploads
from moorage.registry.webhooks import Notifier

log = logging.getLogger("moorage.serve")


class RegistryService:
    """The cluster/replica.py Service: built before the replica's metadata view loads (what
    subscribes to it must), started once it has."""

    def __init__(self, replica: Replica, access: Access, audit: AuditLog, gc: GcRunner, server: web.Server,
                 auth: Auth, notifier: Notifier, deliverer: Deliverer):
        self.replica = replica
        self.auth = auth
        self.access = access
        self.audit = audit
        self.gc = gc
        self.server = server
        self.notifier = notifier
        self.deliverer = deliverer
        self.runner: web.ServerRunner | None = None
        self.metrics_runner: web.ServerRunner | None = None

    @classmethod
    async def build(cls, replica: Replica) -> "RegistryService":
        identity, meta, storage, clock = replica.identity, replica.meta, replica.storage, replica.clock
        assert identity is not None and meta is not None and storage is not None and clock is not None
        assert replica.gc_store is not None and replica.operations is not None
        settings = replica.settings
        metrics = replica.metrics
        access = Access(meta, meta.index)  # subscribes to the index: before it loads
        limits = Limits()
        settings.on_change(lambda key, value: _apply_limit(limits, key, value))
        placement = Placement(meta, storage)
        # Webhooks: the endpoints and queues come with the index's watch (before it loads).
        webhooks = WebhookStore(meta.client, meta.index)
        notifier = Notifier(webhooks, metrics, replica.url.split("://", 1)[-1],
                            "https" if replica.api_ssl is not None else "http")
        deliverer = Deliverer(webhooks, notifier, identity.replica_id, metrics)
        repositories = Repositories(meta, storage, placement, limits, notifier)
        settings.on_change(lambda key, value: _apply_redirect(repositories, key, value))
        # With workers, one writer per upload across them (a lock file of the replica's own).
        writers = WriterLocks(replica.data_dir / "run" / "uploads.lock") if replica.config.workers > 1 else None
        # With workers, the session cache is kept valid across them by counts in shared memory.
        sessions = Sessions(meta, await meta.secret("upload-state"), peers=replica.shared)
        uploads = Uploads(storage, sessions, placement, limits,
                          writers=writers, metrics=metrics)
        # Every replica signs with the same secret, so each verifies any replica's tokens locally.
        tokens = Tokens(await meta.secret("token-signing"), lambda: settings["token.lifetime_seconds"],
                        replica=identity.replica_id, offset=clock.offset)
        channel = replica.channel  # a worker's link to its replica's process, else None
        # A worker asks the replica's process about failed logins: the slowdown is per replica.
        auth = Auth(access, tokens, throttle=RemoteThrottle(channel.call) if channel is not None else None,
                    metrics=metrics)
        gc = GcRunner(meta, replica.gc_store, storage, settings, identity.replica_id, uploads.sessions, clock,
                      metrics=metrics, notifier=notifier)
        # On the shared storage, so any replica can answer for the whole cluster: files in the
        # shared directory, or objects in the bucket when the replicas share none. A worker's
        # events go to the replica's process, the one writer of the replica's files.
        shared = shared_directory(identity)
        sink = ChannelAuditSink(channel) if channel is not None else None
        audit = (AuditLog(storage_dir=shared, replica=identity.replica_id, sink=sink, metrics=metrics)
                 if shared is not None
                 else BucketAuditLog(storage, replica=identity.replica_id, sink=sink))
        request_audit = RequestAudit(audit)
        debug = logging.getLogger().isEnabledFor(logging.DEBUG)
        server = create_server(repositories, uploads, replica.health, replica.ping,
                               logging.getLogger("aiohttp.access") if debug else None,
                               admin=AdminApi(replica.operations, auth, audit=request_audit, access=access, gc=gc,
                                              repositories=repositories, webhooks=webhook_routes(webhooks, deliverer)),
                               writable=replica.quorum.writable, readonly=lambda: settings["readonly"],
                               audit=request_audit, ca_pem=replica.pki.ca_cert.read_bytes(), auth=auth,
                               client_counts=replica.shared if replica.worker is not None else None,
                               metrics=metrics, metrics_token=lambda: settings["metrics.token"])
        return cls(replica, access, audit, gc, server, auth, notifier, deliverer)

    async def start(self) -> None:
        replica = self.replica
        if replica.worker is None:  # the replica's process (a worker's parent, or alone)
            generated = await self.access.users.ensure_admin(replica.config.admin_password)
            if generated:
                replica.announce(f"created the user admin with the password {generated} (shown once; keep it safe)")
        await self.audit.open()
        if replica.worker is None:
            await self._serve_metrics()
        if replica.worker is None and replica.config.workers > 1:
            return  # the workers serve; the replica's process accepts for them (cluster/handout.py)
        self.runner = web.ServerRunner(self.server, handle_signals=False, shutdown_timeout=5.0)
        await self.runner.setup()
        # Also reads the PROXY protocol header from the load balancers that proxy_protocol.from names.
        worker, shared = replica.worker, replica.shared
        site = ApiSite(self.runner, replica.host, replica.port, ssl_context=replica.api_ssl, backlog=1024,
                       trusted=lambda: replica.proxy_from,
                       handed=worker.conn if worker is not None else None,
                       on_closed=shared.add_closed if worker is not None and shared is not None else None)
        try:
            await site.start()
        except OSError as e:
            raise StartError(f"the listen address {replica.host}:{replica.port} {in_use(e)}") from None

    async def _serve_metrics(self) -> None:
        """--metrics-listen: /metrics alone, plain HTTP, no authentication; the replica's process
        serves it (with workers, their files summed)."""
        replica = self.replica
        if replica.metrics_address is None:
            return
        host, port = replica.metrics_address
        self.metrics_runner = web.ServerRunner(metrics_site(replica.metrics), handle_signals=False)
        await self.metrics_runner.setup()
        try:
            await web.TCPSite(self.metrics_runner, host, port).start()
        except OSError as e:
            raise StartError(f"the --metrics-listen address {host}:{port} {in_use(e)}") from None

    async def from_worker(self, message: dict) -> Any:
        """In the replica's process: a worker's audit event, or its call."""
        kind = message.get("t")
        if kind == "audit":
            self.audit.record(msgspec.convert(message["e"], AuditEvent))
            return None
        op, args = message.get("op"), message.get("args", [])
        if op == "throttle.check":
            return await self.auth.throttle.check(*args)
        if op == "throttle.record":
            await self.auth.throttle.record(*args)
            return None
        if op == "audit.flush":
            if self.replica.supervisor is not None:
                await self.replica.supervisor.barrier()  # what every worker sent before now
            await self.audit.flush()
            return None
        log.warning("a worker asked for something unknown", extra={"op": op})
        return None

    async def from_parent(self, message: dict) -> Any:
        """In a worker: the replica's process tells (the object store's state, from its probe) or
        asks; a barrier needs no more than the answer."""
        if message.get("t") == "object-store":
            self.replica.store_state = msgspec.convert(message["state"], StoreState)
        return None

    async def stop(self) -> None:
        if self.runner is not None:
            log.info("draining requests in flight", extra={"timeout_seconds": DRAIN_SECONDS})
            await self._drain(self.runner)
        await self.gc.stop()
        if self.metrics_runner is not None:
            await self.metrics_runner.cleanup()
        if self.runner is not None:
            await self.runner.cleanup()
        await self.audit.close()  # after the last request, while the disk is surely still there

    async def collect_garbage(self) -> None:
        await self.gc.schedule()

    async def write_audit(self) -> None:
        await self.audit.run()

    async def deliver_events(self) -> None:
        await self.deliverer.run()

    async def flush_pull_events(self) -> None:
        # Every process that answers requests buffers its own pull events (with workers, each).
        await self.notifier.flush_pulls()

    async def _drain(self, runner: web.ServerRunner) -> None:
        """Stop accepting connections, then let requests in flight finish.

        aiohttp's own shutdown first marks every connection closing, after
        which it drops the rest of a request body: an upload in flight could
        never complete. So we wait for in-flight requests ourselves first.
        """
        for site in list(runner.sites):
            await site.stop()
        deadline = time.monotonic() + DRAIN_SECONDS
        # `_request_in_progress` spans a whole exchange, response body included.
        while time.monotonic() < deadline and any(
                getattr(conn, "_request_in_progress", False) for conn in self.server.connections):
            await asyncio.sleep(0.05)


class ChannelAuditSink:
    """A worker's audit events, each sent to its replica's process as it happens (before the
    response that it records goes out), where the replica's one writer keeps them."""

    def __init__(self, channel: Channel):
        self.channel = channel

    def send(self, event: AuditEvent) -> None:
        try:
            self.channel.send({"t": "audit", "e": msgspec.to_builtins(event)})
        except (ConnectionError, RuntimeError):
            log.warning("audit event lost: the replica's process is gone", extra={"kind": event.kind})

    async def flush(self) -> None:
        await self.channel.call("audit.flush")


def _apply_redirect(repositories: Repositories, key: str, value: Any) -> None:
    if key == "storage.redirect":
        repositories.redirect = value


def _apply_limit(limits: Limits, key: str, value: Any) -> None:
    if key == "upload.max_blob_bytes":
        limits.max_blob_bytes = value
    elif key == "upload.max_manifest_bytes":
        limits.max_manifest_bytes = value
