"""`moorage serve`: run one replica in the foreground until SIGTERM (or removal).

The replica itself is cluster/replica.py's; this command turns flags into
its ReplicaConfig and runs it with the registry on top (api/server.py).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from moorage import logs
from moorage.api.server import RegistryService
from moorage.cli.errors import CliError
from moorage.cluster.https import HttpsOptions
from moorage.cluster.identity import Identity
from moorage.cluster.replica import Replica
from moorage.cluster.replica_config import ReplicaConfig
from moorage.cluster.workers import WorkerStart, default_workers


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
    add_storage_options(p)
    p.add_argument("--tls-cert", type=Path, default=None, metavar="FILE",
                   help="serve the API with this certificate (PEM, may include the chain) instead of "
                        "one from the cluster CA; needs --tls-key")
    p.add_argument("--tls-key", type=Path, default=None, metavar="FILE",
                   help="the private key of --tls-cert (PEM, unencrypted)")
    p.add_argument("--tls-name", action="append", default=[], metavar="NAME",
                   help="another name (DNS name or IP) the API certificate must cover, e.g. the load "
                        "balancer's; repeatable")
    p.add_argument("--workers", type=_workers, default=default_workers(), metavar="N",
                   help="processes serving HTTP, each on its own core; the replica's own process runs etcd "
                        f"and the background duties (default: the machine's cores, at most 8: {default_workers()} "
                        "here; 1 keeps everything in one process)")
    p.add_argument("--insecure-http", action="store_true",
                   help="serve plain HTTP instead of HTTPS; only allowed when --listen is a loopback address")
    p.add_argument("--metrics-listen", default=None, metavar="HOST:PORT",
                   help="also serve /metrics here, over plain HTTP and without authentication (for a "
                        "private monitoring network; the API port serves it behind the metrics token)")


def add_storage_options(p: argparse.ArgumentParser, redirect: bool = True) -> None:
    """--storage and the object store's --s3-* options (serve, join, restore)."""
    p.add_argument("--storage", default=None, metavar="DIR|s3://BUCKET[/PREFIX]",
                   help="where the cluster keeps its blobs, chosen at its first start: a directory every "
                        "replica mounts (as --storage-dir), or a bucket of an S3-compatible object store "
                        "(credentials from the AWS chain: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, the shared "
                        "credentials file, AWS_PROFILE)")
    p.add_argument("--s3-endpoint", default=None, metavar="URL",
                   help="the object store's URL (default: AWS S3 itself)")
    p.add_argument("--s3-region", default=None, metavar="REGION", help="the bucket's region (default: from "
                   "the AWS configuration, else us-east-1)")
    p.add_argument("--s3-ca-cert", default=None, type=Path, metavar="FILE",
                   help="a CA certificate (PEM) to trust for the object store's HTTPS")
    p.add_argument("--s3-path-style", action="store_true",
                   help="address the bucket in the path (URL/BUCKET/KEY), as MinIO and SeaweedFS expect")
    if redirect:
        p.add_argument("--s3-redirect", type=_boolean, default=True, metavar="true|false",
                       help="answer blob GETs with a redirect to a short-lived presigned URL (default: true); "
                            "false streams them through the replica (the cluster setting storage.redirect)")


def register(commands) -> None:
    p = commands.add_parser("serve", help="run a replica in the foreground",
                            description="Run a Moorage replica in the foreground. The first start creates "
                                        "a cluster of one; later starts reuse DATA_DIR.")
    add_replica_options(p)
    p.add_argument("--admin-password-file", type=Path, default=None,
                   help="the admin's password on the first start (else $MOORAGE_ADMIN_PASSWORD, "
                        "else one is generated and printed once)")
    p.set_defaults(run=run)


def _workers(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 64:
        raise argparse.ArgumentTypeError(f"--workers takes a number from 1 to 64, not {value!r}")
    return int(value)


def https_options(args: argparse.Namespace) -> HttpsOptions:
    return HttpsOptions(args.tls_cert, args.tls_key, tuple(args.tls_name), args.insecure_http)


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false", "yes", "no", "on", "off", "1", "0"):
        raise argparse.ArgumentTypeError(f"takes true or false, not {text!r}")
    return value in ("true", "yes", "on", "1")


def storage_choice(args: argparse.Namespace) -> tuple[Path | None, str | None, dict | None]:
    """(directory, s3://..., the object store's options) from --storage, --storage-dir and --s3-*."""
    storage, storage_dir = args.storage, args.storage_dir
    s3_flags = [f for f, v in (("--s3-endpoint", args.s3_endpoint), ("--s3-region", args.s3_region),
                               ("--s3-ca-cert", args.s3_ca_cert), ("--s3-path-style", args.s3_path_style),
                               ("--s3-redirect=false", not getattr(args, "s3_redirect", True))) if v]
    if storage is not None and storage_dir is not None:
        raise CliError("give the blob storage once: --storage or --storage-dir")
    if storage is None or not storage.startswith("s3://"):
        if s3_flags:
            raise CliError(f"{s3_flags[0]} is for an object store: add --storage s3://BUCKET[/PREFIX]")
        return (Path(storage) if storage is not None else storage_dir), None, None
    options = {"endpoint": args.s3_endpoint, "region": args.s3_region, "path_style": args.s3_path_style,
               "ca_cert": str(args.s3_ca_cert) if args.s3_ca_cert else None}
    return None, storage, {k: v for k, v in options.items() if v not in (None, False)}


def replica_config(args: argparse.Namespace) -> ReplicaConfig:
    storage_dir, object_store, s3 = storage_choice(args)
    return ReplicaConfig(data_dir=args.data_dir, listen=args.listen, advertise=args.advertise,
                         etcd_client_port=args.etcd_client_port, etcd_peer_port=args.etcd_peer_port,
                         storage_dir=storage_dir, object_store=object_store, s3=s3,
                         s3_redirect=args.s3_redirect, https=https_options(args),
                         admin_password=admin_password(args), workers=args.workers,
                         metrics_listen=args.metrics_listen)


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
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
    return asyncio.run(Replica(config, RegistryService.build, promote=promote, on_serving=on_serving,
                               announce=say, worker_main=functools.partial(run_worker, level)).run())


def run_worker(level: str, start: WorkerStart) -> None:
    """A worker process of a replica (cluster/workers.py): the registry's HTTP API on the
    connections its parent hands it, until SIGTERM or the parent's end."""
    logs.setup(level)
    config = start.options
    try:
        asyncio.run(Replica(config, RegistryService.build, worker=start).run())
    except KeyboardInterrupt:  # a Ctrl-C reaches the whole process group; the parent stops us
        pass
