"""`moorage serve`: run one replica in the foreground until SIGTERM (or removal)."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from moorage import __version__, logs
from moorage.api.admin import AdminApi
from moorage.api.app import create_server
from moorage.api.auth import Auth
from moorage.api.proxy_protocol import ApiSite
from moorage.api.audit import RequestAudit
from moorage.cli import tls
from moorage.cli.main import CliError
from moorage.cluster import addresses, endpoint, membership, pki, replicas
from moorage.cluster.clock import ClusterClock
from moorage.cluster.etcd_member import EtcdError, EtcdMember, node_tls
from moorage.cluster.identity import Identity, load_or_create
from moorage.cluster.membership import track_solo
from moorage.cluster.service import ClusterService
from moorage.cluster.settings import SETTINGS, ClusterSettings, Network, parse_networks
from moorage.meta import keys
from moorage.meta.etcd import EtcdClient, EtcdUnavailable, Event
from moorage.meta.gc_store import GcStore
from moorage.meta.index import Index
from moorage.meta.store import MetaStore
from moorage.registry.audit import AuditLog
from moorage.registry.gc_runner import GcRunner
from moorage.registry.limits import Limits
from moorage.registry.placement import Placement
from moorage.registry.service import Registry
from moorage.registry.sessions import STATE_SECONDS, Sessions
from moorage.registry.tokens import Tokens
from moorage.registry.uploads import Uploads
from moorage.registry.access import Access
from moorage.registry.users import Users
from moorage.storage.drivers import storage_at

log = logging.getLogger("moorage.serve")

DRAIN_SECONDS = 30.0
QUORUM_PROBE_SECONDS = 1.0
# Without a successful linearizable read for this long, the replica reports
# itself unhealthy and refuses writes at once instead of letting them time out.
QUORUM_GRACE_SECONDS = 3.0
PROMOTE_SECONDS = 120.0
# A member that just started may be refused a membership change for a few seconds.
MOVE_SECONDS = 30.0


def add_replica_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=Path("./moorage-data"),
                   help="where this replica keeps its identity and etcd data (default: ./moorage-data)")
    p.add_argument("--listen", default="127.0.0.1:5000", help="HOST:PORT to serve on (default: 127.0.0.1:5000)")
    p.add_argument("--advertise", default=None, metavar="IP",
                   help="address other replicas and clients reach this one at; etcd binds its ports to it "
                        "(default: the listen host; with --listen 0.0.0.0 or [::], this host's one routable "
                        "address, else pass it)")
    p.add_argument("--etcd-client-port", type=int, default=None, help="etcd client port (default: 2379)")
    p.add_argument("--etcd-peer-port", type=int, default=None, help="etcd peer port (default: 2380)")
    p.add_argument("--storage-dir", type=Path, default=None,
                   help="blob storage directory, shared by all replicas (default: DATA_DIR/blobs)")
    tls.add_options(p)


def register(commands) -> None:
    p = commands.add_parser("serve", help="run a replica in the foreground",
                            description="Run a Moorage replica in the foreground. The first start creates "
                                        "a cluster of one; later starts reuse DATA_DIR.")
    add_replica_options(p)
    p.add_argument("--admin-password-file", type=Path, default=None,
                   help="the admin's password on the first start (else $MOORAGE_ADMIN_PASSWORD, "
                        "else one is generated and printed once)")
    p.set_defaults(run=run)


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise CliError(f"--listen takes HOST:PORT, not {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def advertise_of(listen_host: str, args: argparse.Namespace) -> addresses.Advertised:
    """This start's advertised address (cluster/addresses.py), its refusal as one sentence."""
    try:
        return addresses.advertised(listen_host, args.advertise)
    except addresses.AddressError as e:
        raise CliError(str(e)) from None


def check_ports_free(ports: list[tuple[str, int, str]]) -> None:
    """Fail before starting anything if a port we need is taken."""
    for host, port, what in ports:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                reason = "is already in use" if e.errno == errno.EADDRINUSE else f"cannot be used: {e.strerror}"
                raise CliError(f"{what} {host}:{port} {reason}") from None


def admin_password(args: argparse.Namespace) -> str | None:
    path = getattr(args, "admin_password_file", None)
    if path is not None:
        try:
            return path.read_text().strip() or None
        except OSError as e:
            raise CliError(f"cannot read --admin-password-file {path}: {e.strerror}") from None
    return os.environ.get("MOORAGE_ADMIN_PASSWORD") or None


