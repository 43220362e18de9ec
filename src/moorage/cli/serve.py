"""`moorage serve`: run one replica in the foreground until SIGTERM (or removal).

The replica itself is cluster/replica.py's; this command turns flags into
its ReplicaConfig and runs it with the registry on top (api/server.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from moorage import logs
from moorage.api.server import RegistryService
from moorage.cli.errors import CliError
from moorage.cluster.https import HttpsOptions
from moorage.cluster.identity import Identity
from moorage.cluster.replica import Replica, ReplicaConfig


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
    p.add_argument("--tls-cert", type=Path, default=None, metavar="FILE",
                   help="serve the API with this certificate (PEM, may include the chain) instead of "
                        "one from the cluster CA; needs --tls-key")
    p.add_argument("--tls-key", type=Path, default=None, metavar="FILE",
                   help="the private key of --tls-cert (PEM, unencrypted)")
    p.add_argument("--tls-name", action="append", default=[], metavar="NAME",
                   help="another name (DNS name or IP) the API certificate must cover, e.g. the load "
                        "balancer's; repeatable")
    p.add_argument("--insecure-http", action="store_true",
                   help="serve plain HTTP instead of HTTPS; only allowed when --listen is a loopback address")


def register(commands) -> None:
    p = commands.add_parser("serve", help="run a replica in the foreground",
                            description="Run a Moorage replica in the foreground. The first start creates "
                                        "a cluster of one; later starts reuse DATA_DIR.")
    add_replica_options(p)
    p.add_argument("--admin-password-file", type=Path, default=None,
                   help="the admin's password on the first start (else $MOORAGE_ADMIN_PASSWORD, "
                        "else one is generated and printed once)")
    p.set_defaults(run=run)


def https_options(args: argparse.Namespace) -> HttpsOptions:
    return HttpsOptions(args.tls_cert, args.tls_key, tuple(args.tls_name), args.insecure_http)


def replica_config(args: argparse.Namespace) -> ReplicaConfig:
    return ReplicaConfig(data_dir=args.data_dir, listen=args.listen, advertise=args.advertise,
                         etcd_client_port=args.etcd_client_port, etcd_peer_port=args.etcd_peer_port,
                         storage_dir=args.storage_dir, https=https_options(args),
                         admin_password=admin_password(args))


def admin_password(args: argparse.Namespace) -> str | None:
    path = getattr(args, "admin_password_file", None)
    if path is not None:
        try:
            return path.read_text().strip() or None
        except OSError as e:
            raise CliError(f"cannot read --admin-password-file {path}: {e.strerror}") from None
    return os.environ.get("MOORAGE_ADMIN_PASSWORD") or None


def say(message: str) -> None:
    """What the person who started the replica must see once (a CA fingerprint, a generated password)."""
    print(f"moorage: {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    logs.setup(args.log_level)
    return run_replica(replica_config(args))


def run_replica(config: ReplicaConfig, promote: Callable[[int], Awaitable[bool]] | None = None,
                on_serving: Callable[[Identity], Awaitable[None]] | None = None) -> int:
    """A replica with the registry on top, in the foreground until it stops."""
    return asyncio.run(Replica(config, RegistryService.build, promote=promote, on_serving=on_serving,
                               announce=say).run())
