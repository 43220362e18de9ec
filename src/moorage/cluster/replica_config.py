"""What a replica is made from: its options, the service on top of it, and the error a start raises.

`moorage serve` and `moorage join` (cli/) parse flags into a ReplicaConfig;
the layers above hand in the Service; and every step of a start that cannot
go on as configured raises StartError, which the command prints as one
sentence. They are apart from cluster/replica.py so that what checks the
options (cluster/blob_storage.py, cluster/membership.py) needs no replica.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from moorage.cluster import https


class StartError(Exception):
    """A replica that cannot start as configured; the message is one sentence."""


@dataclass(frozen=True)
class ReplicaConfig:
    data_dir: Path
    listen: str = "127.0.0.1:5000"          # HOST:PORT of the API
    advertise: str | None = None            # None: the listen host (cluster/addresses.py)
    etcd_client_port: int | None = None     # None: as saved, else 2379
    etcd_peer_port: int | None = None       # None: as saved, else 2380
    storage_dir: Path | None = None         # None: as saved, else DATA_DIR/blobs
    # An object store instead (the first start chooses for the cluster): s3://BUCKET[/PREFIX], its
    # options (storage/drivers.py: endpoint, region, ca_cert, path_style) and whether blob GETs
    # redirect to it (the cluster setting storage.redirect, written at the first start).
    object_store: str | None = None
    s3: dict | None = None
    s3_redirect: bool = True
    https: https.HttpsOptions = field(default_factory=https.HttpsOptions)
    admin_password: str | None = None       # the admin's on the first start; None: a generated one
    workers: int = 1                        # processes serving HTTP (1: this one, as it always was)
    metrics_listen: str | None = None       # HOST:PORT serving /metrics without authentication


class Service(Protocol):
    """What serves on top of a replica: the registry and its HTTP API (api/server.py)."""

    async def start(self) -> None:
        """Serve: listen on the replica's API address."""

    async def stop(self) -> None:
        """Stop listening, let requests in flight finish (within a bound), and close."""

    async def collect_garbage(self) -> None:
        """Garbage collection when `gc.schedule` says one is due: runs until the replica stops."""

    async def write_audit(self) -> None:
        """The audit log's writer: runs until stop()."""

    async def from_worker(self, message: dict) -> Any:
        """In a parent: a worker's message (an audit event, a login's slowdown); a call's answer."""

    async def from_parent(self, message: dict) -> Any:
        """In a worker: the parent's message; a call's answer."""

    async def deliver_events(self) -> None:
        """Webhook delivery: takes and delivers the endpoints' queues no live replica holds."""

    async def flush_pull_events(self) -> None:
        """The pull events this process buffered, written to etcd once a second."""
