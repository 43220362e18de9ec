"""A replica's blob storage: which it is, checked at each start, proved before it serves, told to joiners.

A cluster chooses its storage at its first start (a directory every replica
mounts, or an object store) and a joining replica learns it; this module
holds a start's options to what the data directory says was chosen, opens
and probes the storage, and says what a joining replica must learn of it.
The replica (cluster/replica.py) calls it; the drivers themselves are
storage/'s.
"""

from __future__ import annotations

import time
from pathlib import Path

from moorage.cluster.identity import Identity
from moorage.cluster.replica_config import ReplicaConfig, StartError
from moorage.cluster.store_probe import StoreState
from moorage.storage.base import BlobDriver
from moorage.storage.drivers import describe, is_object_store, s3_config
from moorage.storage.errors import StorageError

# The object store's CA (--s3-ca-cert, or the one a joining replica received), kept in DATA_DIR.
S3_CA_FILE = "s3-ca.crt"


def object_store(config: ReplicaConfig, data_dir: Path) -> tuple[str, dict] | None:
    """(s3://..., options) this start keeps blobs in, checked against what the data directory
    says: a cluster chooses its storage at its first start (a joining replica learns it)."""
    saved = Identity.load(data_dir)
    saved_location = None if saved is None else saved.storage_dir
    if config.object_store is None:
        if saved is not None and is_object_store(saved.storage_dir) and config.storage_dir is not None:
            raise StartError(f"this replica keeps its blobs in {describe(saved.storage_dir, saved.s3)}, "
                             "not in a directory: drop --storage-dir")
        return None
    options = dict(config.s3 or {})
    endpoint = options.get("endpoint")
    if saved is not None and (saved_location != config.object_store
                              or (saved.s3 or {}).get("endpoint") != endpoint):
        raise StartError(f"this replica's cluster keeps its blobs in {describe(saved_location, saved.s3)}, "
                         f"not {describe(config.object_store, options)}: the storage is chosen at the "
                         "cluster's first start")
    if options.get("ca_cert"):
        # Kept in the data directory: the option names a file that may not outlive this start.
        copy = data_dir / S3_CA_FILE
        try:
            pem = Path(options["ca_cert"]).read_bytes()
        except OSError as e:
            raise StartError(f"cannot read --s3-ca-cert {options['ca_cert']}: {e.strerror}") from None
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(pem)
        options["ca_cert"] = str(copy)
    elif saved is not None and saved.s3 and saved.s3.get("ca_cert"):
        options["ca_cert"] = saved.s3["ca_cert"]
    try:
        s3_config(config.object_store, options)
    except StorageError as e:
        raise StartError(str(e)) from None
    return config.object_store, options


def shared_directory(identity: Identity) -> Path | None:
    """The directory every replica mounts (where the audit log lives beside the blobs), or
    None when the blobs are in an object store."""
    return None if is_object_store(identity.storage_dir) else Path(identity.storage_dir)


def storage_spec(identity: Identity) -> dict | None:
    """What a joining replica learns of the cluster's object store (None: a directory, which
    each replica names itself): the location and its options, the CA as text; no secret."""
    if not is_object_store(identity.storage_dir):
        return None
    options = dict(identity.s3 or {})
    ca = options.pop("ca_cert", None)
    return {"location": identity.storage_dir, "options": options,
            "ca_pem": Path(ca).read_text() if ca else None}


async def open_storage(storage: BlobDriver, identity: Identity) -> None:
    """Open the blob storage and prove it works (an object store: write, read back, delete)
    before anything else: a replica that cannot keep blobs must not serve."""
    try:
        await storage.open()
        await storage.probe()
    except StorageError as e:
        raise StartError(f"cannot use the blob storage {describe(identity.storage_dir, identity.s3)}: "
                         f"{e}") from None


def store_opened(identity: Identity) -> StoreState | None:
    """The object store's state once it was opened: it answered the start-up probe (a worker's
    parent's), and the probe task goes on from there."""
    if not is_object_store(identity.storage_dir):
        return None
    now = time.time()
    return StoreState(describe(identity.storage_dir, identity.s3), True, now, now)
