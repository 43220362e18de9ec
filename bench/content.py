"""What the bench pushes and asks for: digests, media types, small images, the big blob.

Nothing here talks to a server; the HTTP side is in load.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
# What containerd's resolver (docker, nerdctl) sends on a pull. Without an Accept
# naming OCI, distribution answers 404 for an OCI manifest, and a server could
# skip content negotiation entirely: the manifest scenario must pay for it.
ACCEPT = ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    OCI_MANIFEST,
    "application/vnd.oci.image.index.v1+json",
    "*/*",
])


# --------------------------------------------------------------------------
# OCI content (copied from tests/oci.py: too small to be worth an import of httpx)

def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def descriptor(media_type: str, data: bytes) -> dict:
    return {"mediaType": media_type, "digest": sha256(data), "size": len(data)}


@dataclass
class Image:
    """A small image: blobs (config first) and the manifest that names them."""

    blobs: list[bytes]
    manifest: bytes

    @classmethod
    def random(cls, n_layers: int, min_size: int = 1024, max_size: int = 4096) -> "Image":
        layers = [os.urandom(random.randint(min_size, max_size)) for _ in range(n_layers)]
        config = canonical({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha256(x) for x in layers]},
        })
        manifest = canonical({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": descriptor(OCI_CONFIG, config),
            "layers": [descriptor(OCI_LAYER, x) for x in layers],
        })
        return cls([config, *layers], manifest)


# --------------------------------------------------------------------------
# The big blob: pushed by the push scenarios, seeded for the pull scenarios

class SourceFile:
    """The big blob on disk, streamed with sendfile so the client costs little CPU.

    Each push rewrites its first bytes, so every push is a blob the registry has
    never seen (no deduplication shortcut) at the cost of one sha256 pass.
    """

    def __init__(self, path: Path, size: int) -> None:
        self.path, self.size = path, size
        with open(path, "wb") as f:
            for _ in range(0, size, 8 * MiB):
                f.write(os.urandom(min(8 * MiB, size - f.tell())))
        self.digest = self._hash()

    def refresh(self) -> str:
        """Make the content new; returns its digest."""
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, os.urandom(32), 0)
        finally:
            os.close(fd)
        self.digest = self._hash()
        return self.digest

    def _hash(self) -> str:
        with open(self.path, "rb") as f:
            return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()

