"""Whether this replica reaches a majority of the cluster: a linearizable read every second.

Without a successful read for QUORUM_GRACE_SECONDS the replica reports itself
unhealthy and refuses writes at once, instead of letting them time out. With
worker processes the parent probes and writes the last success into the
shared block (cluster/shared.py), and each worker reads it from there: the
same clock in every process, and one probe per replica.
"""

from __future__ import annotations

import asyncio
import logging
import time

from moorage.cluster.shared import Shared
from moorage.meta.etcd import EtcdClient, EtcdUnavailable
from moorage.meta.index import Index
from moorage.metrics import Metrics

log = logging.getLogger(__name__)

QUORUM_PROBE_SECONDS = 1.0
# Without a successful linearizable read for this long, the replica reports
# itself unhealthy and refuses writes at once instead of letting them time out.
QUORUM_GRACE_SECONDS = 3.0


class Quorum:
    """The quorum probe's last success; `in_worker`: read it from the parent's shared block."""

    def __init__(self, metrics: Metrics, in_worker: bool = False):
        self.metrics = metrics
        self.in_worker = in_worker
        self.shared: Shared | None = None   # with workers: set once the block exists
        self._ok_at = 0.0

    def writable(self) -> tuple[bool, str]:
        # A worker reads its parent's probe from the shared block: the same clock in every process.
        ok_at = self.shared.quorum_ok_at if self.in_worker and self.shared is not None \
            else self.ok_at
        if time.monotonic() - ok_at > QUORUM_GRACE_SECONDS:
            return False, "no etcd quorum: this replica cannot reach a majority of the cluster"
        return True, ""

    @property
    def ok_at(self) -> float:
        return self._ok_at

    @ok_at.setter
    def ok_at(self, value: float) -> None:
        self._ok_at = value
        if self.shared is not None and not self.in_worker:
            self.shared.quorum_ok_at = value  # what the workers' writable() reads

    async def probe(self, client: EtcdClient, index: Index) -> None:
        """The probe's loop, until cancelled: the parent's (or a lone replica's) task."""
        m = self.metrics
        writable, failure, refused_at = True, "", 0.0
        while True:
            try:
                revision = await asyncio.wait_for(client.revision(), QUORUM_PROBE_SECONDS)
                self.ok_at = time.monotonic()
                m.index_lag.set(max(revision - index.applied, 0))
            except EtcdUnavailable as e:
                failure = str(e)
            except asyncio.TimeoutError:
                failure = f"no answer in {QUORUM_PROBE_SECONDS:g}s"
            now_writable = self.writable()[0]
            m.quorum.set(1 if now_writable else 0)
            # Said once each way: an operator who sees 503s finds when they began and why.
            if writable and not now_writable:
                refused_at = time.monotonic()
                log.warning("writes refused: etcd has not answered a linearizable read for "
                            f"{QUORUM_GRACE_SECONDS:g}s", extra={"error": failure})
            elif now_writable and not writable:
                log.info("writes accepted again", extra={"refused_seconds": round(time.monotonic() - refused_at, 1)})
            writable = now_writable
            await asyncio.sleep(QUORUM_PROBE_SECONDS)
