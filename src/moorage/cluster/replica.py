"""A replica's process: its etcd member, the metadata view, its health, and the service on top.

`moorage serve` and `moorage join` (cli/) parse flags into a ReplicaConfig
(cluster/replica_config.py) and run a Replica; its life is here, in three
steps, with the parts it is made of in modules of their own (the blob
storage's choice and proof in blob_storage.py, the quorum probe in
quorum.py, the member's own entry in membership.py):

    build()   works out the address it advertises, its identity, the cluster
              CA and its certificates, and makes (without starting) its etcd
              member and storage driver;
    start()   starts the member (a joining replica first waits to be
              promoted), loads the metadata view, starts the background
              tasks and then the service on top, which serves;
    stop()    stops the service (requests in flight finish), the tasks, and
              the member.

The service is the registry and its HTTP API (api/server.py). It lives in
the layers above this one, so it is handed in as a factory (`Service`): the
cluster layer imports nothing of them.

With `workers` above 1 (cluster/workers.py) this process is the replica's
parent: it runs the member and the background tasks, and accepts the API's
connections (cluster/handout.py), which N worker processes serve; each
worker is a Replica too, built with `worker` set: no member, no background
task, its own metadata view fed by the parent's watch (cluster/index_relay.py),
connections from the parent, the shared block (cluster/shared.py) and a
control channel to it (cluster/channel.py).

A replica's background tasks are listed in one place, `Replica.tasks`, as
Patroni lists its HA loop; each runs until the replica stops.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from moorage import __version__
from moorage.cluster import addresses, blob_storage, endpoint, https, membership, pki, replicas
from moorage.cluster.channel import Channel
from moorage.cluster.clock import ClusterClock
from moorage.cluster.etcd_member import EtcdMember, node_tls
from moorage.cluster.identity import Identity, load_or_create
from moorage.cluster.index_relay import FOLLOW, RELAYED, Follower, WatchRelay
from moorage.cluster.operations import ClusterOperations
from moorage.cluster.quorum import Quorum
from moorage.cluster.replica_config import ReplicaConfig, Service, StartError
from moorage.cluster.sampler import Certificates, Sampler
from moorage.cluster.settings import ClusterSettings, Network, parse_networks, set_value
from moorage.cluster.shared import Shared
from moorage.cluster.store_probe import StoreState, probe_store
from moorage.cluster.workers import Supervisor, WorkerStart, forkserver
from moorage.meta import keys
from moorage.meta.etcd import EtcdClient, Event
from moorage.meta.gc_store import GcStore
from moorage.meta.index import Index
from moorage.meta.store import MetaStore
from moorage.metrics import Metrics, clear_metrics_dir
from moorage.storage.base import BlobDriver
from moorage.storage.drivers import storage_at
from moorage.storage.errors import StorageError

log = logging.getLogger("moorage.serve")

# How long stopping waits for requests in flight (the workers', as the service's own).
DRAIN_SECONDS = 30.0


@dataclass(frozen=True)
class Task:
    name: str
    run: Callable[[], Awaitable[Any]]


class Replica:
    """One replica. `promote` is set by `join`: the first start waits, as a learner, until the
    cluster has promoted this replica's member before serving; `on_serving` runs once it serves;
    `announce` tells the person who started it what they must see once (a CA fingerprint, a
    generated password)."""

    def __init__(self, config: ReplicaConfig, service: Callable[["Replica"], Awaitable[Service]],
                 promote: Callable[[int], Awaitable[bool]] | None = None,
                 on_serving: Callable[[Identity], Awaitable[None]] | None = None,
                 announce: Callable[[str], None] = lambda message: None,
                 worker: WorkerStart | None = None,
                 worker_main: Callable[[WorkerStart], None] | None = None):
        self.config = config
        # As a worker: what the parent handed over (its slot, channels, the shared block).
        self.worker = worker
        # As the parent of workers: the function each worker runs (pickled to the fork server).
        self.worker_main = worker_main
        self.shared: Shared | None = None
        self.channel: Channel | None = None       # a worker's link to the parent
        self.follower: Follower | None = None     # a worker's index, fed through that link
        self.supervisor: Supervisor | None = None
        self._forkserver: Any = None
        self._service_factory = service
        self.promote = promote
        self.on_serving = on_serving
        self.announce = announce
        self.data_dir = config.data_dir.resolve()
        self.settings = ClusterSettings()
        self.proxy_from: tuple[Network, ...] = ()   # the setting proxy_protocol.from, parsed
        self.started = time.time()
        self.stopping = asyncio.Event()
        self.removed = False
        self._tasks: list[asyncio.Task] = []
        self.host, self.port = addresses.parse_listen(config.listen)
        self.metrics_address: tuple[str, int] | None = None   # --metrics-listen, parsed by build()
        self.pki = pki.Paths(self.data_dir)
        # Made by build() and start(); None until then, and what stop() undoes.
        self.identity: Identity | None = None
        self.clock: ClusterClock | None = None
        self.created = False
        self.api_ssl: ssl.SSLContext | None = None
        self.url = ""
        self.storage: BlobDriver | None = None
        self.member: EtcdMember | None = None
        self._client: EtcdClient | None = None
        self.index: Index | None = None
        self.meta: MetaStore | None = None
        self.gc_store: GcStore | None = None
        self.operations: ClusterOperations | None = None
        # Whether the object store answers (None: blobs in a directory): the parent probes it
        # (store_probe.py) and tells its workers.
        self.store_state: StoreState | None = None
        self.service: Service | None = None
        # This process's metrics (the metrics module says why they are an object, handed down).
        # A replica of one process keeps them in memory. With worker processes one scrape, on
        # whichever worker answers it, sums them all (prometheus-client's multiprocess mode):
        # the parent empties DATA_DIR/run/metrics and builds its Metrics on it before any
        # worker starts, each worker builds its own on the same directory, and the parent marks
        # a worker's files dead when it exits; the metrics-sample and webhook-delivery tasks
        # and --metrics-listen are the parent's.
        metrics_dir = None
        if config.workers > 1:
            metrics_dir = config.data_dir.resolve() / "run" / "metrics"
            if worker is None:
                clear_metrics_dir(metrics_dir)
        self.metrics = Metrics(metrics_dir)
        self.quorum = Quorum(self.metrics, in_worker=worker is not None)

    # -- the tasks ------------------------------------------------------------------

    def tasks(self) -> list[Task]:
        """Everything a replica does in the background while it serves, in one list."""
        assert self.member is not None and self.index is not None and self.service is not None
        assert self.identity is not None
        service = self.service
        if self.worker is not None:
            return [
                # The parent's link: its index batches come on it (our view of the metadata, and
                # through it the settings: cluster/index_relay.py), and a call's replies; when it
                # closes, the parent is gone, and so are we.
                Task("parent-link", self._parent_link),
                # The pull events this worker's requests buffered, written once a second.
                Task("webhook-pulls", service.flush_pull_events),
            ]
        return [
            # etcd runs as our child: restarted when it dies; when it was removed, we stop.
            Task("etcd-supervisor", self.member.supervise),
            # The in-memory view of the metadata, and through it the settings, the access
            # records, GC's markers and the other replicas' clocks; relayed to the workers.
            Task("index-watch", self.index.watch),
            # Whether our member is the cluster's only one (reads then skip the revision check).
            Task("solo", lambda: membership.track_solo(self.client, self.index, self.identity.replica_id)),
            # A linearizable read every second: health, and writes refused at once without quorum.
            Task("quorum-probe", lambda: self.quorum.probe(self.client, self.index)),
            # Our replica record, refreshed; it ends when `moorage remove` deleted it, and so do we.
            Task("heartbeat", self._heartbeat),
            # The service's own: garbage collection on schedule, the audit log's writer (a
            # worker's audit events come to its parent's one writer), and delivery of webhook
            # events (each endpoint's queue by whichever replica holds it).
            Task("gc-schedule", service.collect_garbage),
            Task("audit-writer", service.write_audit),
            Task("webhook-delivery", service.deliver_events),
            Task("webhook-pulls", service.flush_pull_events),
            # The gauges nothing else keeps current: the cluster as we see it, etcd, disks, certificates.
            Task("metrics-sample", self._sampler().run),
        ] + ([
            # Whether the object store answers, for /health and status (not /_ping: every replica shares it).
            Task("store-probe", lambda: probe_store(self.storage, self.store_state, self._store_probed)),
        ] if self.store_state is not None and self.storage is not None else [])

    # -- health -----------------------------------------------------------------------

    def ping(self) -> tuple[bool, str]:
        if self.index is None or not self.index.watch_healthy:
            return False, "metadata watch is down: etcd unreachable"
        ok, reason = self.quorum.writable()
        return (ok, reason) if not ok else (True, "serving")

    def health(self) -> dict:
        assert self.index is not None and self.identity is not None
        ok, reason = self.ping()
        return {
            "replica_id": self.identity.replica_id,
            "version": __version__,
            "healthy": ok,
            "reason": reason,
            "metadata_revision": self.index.applied,
            "config_revision": self.settings.revision,
            "settings": self.settings.shown(),
            "repositories": len(self.index.repos),
            "blobs": len(self.index.blobs),
            "uptime_seconds": round(time.time() - self.started, 1),
            # Reported, never a reason to be unhealthy (store_probe.py says why).
            "object_store": msgspec.to_builtins(self.store_state) if self.store_state is not None else None,
            # The process that answered (tests tell a replica's workers apart by it).
            "worker": os.getpid(),
            "workers": self.config.workers,
        }

    @property
    def client(self) -> EtcdClient:
        assert self._client is not None
        return self._client

    # -- life -------------------------------------------------------------------------

    async def run(self) -> int:
        """Build, start, serve until SIGTERM (or removal), stop."""
        self.build()
        try:
            await self.start()
            await self._wait_for_stop()
        finally:
            await self.stop()
        log.info("moorage stopped", extra={"removed": self.removed})
        return 0

    def build(self) -> None:
        config = self.config
        https.check_options(config.https, self.host)
        advertised = addresses.advertised(self.host, config.advertise)
        if advertised.resolved_from is not None:
            log.info("advertising this host's one routable address", extra={
                "advertise": advertised.host, "listen": advertised.resolved_from})
        if self.worker is not None:
            # A worker reads what its parent made and wrote (identity, certificates), and
            # writes none of it: its ports are the parent's, taken by now.
            found = Identity.load(self.data_dir)
            if found is None:
                raise StartError(f"no replica identity in {self.data_dir}: a worker starts after its replica")
            identity, self.created = found, False
        else:
            object_store = blob_storage.object_store(config, self.data_dir)
            identity, self.created = load_or_create(self.data_dir, config.storage_dir, config.etcd_client_port,
                                                    config.etcd_peer_port, advertised.host, object_store)
            ports = [(self.host, self.port, "the listen address"),
                     (identity.advertise, identity.etcd_client_port, "the etcd client port"),
                     (identity.advertise, identity.etcd_peer_port, "the etcd peer port")]
            if config.metrics_listen is not None:
                try:
                    self.metrics_address = addresses.parse_listen(config.metrics_listen)
                except addresses.AddressError:
                    raise StartError(f"--metrics-listen takes HOST:PORT, not {config.metrics_listen!r}") from None
                ports.append((*self.metrics_address, "the --metrics-listen address"))
            addresses.check_ports_free(ports)
            # TLS before etcd: the member's certificates come from the cluster CA.
            https.ensure_ca(self.pki, identity.cluster_token, joining=identity.initial_cluster is not None,
                            announce=self.announce)
        self.identity = identity
        self.api_ssl = https.api_context(config.https, self.pki, pki.replica_names(
            self.host, advertised.host, extra=config.https.names))
        self.url = f"{'https' if self.api_ssl else 'http'}://{addresses.url_host(advertised.host)}:{self.port}"
        # etcd's mutual TLS: the node certificate covers the advertised address (peers and the
        # members' client URLs) and loopback; it is reissued when --advertise changes.
        if self.worker is None:
            pki.ensure_node_cert(self.pki, pki.replica_names(identity.advertise))
        try:
            self.storage = storage_at(identity.storage_dir, identity.s3, self.metrics)
        except StorageError as e:
            raise StartError(str(e)) from None
        self.member = EtcdMember(
            name=identity.replica_id, data_dir=self.data_dir / "etcd", tls=node_tls(self.data_dir),
            host=identity.advertise, client_port=identity.etcd_client_port, peer_port=identity.etcd_peer_port,
            cluster_token=identity.cluster_token, log_path=self.data_dir / "etcd.log",
            initial_cluster=identity.initial_cluster, member_id=identity.member_id, on_removed=self._removed)
        self.clock = ClusterClock(identity.replica_id)

    async def start(self) -> None:
        identity, storage, member, clock = self.identity, self.storage, self.member, self.clock
        assert identity is not None and storage is not None and member is not None and clock is not None, \
            "build() first"
        if self.worker is not None:
            await self._start_worker()
            return
        if self.config.workers > 1:
            # First: the fork server imports the registry while etcd starts.
            self._forkserver = forkserver(["moorage.cli.serve"])
            self.quorum.shared = self.shared = Shared.create(self.config.workers)
        await blob_storage.open_storage(storage, identity)
        if (opened := blob_storage.store_opened(identity)) is not None:
            self._store_probed(opened)   # the gauge starts at the start-up probe's answer
        await member.start()
        self._client = client = EtcdClient(member.endpoint, member.tls,
                                           on_write=self.shared.wrote if self.shared is not None else None,
                                           metrics=self.metrics)
        if self.promote is not None and identity.member_id is not None:
            await membership.await_promotion(client, self.promote, identity.member_id)
        elif (old := await membership.move_member(client, member.name, member.peer_url)) is not None:
            log.info("this replica's address changed", extra={"field": "etcd peer_url", "old": old,
                                                               "new": member.peer_url})
        index = self._open_view(client)
        self.service = await self._service_factory(self)
        await index.load()
        if self.created and self.promote is None and not self.config.s3_redirect:
            await set_value(client, "storage.redirect", False)
        self.quorum.ok_at = time.monotonic()  # the index just read from etcd
        self.metrics.started()
        self.metrics.quorum.set(1)
        self._record = replicas.new_record(identity.replica_id, self.url, member.peer_url, member.client_url)
        for name, (old, new) in replicas.moved(await replicas.record(client, identity.replica_id),
                                               self._record).items():
            log.info("this replica's address changed", extra={"field": name, "old": old, "new": new})
        self._tasks = [asyncio.create_task(t.run(), name=t.name) for t in self.tasks()]
        await self.service.start()
        if self.shared is not None:
            # The workers, then the listener: the API serves once every worker is ready.
            assert self.worker_main is not None
            service = self.service
            self.supervisor = Supervisor(self.config.workers, self.shared, self.worker_main,
                                         lambda slot, message: service.from_worker(message),
                                         self._forkserver, options=self.config,
                                         on_exit=lambda slot, pid: self.metrics.process_died(pid))
            # Before the workers start: each follows the parent's watch instead of its own.
            self.index.relay = WatchRelay(self.supervisor.relay)
            await self.supervisor.start()
            self.supervisor.serve(self.host, self.port)
        # For commands run on this node (`moorage status` with no --existing).
        endpoint.save(self.data_dir, endpoint.LocalApi(
            self.url, str(self.pki.ca_cert) if self.api_ssl is not None and self.config.https.cert is None else None))
        if identity.initial_cluster is not None:
            identity.initial_cluster = identity.member_id = None  # joined: plain restarts from now on
            identity.save(self.data_dir)
        log.info("moorage serving", extra={
            "url": self.url, "replica_id": identity.replica_id, "new_cluster": self.created,
            "storage_dir": identity.storage_dir, "data_dir": str(self.data_dir), "pid": os.getpid(),
            "workers": self.config.workers})
        if self.on_serving is not None:
            asyncio.create_task(self.on_serving(identity))

    def _open_view(self, client: EtcdClient) -> Index:
        """The metadata view and the stores on it. Whatever subscribes to the index does so
        before it loads, to see what is there already."""
        identity, storage, clock = self.identity, self.storage, self.clock
        assert identity is not None and storage is not None and clock is not None
        self.index = index = Index(client, peers=self.shared)
        index.subscribe(keys.CONFIG, self.settings.apply)
        if self.worker is None:  # the replica's removal stops the parent, which stops its workers
            index.subscribe(keys.REPLICA, self._replica_event)
        index.subscribe(keys.REPLICA, clock.observe)
        self.settings.on_change(self._apply_setting)
        self.meta = MetaStore(client, index)
        self.gc_store = GcStore(client, index)
        self.operations = ClusterOperations(client, index, self.settings, storage, identity.replica_id,
                                         identity.cluster_token, pki_paths=self.pki, clock=clock,
                                         storage_spec=blob_storage.storage_spec(identity),
                                         store_state=lambda: self.store_state)
        return index

    async def _start_worker(self) -> None:
        """As a worker: our own client of the replica's member and our own metadata view, fed
        by the parent's watch; no member to run, no background task but the parent's link."""
        start, identity, storage, member = self.worker, self.identity, self.storage, self.member
        assert start is not None and identity is not None and storage is not None and member is not None
        self.quorum.shared = self.shared = Shared(start.shared, start.workers, start.slot)
        self.channel = await Channel.open(start.ctl)
        await storage.open()
        self.store_state = blob_storage.store_opened(identity)
        self._client = client = EtcdClient(member.endpoint, member.tls, on_write=self.shared.wrote)
        index = self._open_view(client)
        self.service = await self._service_factory(self)
        self.follower = follower = Follower(index)
        # The link first: the answer to the follow call comes on it (and the batches after it).
        self._tasks = [asyncio.create_task(t.run(), name=t.name) for t in self.tasks()]
        channel = self.channel
        await follower.start(lambda: channel.call(FOLLOW))
        await self.service.start()
        self.channel.send({"t": "ready"})

    async def _parent_link(self) -> None:
        channel, service, follower = self.channel, self.service, self.follower
        assert channel is not None and service is not None and follower is not None

        async def handle(message: dict) -> Any:
            if message.get("t") in RELAYED:
                return await follower.handle(message)
            return await service.from_parent(message)
        await channel.serve(handle)
        log.debug("the replica's process closed our link; stopping")
        self.stopping.set()

    async def stop(self) -> None:
        """Whatever start() got to, undone in reverse."""
        if self.supervisor is not None:
            # The listener closes, then the workers drain their requests in flight.
            await self.supervisor.stop(DRAIN_SECONDS)
        if self.service is not None:
            await self.service.stop()   # requests in flight finish; the audit writer ends
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        if self._client is not None:
            await self._client.close()
        if self.member is not None and self.worker is None:
            await self.member.stop()
        if self.storage is not None:
            await self.storage.close()

    # -- settings and removal -------------------------------------------------------------

    def _apply_setting(self, key: str, value: Any) -> None:
        if key == "log.level":
            logging.getLogger().setLevel(value.upper())
        elif key == "proxy_protocol.from":
            self.proxy_from = parse_networks(value)
        log.info("cluster setting applied", extra={"key": key, "value": self.settings.shown()[key]})

    def _replica_event(self, event: Event) -> None:
        assert self.identity is not None
        if event.deleted and event.kv.key == keys.replica(self.identity.replica_id):
            self._removed()

    def _removed(self) -> None:
        if not self.removed:
            self.removed = True
            log.warning("this replica was removed from the cluster; shutting down")
            self.stopping.set()

    async def _wait_for_stop(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            if sig == signal.SIGINT and self.worker is not None:
                # A Ctrl-C reaches the whole process group: the parent drains its workers
                # (SIGTERM) in order; a worker leaving on its own would only be restarted.
                signal.signal(sig, signal.SIG_IGN)
                continue
            loop.add_signal_handler(sig, self.stopping.set)
        await self.stopping.wait()

    # -- the tasks' work --------------------------------------------------------------------

    def _store_probed(self, state: StoreState) -> None:
        """The object store's state, from the start-up probe or the probe task: kept for /health,
        the metric, and (once they run) the workers."""
        self.store_state = state
        self.metrics.object_store_up.labels("s3").set(1 if state.reachable else 0)
        if self.supervisor is not None:   # the workers answer /health and status too
            self.supervisor.tell({"t": "object-store", "state": msgspec.to_builtins(state)})

    def _sampler(self) -> Sampler:
        assert self.operations is not None and self.identity is not None
        https = self.config.https
        api = None if https.insecure_http else (https.cert or self.pki.api_cert)
        # The blob volume's free space means something only where blobs are local files.
        blob_dir = Path(self.identity.storage_dir) if getattr(self.storage, "name", "") == "filesystem" else None
        return Sampler(self.metrics, self.operations, self.client,
                       Certificates(api=api, etcd_node=self.pki.node_cert, ca=self.pki.ca_cert),
                       self.data_dir, blob_dir)

    async def _heartbeat(self) -> None:
        await replicas.heartbeat(self.client, self._record)
        self._removed()  # the heartbeat ends only when our record was deleted
