"""The limits a push is held to: one object the registry and the uploads share.

The cluster settings `upload.max_blob_bytes` and `upload.max_manifest_bytes`
change it in place as the replica applies them, so a new limit holds
for the next request on every replica, without a restart.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Limits:
    max_manifest_bytes: int = 4 << 20
    max_blob_bytes: int = 1 << 40
    max_page: int = 10_000
