"""`moorage serve`: run one replica in the foreground until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import signal
import socket
import time
from pathlib import Path

import msgspec
from aiohttp import web

from moorage import __version__, logs
from moorage.api.app import create_server
from moorage.cli.main import CliError
from moorage.cluster.etcd_member import EtcdError, EtcdMember
from moorage.cluster.identity import Identity, load_or_create
from moorage.cluster.membership import track_solo
from moorage.meta.etcd import EtcdClient, EtcdUnavailable
from moorage.meta.index import Index
from moorage.meta.store import MetaStore
from moorage.registry.service import Registry
from moorage.registry.sessions import STATE_SECONDS, Sessions
from moorage.registry.uploads import Uploads
from moorage.storage.filesystem import FilesystemDriver

log = logging.getLogger("moorage.serve")

DRAIN_SECONDS = 30.0


def register(commands) -> None:
    p = commands.add_parser("serve", help="run a replica in the foreground",
                            description="Run a Moorage replica in the foreground. The first start creates "
                                        "a cluster of one; later starts reuse DATA_DIR.")
    p.add_argument("--data-dir", type=Path, default=Path("./moorage-data"),
                   help="where this replica keeps its identity and etcd data (default: ./moorage-data)")
    p.add_argument("--listen", default="127.0.0.1:5000", help="HOST:PORT to serve on (default: 127.0.0.1:5000)")
    p.add_argument("--etcd-client-port", type=int, default=None, help="etcd client port (default: 2379)")
    p.add_argument("--etcd-peer-port", type=int, default=None, help="etcd peer port (default: 2380)")
    p.add_argument("--storage-dir", type=Path, default=None,
                   help="blob storage directory, shared by all replicas (default: DATA_DIR/blobs)")
    p.set_defaults(run=run)


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise CliError(f"--listen takes HOST:PORT, not {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


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


def run(args: argparse.Namespace) -> int:
    logs.setup(args.log_level)
    host, port = parse_listen(args.listen)
    try:
        return asyncio.run(Replica(args.data_dir, host, port, args).run())
    except EtcdError as e:
        raise CliError(str(e)) from None


class Replica:
    """One replica's process: etcd member, index, registry, HTTP server."""

    def __init__(self, data_dir: Path, host: str, port: int, args: argparse.Namespace):
        self.data_dir = data_dir.resolve()
        self.host, self.port = host, port
        self.args = args
        self.identity: Identity | None = None
        self.index: Index | None = None
        self.started = time.time()

    def ping(self) -> tuple[bool, str]:
        if self.index is None or not self.index.watch_healthy:
            return False, "metadata watch is down: etcd unreachable"
        return True, "serving"

    def health(self) -> dict:
        assert self.identity is not None and self.index is not None
        ok, reason = self.ping()
        return {
            "replica_id": self.identity.replica_id,
            "version": __version__,
            "healthy": ok,
            "reason": reason,
            "metadata_revision": self.index.applied,
            "repositories": len(self.index.repos),
            "blobs": len(self.index.blobs),
            "uptime_seconds": round(time.time() - self.started, 1),
        }

    async def run(self) -> int:
        identity, created = load_or_create(self.data_dir, self.args.storage_dir,
                                           self.args.etcd_client_port, self.args.etcd_peer_port)
        self.identity = identity
        check_ports_free([(self.host, self.port, "the listen address"),
                          ("127.0.0.1", identity.etcd_client_port, "the etcd client port"),
                          ("127.0.0.1", identity.etcd_peer_port, "the etcd peer port")])
        storage = FilesystemDriver(Path(identity.storage_dir))
        member = EtcdMember(
            name=identity.replica_id, data_dir=self.data_dir / "etcd",
            client_port=identity.etcd_client_port, peer_port=identity.etcd_peer_port,
            cluster_token=identity.cluster_token, log_path=self.data_dir / "etcd.log")
        await member.start()
        client = EtcdClient(member.endpoint)
        runner = membership = None
        try:
            self.index = Index(client)
            await self.index.start()
            store = MetaStore(client, self.index, tombstone_seconds=2 * STATE_SECONDS)
            registry = Registry(store, storage)
            uploads = Uploads(registry, Sessions(store, await store.secret("upload-state")))
            membership = asyncio.create_task(track_solo(client, self.index, identity.replica_id))
            debug = logging.getLogger().isEnabledFor(logging.DEBUG)
            server = create_server(registry, uploads, self.health, self.ping,
                                   logging.getLogger("aiohttp.access") if debug else None)
            runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=5.0)
            await runner.setup()
            site = web.TCPSite(runner, self.host, self.port, backlog=1024, reuse_address=True)
            try:
                await site.start()
            except OSError as e:
                reason = "is already in use" if e.errno == errno.EADDRINUSE else f"cannot be used: {e.strerror}"
                raise CliError(f"the listen address {self.host}:{self.port} {reason}") from None
            await self._announce(client)
            log.info("moorage serving", extra={
                "url": f"http://{self.host}:{self.port}", "replica_id": identity.replica_id,
                "new_cluster": created, "storage_dir": identity.storage_dir,
                "data_dir": str(self.data_dir), "pid": os.getpid()})
            await self._wait_for_signal()
            log.info("draining requests in flight", extra={"timeout_seconds": DRAIN_SECONDS})
            await self._drain(runner, server)
        finally:
            if runner is not None:
                await runner.cleanup()
            if membership is not None:
                membership.cancel()
            if self.index is not None:
                await self.index.stop()
            await client.close()
            await member.stop()
        log.info("moorage stopped")
        return 0

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

    async def _announce(self, client: EtcdClient) -> None:
        """Record this replica in etcd, for `status` and the load balancer tooling."""
        assert self.identity is not None
        record = {"id": self.identity.replica_id, "url": f"http://{self.host}:{self.port}",
                  "version": __version__, "started": self.started, "pid": os.getpid()}
        try:
            await client.put(f"/moorage/replica/{self.identity.replica_id}".encode(),
                             msgspec.json.encode(record))
        except EtcdUnavailable as e:
            log.warning("could not record this replica in etcd", extra={"error": str(e)})

    @staticmethod
    async def _wait_for_signal() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
