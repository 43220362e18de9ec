"""The admin API's backup endpoints (routes for AdminApi), used by `moorage backup`.

    GET /_admin/backup/snapshot            a consistent etcd snapshot, streamed, with
                                           X-Moorage-Snapshot-Sha256, X-Moorage-Revision,
                                           X-Moorage-Etcd-Version, X-Moorage-Replica,
                                           X-Moorage-Cluster-Token and Content-Length
    GET /_admin/backup/info?revision=N&through=M
                                           {replica, cluster_token, moorage_version, ca_cert,
                                           ca_key, blobs: [{digest, size}]}: the blobs at
                                           revision N and at M; a snapshot taken between
                                           the two knows no others
    GET /_admin/backup/blobs/<digest>      one blob's bytes (Range-free, whole)

The snapshot is spooled to an anonymous file in the replica's data directory
first, so its size and hash go out in the headers: the CLI checks both as it
writes, without a trailer. Blobs go through the API one at a time, so the
machine running the backup needs no access to the blob storage.

The answers carry the CA key and every password hash: AdminApi lets only a
cluster admin in, as it does for `join`, which hands out the same CA.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from moorage.api.blobfile import blob_response, send_mapped
from moorage.api.routes import ADMIN, Route, route
from moorage.cluster.operations import ClusterError, ClusterOperations
from moorage.registry.errors import BlobUnknown
from moorage.registry.repositories import Repositories

_DIGEST = r"((?:sha256:[0-9a-f]{64})|(?:sha384:[0-9a-f]{96})|(?:sha512:[0-9a-f]{128}))"


def backup_routes(cluster: ClusterOperations, repositories: Repositories | None) -> list[Route]:
    c = cluster

    async def snapshot(request: web.BaseRequest, body: Any) -> web.StreamResponse:
        snap = await c.snapshot()
        try:
            response = web.StreamResponse(headers={
                "Content-Type": "application/octet-stream",
                "X-Moorage-Snapshot-Sha256": snap.sha256,
                "X-Moorage-Revision": str(snap.revision),
                "X-Moorage-Revision-After": str(snap.revision_after),
                "X-Moorage-Etcd-Version": snap.etcd_version,
                "X-Moorage-Replica": c.replica_id,
                "X-Moorage-Cluster-Token": c.cluster_token,
                "Cache-Control": "no-store",
            })
            response.content_length = snap.size
            writer = await response.prepare(request)
            assert writer is not None
            if snap.size:
                await send_mapped(writer, snap.file.fileno(), 0, snap.size)
            await response.write_eof()
            return response
        finally:
            snap.file.close()

    async def info(request: web.BaseRequest, body: Any) -> dict[str, Any]:
        try:
            revision = int(request.query.get("revision", "0"))
            through = int(request.query.get("through", str(revision)))
        except ValueError:
            revision = through = -1
        return await c.backup_info(revision, through)

    async def blob(request: web.BaseRequest, body: Any, digest: str) -> web.StreamResponse:
        assert repositories is not None  # listed without one only to be documented (tests/test_openapi.py)
        try:
            found = await repositories.blob_body(digest)
        except BlobUnknown:
            raise ClusterError("unknown", f"blob {digest} is not in the storage (deleted since the snapshot?)") from None
        return blob_response(found, {"Content-Type": "application/octet-stream"})

    return [
        route("GET", r"^/_admin/backup/snapshot$", snapshot, ADMIN),
        route("GET", r"^/_admin/backup/info$", info, ADMIN),
        route("GET", rf"^/_admin/backup/blobs/{_DIGEST}$", blob, ADMIN),
    ]
