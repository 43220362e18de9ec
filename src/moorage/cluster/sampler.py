"""The replica's gauges that nothing else updates as it goes: sampled every few seconds.

The cluster as this replica sees it (the same judgement `moorage status`
prints: replicas healthy and unhealthy, failures tolerated), its etcd
member (database size and quota, leader changes), its disks, and its
certificates' expiry. One replica process samples (with worker processes,
the parent): these gauges are the replica's, not a process's.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from moorage.cluster import pki
from moorage.cluster.operations import ClusterError, ClusterOperations
from moorage.meta.etcd import EtcdClient, EtcdUnavailable
from moorage.metrics import Metrics

log = logging.getLogger(__name__)

SAMPLE_SECONDS = 5.0
# etcd's own default is 2 GiB; cluster/etcd_member.py starts every member with this.
ETCD_QUOTA_BYTES = 8 << 30


@dataclass
class Certificates:
    """The files whose not-after this replica reports (None: it serves no such certificate)."""

    api: Path | None
    etcd_node: Path
    ca: Path


class Sampler:
    def __init__(self, metrics: Metrics, operations: ClusterOperations, client: EtcdClient,
                 certificates: Certificates, data_dir: Path, blob_dir: Path | None):
        self.metrics = metrics
        self.operations = operations
        self.client = client
        self.certificates = certificates
        self.data_dir = data_dir
        self.blob_dir = blob_dir
        self._leader: int | None = None
        self._voters = 1
        self._cert_mtimes: dict[str, float] = {}
        metrics.etcd_db_quota.set(ETCD_QUOTA_BYTES)

    async def run(self) -> None:
        while True:
            try:
                await self.sample()
            except Exception:  # a gauge left stale would hide what the alerts watch: go on
                log.exception("metrics not sampled; trying again", extra={"retry_seconds": SAMPLE_SECONDS})
            await asyncio.sleep(SAMPLE_SECONDS)

    async def sample(self) -> None:
        await self._cluster()
        await self._etcd()
        await asyncio.to_thread(self._files)

    async def _cluster(self) -> None:
        m = self.metrics
        try:
            status = await self.operations.status()
        except ClusterError as e:
            # No quorum, or etcd away: this replica cannot tell who is healthy, and the cluster
            # tolerates nothing it could vouch for.
            log.debug("cluster status not sampled", extra={"error": e.message})
            m.replicas.labels("healthy").set(0)
            m.replicas.labels("unhealthy").set(self._voters)
            m.failures_tolerated.set(0)
            return
        self._voters = status["voters"]
        healthy = status["healthy"]
        m.replicas.labels("healthy").set(healthy)
        m.replicas.labels("unhealthy").set(max(len(status["replicas"]) - healthy, 0))
        m.failures_tolerated.set(status["tolerates"])
        m.failures_tolerated_when_healthy.set(status["tolerates_when_healthy"])

    async def _etcd(self) -> None:
        try:
            status = await self.client.status()
        except EtcdUnavailable:
            return
        self.metrics.etcd_db_size.set(status.dbSize)
        if status.leader and self._leader is not None and status.leader != self._leader:
            self.metrics.etcd_leader_changes.inc()
        if status.leader:
            self._leader = status.leader

    def _files(self) -> None:
        m = self.metrics
        for volume, path in (("data", self.data_dir), ("blobs", self.blob_dir)):
            if path is None:
                continue
            try:
                st = os.statvfs(path)
            except OSError:
                continue
            m.storage_free.labels(volume).set(st.f_bavail * st.f_frsize)
            m.storage_size.labels(volume).set(st.f_blocks * st.f_frsize)
        for name, path in (("api", self.certificates.api), ("etcd_node", self.certificates.etcd_node),
                           ("ca", self.certificates.ca)):
            if path is None:
                continue
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue
            if self._cert_mtimes.get(name) != mtime:  # issued anew (a restart renews leaves)
                expiry = pki.not_after(path)
                if expiry is not None:
                    m.certificate_expiry.labels(name).set(expiry)
                    self._cert_mtimes[name] = mtime