def run(args: argparse.Namespace) -> int:
    logs.setup(args.log_level)
    return run_replica(Replica(args))


def run_replica(replica: "Replica") -> int:
    try:
        return asyncio.run(replica.run())
    except EtcdError as e:
        raise CliError(str(e)) from None


class Replica:
    """One replica's process: etcd member, index, registry, HTTP server.

    `promote` is set by `join`: the first start waits, as a learner, until
    the cluster has promoted this replica's member before serving.
    """

    def __init__(self, args: argparse.Namespace, promote: Callable[[int], Awaitable[bool]] | None = None,
                 on_serving: Callable[[Identity], Awaitable[None]] | None = None):
        self.args = args
        self.data_dir = args.data_dir.resolve()
        self.host, self.port = parse_listen(args.listen)
        tls.check_options(args, self.host)
        self.advertised = advertise_of(self.host, args)
        self.promote = promote
        self.on_serving = on_serving
        self.identity: Identity | None = None
        self.index: Index | None = None
        self.access: Access | None = None  # users, teams, grants, visibility (in memory)
        self.settings = ClusterSettings()
        self.proxy_from: tuple[Network, ...] = ()  # the setting proxy_protocol.from, parsed
        self.started = time.time()
        self.quorum_ok_at = 0.0
        self.stop = asyncio.Event()
        self.removed = False

    # -- health ----------------------------------------------------------------

    def writable(self) -> tuple[bool, str]:
        if time.monotonic() - self.quorum_ok_at > QUORUM_GRACE_SECONDS:
            return False, "no etcd quorum: this replica cannot reach a majority of the cluster"
        return True, ""

    def ping(self) -> tuple[bool, str]:
        if self.index is None or not self.index.watch_healthy:
            return False, "metadata watch is down: etcd unreachable"
        ok, reason = self.writable()
        return (ok, reason) if not ok else (True, "serving")

    def health(self) -> dict:
        assert self.identity is not None and self.index is not None
        ok, reason = self.ping()
        return {
            "replica_id": self.identity.replica_id,
            "version": __version__,
            "healthy": ok,
            "reason": reason,
            "metadata_revision": self.index.applied,
            "config_revision": self.settings.revision,
            "settings": self.settings.values,
            "repositories": len(self.index.repos),
            "blobs": len(self.index.blobs),
            "uptime_seconds": round(time.time() - self.started, 1),
        }

    async def _probe_quorum(self, client: EtcdClient) -> None:
        while True:
            try:
                await asyncio.wait_for(client.revision(), QUORUM_PROBE_SECONDS)
                self.quorum_ok_at = time.monotonic()
            except (EtcdUnavailable, asyncio.TimeoutError):
                pass
            await asyncio.sleep(QUORUM_PROBE_SECONDS)

    # -- settings and removal ----------------------------------------------------

    def _apply_setting(self, limits: Limits, key: str, value) -> None:
        if key == "log.level":
            logging.getLogger().setLevel(value.upper())
        elif key == "upload.max_blob_bytes":
            limits.max_blob_bytes = value
        elif key == "upload.max_manifest_bytes":
            limits.max_manifest_bytes = value
        elif key == "proxy_protocol.from":
            self.proxy_from = parse_networks(value)
        log.info("cluster setting applied", extra={"key": key, "value": value})

    def _replica_event(self, event: Event) -> None:
        assert self.identity is not None
        if event.deleted and event.kv.key == keys.replica(self.identity.replica_id):
            self._removed()

    def _removed(self) -> None:
        if not self.removed:
            self.removed = True
            log.warning("this replica was removed from the cluster; shutting down")
            self.stop.set()

    # -- life ------------------------------------------------------------------

    async def run(self) -> int:
        args = self.args
        if self.advertised.resolved_from is not None:
            log.info("advertising this host's one routable address", extra={
                "advertise": self.advertised.host, "listen": self.advertised.resolved_from})
        identity, created = load_or_create(self.data_dir, args.storage_dir, args.etcd_client_port,
                                           args.etcd_peer_port, self.advertised.host)
        self.identity = identity
        check_ports_free([(self.host, self.port, "the listen address"),
                          (identity.advertise, identity.etcd_client_port, "the etcd client port"),
                          (identity.advertise, identity.etcd_peer_port, "the etcd peer port")])
        # TLS before etcd: the member's certificates come from the cluster CA.
        pki_paths = pki.Paths(self.data_dir)
        tls.ensure_ca(pki_paths, identity.cluster_token, joining=identity.initial_cluster is not None)
        api_ssl = tls.api_context(args, pki_paths, pki.replica_names(
            self.host, self.advertised.host, extra=tuple(args.tls_name)))
        storage = await storage_at(identity.storage_dir).open()
        # etcd's mutual TLS: the node certificate covers the advertised address (peers and the
        # members' client URLs) and loopback; it is reissued when --advertise changes.
        try:
            pki.ensure_node_cert(pki_paths, pki.replica_names(identity.advertise))
        except pki.PkiError as e:
            raise CliError(str(e)) from None
        member = EtcdMember(
            name=identity.replica_id, data_dir=self.data_dir / "etcd", tls=node_tls(self.data_dir),
            host=identity.advertise,
            client_port=identity.etcd_client_port, peer_port=identity.etcd_peer_port,
            cluster_token=identity.cluster_token, log_path=self.data_dir / "etcd.log",
            initial_cluster=identity.initial_cluster, member_id=identity.member_id,
            on_removed=self._removed)
        await member.start()
        client = EtcdClient(member.endpoint, member.tls)
        runner = None
        audit: AuditLog | None = None
        tasks: list[asyncio.Task] = []
        gc: GcRunner | None = None
        try:
            if self.promote is not None and identity.member_id is not None:
                await self._await_promotion(identity.member_id, client)
            else:
                await self._move_member(client, member)
            self.index = Index(client)
            self.index.subscribe(keys.CONFIG, self.settings.apply)
            self.index.subscribe(keys.REPLICA, self._replica_event)
            clock = ClusterClock(identity.replica_id)
            self.index.subscribe(keys.REPLICA, clock.observe)
            store = MetaStore(client, self.index, tombstone_seconds=2 * STATE_SECONDS)
            self.access = Access(store, self.index)  # subscribes: must come before start()
            await self.index.start()
            self.quorum_ok_at = time.monotonic()  # the index just read from etcd
            limits = Limits()
            placement = Placement(store, storage)
            registry = Registry(store, storage, placement, limits)
            for key, value in self.settings.values.items():  # what the index loaded
                if value != SETTINGS[key].default:
                    self._apply_setting(limits, key, value)
            self.settings.on_change(lambda k, v: self._apply_setting(limits, k, v))
            users: Users = self.access.users
            generated = await users.ensure_admin(admin_password(args))
            if generated:
                print(f"moorage: created the user admin with the password {generated} "
                      "(shown once; keep it safe)", file=sys.stderr, flush=True)
            uploads = Uploads(storage, Sessions(store, await store.secret("upload-state")), placement, limits)
            # Every replica signs with the same secret, so each verifies any replica's tokens locally.
            tokens = Tokens(await store.secret("token-signing"),
                            lambda: self.settings["token.lifetime_seconds"], replica=identity.replica_id,
                            offset=clock.offset)
            auth = Auth(self.access, tokens)
            cluster = ClusterService(client, self.index, self.settings, storage,
                                     identity.replica_id, identity.cluster_token, pki_paths=pki_paths,
                                     clock=clock)
            url = f"{'https' if api_ssl else 'http'}://{addresses.url_host(self.advertised.host)}:{self.port}"
            record = replicas.new_record(identity.replica_id, url, member.peer_url, member.client_url)
            for field, (old, new) in replicas.moved(await replicas.record(client, identity.replica_id),
                                                    record).items():
                log.info("this replica's address changed", extra={"field": field, "old": old, "new": new})
            gc = GcRunner(store, GcStore(client), storage, self.settings, identity.replica_id, uploads.sessions, clock)
            tasks = [
                asyncio.create_task(track_solo(client, self.index, identity.replica_id)),
                asyncio.create_task(self._probe_quorum(client)),
                asyncio.create_task(self._heartbeat(client, record)),
                asyncio.create_task(gc.schedule()),
            ]
            debug = logging.getLogger().isEnabledFor(logging.DEBUG)
            # On the shared storage, so any replica can answer for the whole cluster.
            audit = AuditLog(Path(identity.storage_dir), identity.replica_id)
            await audit.start()
            request_audit = RequestAudit(audit)
            server = create_server(registry, uploads, self.health, self.ping,
                                   logging.getLogger("aiohttp.access") if debug else None,
                                   admin=AdminApi(cluster, auth, audit=request_audit, access=self.access, gc=gc,
                                                  registry=registry),
                                   writable=self.writable,
                                   readonly=lambda: self.settings["readonly"], audit=request_audit,
                                   ca_pem=pki_paths.ca_cert.read_bytes(), auth=auth)
            runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=5.0)
            await runner.setup()
            # Also reads the PROXY protocol header from the load balancers that proxy_protocol.from names.
            site = ApiSite(runner, self.host, self.port, ssl_context=api_ssl, backlog=1024,
                           trusted=lambda: self.proxy_from)
            try:
                await site.start()
            except OSError as e:
                reason = "is already in use" if e.errno == errno.EADDRINUSE else f"cannot be used: {e.strerror}"
                raise CliError(f"the listen address {self.host}:{self.port} {reason}") from None
            # For commands run on this node (`moorage status` with no --existing).
            endpoint.save(self.data_dir, endpoint.LocalApi(
                url, str(pki_paths.ca_cert) if api_ssl is not None and args.tls_cert is None else None))
            if identity.initial_cluster is not None:
                identity.initial_cluster = identity.member_id = None  # joined: plain restarts from now on
                identity.save(self.data_dir)
            log.info("moorage serving", extra={
                "url": url, "replica_id": identity.replica_id, "new_cluster": created,
                "storage_dir": identity.storage_dir, "data_dir": str(self.data_dir), "pid": os.getpid()})
            if self.on_serving is not None:
                asyncio.create_task(self.on_serving(identity))
            await self._wait_for_stop()
            log.info("draining requests in flight", extra={"timeout_seconds": DRAIN_SECONDS})
            await self._drain(runner, server)
        finally:
            for task in tasks:
                task.cancel()
            if gc is not None:
                await gc.stop()
            if runner is not None:
                await runner.cleanup()
            if audit is not None:  # after the last request, while the disk is surely still there
                await audit.close()
            if self.index is not None:
                await self.index.stop()
            await client.close()
            await member.stop()
            await storage.close()
        log.info("moorage stopped", extra={"removed": self.removed})
        return 0

    async def _move_member(self, client: EtcdClient, member: EtcdMember) -> None:
        """Bring this replica's etcd member entry to this start's advertised address (a new
        --advertise, or a cluster an old version created advertising loopback)."""
        deadline = time.monotonic() + MOVE_SECONDS
        while True:
            try:
                old = await membership.move_peer_url(client, member.name, member.peer_url)
                break
            except EtcdUnavailable as e:
                if time.monotonic() > deadline:
                    raise CliError(f"this replica's etcd member could not change its peer URL to "
                                   f"{member.peer_url} ({e}); start it again with the --advertise it had, "
                                   "or see DATA_DIR/etcd.log") from None
                await asyncio.sleep(0.5)
        if old is not None:
            log.info("this replica's address changed", extra={"field": "etcd peer_url", "old": old,
                                                               "new": member.peer_url})

    async def _await_promotion(self, member_id: int, client: EtcdClient) -> None:
        """As a new learner: ask the cluster to promote us until it has caught us up,
        then wait until our own member knows it votes (it learns a moment later,
        and until then refuses the reads the index needs)."""
        assert self.promote is not None
        deadline = time.monotonic() + PROMOTE_SECONDS
        delay = 0.2
        while not await self.promote(member_id):
            if time.monotonic() > deadline:
                raise CliError(f"this replica's etcd member did not catch up within {PROMOTE_SECONDS:.0f}s; "
                               "see DATA_DIR/etcd.log")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        while True:
            try:
                if not (await client.status()).isLearner:
                    return
            except EtcdUnavailable:
                pass
            if time.monotonic() > deadline:
                raise CliError("this replica's etcd member was promoted but still acts as a learner; "
                               "see DATA_DIR/etcd.log")
            await asyncio.sleep(0.1)

    async def _heartbeat(self, client: EtcdClient, record: replicas.ReplicaRecord) -> None:
        await replicas.heartbeat(client, record)
        self._removed()  # the heartbeat ends only when our record was deleted

    async def _wait_for_stop(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        await self.stop.wait()

    @staticmethod
    async def _drain(runner: web.ServerRunner, server: web.Server) -> None:
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
                getattr(conn, "_request_in_progress", False) for conn in server.connections):
            await asyncio.sleep(0.05)
