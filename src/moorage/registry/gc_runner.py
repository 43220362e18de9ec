"""Running garbage collection on a cluster (registry/gc.py collects): the lock, the schedule, the run records.

Any replica may run a collection (an admin asks, or `gc.schedule` says one
is due); the etcd lock makes it the only one. The lock's lease is renewed
while the run goes; if this replica dies, the lease expires within LOCK_TTL
seconds, its markers go with it, and the next run (anywhere) marks the dead
run "abandoned" and does the work again from a fresh mark.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

import msgspec

from moorage.cluster.clock import ClusterClock
from moorage.cluster.operations import ClusterError
from moorage.cluster.settings import ClusterSettings, duration_seconds
from moorage.meta.errors import MetadataUnavailable
from moorage.meta.gc_store import GcRun, GcStore, new_run_id, watch_runs
from moorage.meta.store import MetaStore
from moorage.metrics import Metrics
from moorage.registry.gc import Collector, Policy
from moorage.registry.sessions import Sessions
from moorage.registry.webhooks import Notifier
from moorage.storage.base import BlobDriver

log = logging.getLogger(__name__)

LOCK_TTL = 10
SCHEDULE_CHECK_SECONDS = 30.0


def summary(run: GcRun) -> dict:
    return msgspec.to_builtins(run)


class GcRunner:
    def __init__(self, meta: MetaStore, gcs: GcStore, storage: BlobDriver, settings: ClusterSettings,
                 replica_id: str, sessions: Sessions | None = None, clock: ClusterClock | None = None,
                 metrics: Metrics | None = None, notifier: Notifier | None = None):
        self.meta = meta
        self.metrics = metrics
        self.notifier = notifier  # a finished run's webhook event goes with its record
        self.clock = clock
        self.gcs = gcs
        self.storage = storage
        self.settings = settings
        self.replica_id = replica_id
        self.sessions = sessions
        self._tasks: set[asyncio.Task] = set()
        self._wake = asyncio.Event()   # a new gc.schedule applies now, not after the old wait
        settings.on_change(lambda key, _: self._wake.set() if key == "gc.schedule" else None)
        self._last_success = 0.0
        if metrics is not None:
            # The cluster's last success, whichever replica ran it: every run's record comes
            # through the index's watch.
            watch_runs(meta.index, self._run_recorded)

    def _run_recorded(self, run: GcRun) -> None:
        if run.state == "done" and not run.dry_run and run.finished and run.finished > self._last_success:
            self._last_success = run.finished
            if self.metrics is not None:
                self.metrics.gc_last_success.set(run.finished)

    def policy(self, dry_run: bool) -> Policy:
        s = self.settings
        return Policy(grace_seconds=s["gc.grace_seconds"], untagged_after_seconds=s["gc.untagged_after_seconds"],
                      upload_max_age_seconds=s["gc.upload_max_age_seconds"], delay_ms=s["gc.debug_delay_ms"],
                      dry_run=dry_run)

    # -- the admin API's calls ----------------------------------------------------

    async def start(self, dry_run: bool = False, trigger: str = "admin") -> dict:
        """Start a run in the background on this replica; refused while another one runs."""
        run = GcRun(id=new_run_id(), replica=self.replica_id, trigger=trigger, dry_run=dry_run,
                    started=time.time())
        lease, holder = await self.gcs.acquire(run, LOCK_TTL)
        if lease is None:
            raise ClusterError("refused", f"a garbage collection is already running (run {holder}); "
                                          "wait for it, or for its lease to expire if its replica died")
        task = asyncio.create_task(self._run(run, lease), name=f"gc-{run.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return summary(run)

    async def get(self, run_id: str) -> dict:
        run = await self.gcs.run(run_id)
        if run is None:
            raise ClusterError("unknown", f"no garbage collection run {run_id} is kept")
        return summary(run)

    async def history(self) -> dict:
        return {"runs": [summary(r) for r in reversed(await self.gcs.runs())]}

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass

    # -- a run ----------------------------------------------------------------------

    async def _run(self, run: GcRun, lease: int) -> None:
        log.info("garbage collection started", extra={"run": run.id, "dry_run": run.dry_run})
        collector = Collector(self.gcs, self.meta, self.storage, run, lease, self.policy(run.dry_run),
                              self.gcs.save, self.sessions.forget if self.sessions else lambda _: None,
                              now=self.clock.now if self.clock else time.time)
        work = asyncio.create_task(self._collect(collector))
        keeper = asyncio.create_task(self._keep_lease(lease, work))
        try:
            await work
        except asyncio.CancelledError:
            work.cancel()
            raise
        finally:
            keeper.cancel()
            try:
                await self.gcs.release(run.id, lease)
            except MetadataUnavailable as e:
                log.warning("garbage collection lock not released; it expires with its lease",
                            extra={"run": run.id, "error": str(e)})

    async def _collect(self, collector: Collector) -> None:
        run = collector.run
        try:
            await self._abandon_others(run)
            if self.clock is not None:  # just started: learn the others' clocks first
                await self.clock.settle()
            await collector.collect()
            run.state = "done"
        except asyncio.CancelledError:
            run.state, run.error = "failed", "this run lost its lock or its replica stopped"
        except Exception as e:  # reported in the run record; the next run starts afresh
            log.exception("garbage collection failed", extra={"run": run.id})
            run.state, run.error = "failed", str(e) or type(e).__name__
        run.finished = time.time()
        try:
            await self.gcs.save(run, self.notifier.collected(run) if self.notifier is not None else ())
        except MetadataUnavailable:
            pass
        log.info("garbage collection finished", extra=summary(run))
        if self.metrics is not None:
            self.metrics.gc_runs.labels("success" if run.state == "done" else "failed").inc()
            if not run.dry_run:
                self.metrics.gc_freed.inc(run.bytes_freed)


    async def _keep_lease(self, lease: int, work: asyncio.Task) -> None:
        last_ok = time.monotonic()
        while True:
            await asyncio.sleep(LOCK_TTL / 4)
            try:
                if await self.gcs.keep_alive(lease) > 0:
                    last_ok = time.monotonic()
                    continue
                expired = True
            except MetadataUnavailable:
                expired = time.monotonic() - last_ok > LOCK_TTL * 0.75
            if expired:  # the lock is gone, or soon will be: every further sweep would be refused
                work.cancel()
                return

    async def _abandon_others(self, run: GcRun) -> None:
        """We hold the lock, so a run still marked running elsewhere died; keep the last KEEP_RUNS."""
        runs = await self.gcs.runs()
        for other in runs:
            if other.state == "running" and other.id != run.id:
                other.state, other.error = "abandoned", "its replica stopped before it finished"
                await self.gcs.save(other)
                if self.metrics is not None:
                    self.metrics.gc_runs.labels("abandoned").inc()
        await self.gcs.prune(runs)

    # -- the schedule -----------------------------------------------------------------

    async def schedule(self) -> None:
        """Start a run when `gc.schedule` says one is due; every replica tries, the lock picks one."""
        while True:
            period = SCHEDULE_CHECK_SECONDS
            interval = self.settings["gc.schedule"]
            if interval:
                seconds = duration_seconds(interval)
                period = min(max(seconds / 4, 0.5), SCHEDULE_CHECK_SECONDS)
                try:
                    await self._maybe_run(seconds)
                except MetadataUnavailable as e:
                    log.debug("scheduled garbage collection skipped", extra={"error": str(e)})
            try:
                await asyncio.wait_for(self._wake.wait(), period * random.uniform(0.75, 1.25))
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    async def _maybe_run(self, interval: float) -> None:
        runs = [r for r in await self.gcs.runs() if not r.dry_run]
        if runs and time.time() - max(r.started for r in runs) < interval:
            return
        try:
            await self.start(trigger="schedule")
        except ClusterError:
            pass  # another replica's run, or one that is still going
