"""This replica's identity and settings that must survive restarts.

Kept in DATA_DIR/replica.json: the first start writes it, later starts read
it, so `moorage serve --data-dir DIR` alone brings the same replica back.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

FILE = "replica.json"


@dataclass
class Identity:
    replica_id: str
    cluster_token: str
    created: float
    # The blob storage: a directory, or s3://BUCKET[/PREFIX] with `s3`'s options
    # (storage/drivers.py: endpoint, region, CA file, path-style; never a secret).
    storage_dir: str
    etcd_client_port: int
    etcd_peer_port: int
    # The address this replica last advertised: `serve` and `join` compute it
    # from their flags at every start (cluster/addresses.py) and save it here
    # for the commands that run without them (emergency-repair).
    advertise: str
    # Set by `join` for the first start only: how to reach the existing members.
    initial_cluster: str | None = None
    member_id: int | None = None
    s3: dict | None = None

    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(6)  # 12 hex digits

    @classmethod
    def load(cls, data_dir: Path) -> "Identity | None":
        path = data_dir / FILE
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))

    def save(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = data_dir / (FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, data_dir / FILE)


def load_or_create(data_dir: Path, storage_dir: Path | None, client_port: int | None,
                   peer_port: int | None, advertise: str,
                   object_store: tuple[str, dict] | None = None) -> tuple[Identity, bool]:
    """The replica's identity; flags given on this start override what was saved, and the
    advertised address is always this start's (a saved one may be an old version's loopback).
    `object_store` is (s3://..., options) on a first start that keeps blobs there (the caller
    has checked a later start names the same one)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    found = Identity.load(data_dir)
    created = found is None
    if found is None:
        replica_id = Identity.new_id()
        found = Identity(
            replica_id=replica_id, cluster_token=f"moorage-{replica_id}", created=time.time(),
            storage_dir=object_store[0] if object_store else str((storage_dir or data_dir / "blobs").resolve()),
            etcd_client_port=client_port or 2379, etcd_peer_port=peer_port or 2380,
            advertise=advertise, s3=object_store[1] if object_store else None)
    else:
        found.advertise = advertise
        if object_store is not None:
            found.s3 = object_store[1]
        if storage_dir is not None:
            found.storage_dir = str(storage_dir.resolve())
        if client_port is not None:
            found.etcd_client_port = client_port
        if peer_port is not None:
            found.etcd_peer_port = peer_port
    found.save(data_dir)
    return found, created
