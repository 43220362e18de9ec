"""A replica's Prometheus metrics: every metric it serves, defined once, built once per process.

The names are distribution's where they mean the same (so dashboards made
for CNCF distribution work) and Moorage's own under `moorage_`; the table is
docs/monitoring.md's. Every layer measures itself (the HTTP dispatcher, the
etcd client, the storage driver wrapper, uploads, GC, webhooks), so this
module sits below them all, like logs.py, and is handed down as one object
rather than imported as module-level metrics: whether a process writes its
values to shared files (prometheus-client's multiprocess mode, for a replica
of several worker processes) is decided when the replica starts, after every
module is imported, and prometheus-client fixes it per metric at creation.

No label takes a repository name, a digest or a user: the number of series
is bounded by the code and the configuration (webhook endpoints), never by
what the registry holds.
"""

from __future__ import annotations

import asyncio
import os
import time
from bisect import bisect_left
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, values
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from moorage import __version__

CONTENT_TYPE = CONTENT_TYPE_LATEST

# distribution's handler names, and Moorage's own surfaces.
HANDLERS = ("base", "blob", "blob_upload", "blob_upload_chunk", "manifest", "tags", "catalog",
            "referrers", "token", "admin", "console", "ping", "other")
# distribution's storage driver actions (Move is how an upload becomes its blob).
STORAGE_ACTIONS = ("Stat", "GetContent", "PutContent", "Reader", "Writer", "Move", "Delete", "List", "URLFor")
GC_RESULTS = ("success", "failed", "abandoned")
METHODS = frozenset(("GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS"))
FOLD_SECONDS = 1.0


class Metrics:
    """Every metric of one process. `multiprocess_dir`: the directory the processes of one
    replica share (prometheus-client's multiprocess mode), None for a replica of one process."""

    def __init__(self, multiprocess_dir: Path | None = None):
        self.multiprocess_dir = multiprocess_dir
        if multiprocess_dir is not None:
            multiprocess_dir.mkdir(parents=True, exist_ok=True)
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(multiprocess_dir)
            values.ValueClass = values.MultiProcessValue()
        else:
            values.ValueClass = values.MutexValue
        # distribution's exposition has no `_created` series, and nothing here reads them.
        disable_created_metrics()
        r = self.registry = CollectorRegistry(auto_describe=False)

        # -- distribution's ------------------------------------------------------------
        self.http_requests = Counter("registry_http_requests", "HTTP requests answered",
                                     ("method", "code", "handler"), registry=r)
        self.http_duration = Histogram("registry_http_request_duration_seconds", "time to answer an HTTP request",
                                       ("method", "handler"), registry=r)
        self.http_in_flight = Gauge("registry_http_in_flight_requests", "HTTP requests being answered",
                                    ("handler",), registry=r, multiprocess_mode="livesum")
        self.storage_seconds = Histogram("registry_storage_action_seconds", "time a storage driver action took",
                                         ("driver", "action"), registry=r)

        # -- the cluster as this replica sees it (set by the replica's process only) ------
        def gauge(name: str, doc: str, labels: Iterable[str] = ()) -> Gauge:
            return Gauge(name, doc, tuple(labels), registry=r, multiprocess_mode="mostrecent")

        self.replicas = gauge("moorage_replicas", "replicas of the cluster as this replica sees them", ("state",))
        self.failures_tolerated = gauge("moorage_failures_tolerated",
                                        "failures the cluster tolerates now, as this replica sees it")
        self.failures_tolerated_when_healthy = gauge("moorage_failures_tolerated_when_healthy",
                                                     "failures the cluster tolerates with every replica healthy")
        self.quorum = gauge("moorage_quorum", "1 while this replica reaches an etcd quorum, else 0")
        self.index_lag = gauge("moorage_index_lag_revisions",
                               "etcd revisions the in-memory index is behind")
        self.gc_last_success = gauge("moorage_gc_last_success_timestamp_seconds",
                                     "when the cluster's last successful garbage collection ended")
        self.certificate_expiry = gauge("moorage_certificate_expiry_timestamp_seconds",
                                        "when this replica's certificates expire", ("certificate",))
        # Labelled by driver so that a replica on the filesystem serves no such series (an
        # unlabelled gauge would read 0, "down", there).
        self.object_store_up = gauge("moorage_object_store_up",
                                     "1 while this replica's probe of the object store succeeds, else 0",
                                     ("driver",))
        self.storage_free = gauge("moorage_storage_free_bytes", "free bytes of a volume", ("volume",))
        self.storage_size = gauge("moorage_storage_size_bytes", "total bytes of a volume", ("volume",))
        self.etcd_db_size = gauge("moorage_etcd_db_size_bytes", "the etcd member's database size")
        self.etcd_db_quota = gauge("moorage_etcd_db_quota_bytes", "the etcd member's database quota")
        self.webhook_pending = gauge("moorage_webhook_pending", "webhook events waiting for delivery",
                                     ("endpoint",))
        self.build_info = gauge("moorage_build_info", "always 1; the version is the label", ("version",))

        # -- counters, summed over a replica's processes ------------------------------------
        self.writes_refused = Counter("moorage_writes_refused", "writes refused without being tried",
                                      ("reason",), registry=r)
        self.etcd_leader_changes = Counter("moorage_etcd_leader_changes",
                                           "leader changes this replica's etcd member saw", registry=r)
        self.etcd_seconds = Histogram("moorage_etcd_request_duration_seconds",
                                      "latency of this replica's requests to etcd", ("op",), registry=r)
        self.uploads_in_progress = Gauge("moorage_uploads_in_progress",
                                         "upload requests this replica is receiving a body for",
                                         registry=r, multiprocess_mode="livesum")
        self.pushed_bytes = Counter("moorage_pushed_bytes", "blob bytes received", registry=r)
        self.pulled_bytes = Counter("moorage_pulled_bytes", "blob bytes served or redirected", registry=r)
        self.gc_runs = Counter("moorage_gc_runs", "garbage collection runs this replica ran", ("result",),
                               registry=r)
        self.gc_freed = Counter("moorage_gc_freed_bytes", "bytes garbage collection freed", registry=r)
        self.logins_refused = Counter("moorage_logins_refused", "logins refused", ("reason",), registry=r)
        self.http_throttled = Counter("moorage_http_throttled", "requests answered 429", registry=r)
        self.audit_dropped = Counter("moorage_audit_dropped", "audit entries dropped (writer backlog full)",
                                     registry=r)
        self.storage_errors = Counter("moorage_storage_errors", "storage driver actions that failed",
                                      ("driver", "action"), registry=r)
        self.webhook_deliveries = Counter("moorage_webhook_deliveries", "webhook events delivered or failed",
                                          ("endpoint", "result"), registry=r)
        self.webhook_dropped = Counter("moorage_webhook_dropped",
                                       "webhook events dropped because the endpoint's backlog was full",
                                       ("endpoint",), registry=r)

        # Children that alerts compute rate() or increase() over exist at 0 from the start:
        # a series that first appears at 1 shows no increase, and the first failure would
        # never alert.
        for reason in ("no_quorum", "readonly"):
            self.writes_refused.labels(reason)
        for result in GC_RESULTS:
            self.gc_runs.labels(result)
        for reason in ("bad_credentials", "throttled"):
            self.logins_refused.labels(reason)
        self._requests: dict[tuple[str, int, str], tuple] = {}
        self._tallies: dict[tuple[str, int, str], list] = {}
        self._bounds = list(self.http_duration._upper_bounds)
        self._in_flight = dict.fromkeys(HANDLERS, 0)
        self._in_flight_shown = dict.fromkeys(HANDLERS, 0)
        self._in_flight_children = {handler: self.http_in_flight.labels(handler) for handler in HANDLERS}
        self._fold_pending = False

    # -- the replica's process ---------------------------------------------------------

    def started(self) -> None:
        """What a replica's process reports once: its version."""
        self.build_info.labels(__version__).set(1)

    def webhook_endpoint(self, endpoint: str) -> None:
        """An endpoint's counters at 0 as soon as it is configured."""
        for result in ("delivered", "failed"):
            self.webhook_deliveries.labels(endpoint, result)
        self.webhook_dropped.labels(endpoint)

    def webhook_endpoint_removed(self, endpoint: str) -> None:
        for metric in (self.webhook_pending,):
            try:
                metric.remove(endpoint)
            except KeyError:
                pass

    # -- requests: the hot path ------------------------------------------------------------
    #
    # prometheus-client's own calls cost a request 2.3 µs (a lock per value, and an mmap
    # write each in multiprocess mode: 5.2 µs), 3-7% of a manifest GET's ~70 µs. So a request
    # is tallied in plain Python (a dict, a bisect: ~0.7 µs), and the tallies are folded into
    # the metrics at most a second later, and before every scrape.

    def request_started(self, handler: str) -> float:
        self._in_flight[handler] += 1
        if not self._fold_pending:
            self._schedule_fold()
        return time.perf_counter()

    def request_done(self, method: str, status: int, handler: str, started: float) -> None:
        seconds = time.perf_counter() - started
        key = (method, status, handler)
        tally = self._tallies.get(key)
        if tally is None:
            tally = self._tally(key)
        tally[0] += 1
        tally[1] += seconds
        tally[2][bisect_left(self._bounds, seconds)] += 1
        self._in_flight[handler] -= 1
        if status == 429:
            self.http_throttled.inc()
        if not self._fold_pending:
            self._schedule_fold()

    def _tally(self, key: tuple[str, int, str]) -> list:
        method, status, handler = key
        if method not in METHODS:  # free text on the wire: one label value for the odd ones
            method = "OTHER"
        children = self._requests.get((method, status, handler))
        if children is None:
            children = self._requests[(method, status, handler)] = (
                self.http_requests.labels(method, str(status), handler), self.http_duration.labels(method, handler))
        tally = [0, 0.0, [0] * len(self._bounds), children]
        if len(self._tallies) < 4096:
            self._tallies[key] = tally
        else:  # never reached by real clients; counted, just not kept
            self._fold_one(tally)
        return tally

    def _schedule_fold(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a test, a tool): fold at once
            self.fold()
            return
        self._fold_pending = True
        loop.call_later(FOLD_SECONDS, self.fold)

    def fold(self) -> None:
        """Put the requests tallied since the last fold into the metrics (the loop's thread only)."""
        self._fold_pending = False
        for tally in self._tallies.values():
            if tally[0]:
                self._fold_one(tally)
        for handler, count in self._in_flight.items():
            if count != self._in_flight_shown[handler]:
                self._in_flight_children[handler].set(count)
                self._in_flight_shown[handler] = count

    def _fold_one(self, tally: list) -> None:
        count, seconds, buckets, (requests, duration) = tally
        requests.inc(count)
        # A histogram's observations, many at once: prometheus-client's Histogram.observe adds
        # one to the sum and one to a bucket; this adds each bucket's count and their sum.
        duration._sum.inc(seconds)
        for i, n in enumerate(buckets):
            if n:
                duration._buckets[i].inc(n)
                buckets[i] = 0
        tally[0], tally[1] = 0, 0.0

    # -- the exposition --------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The text format of every metric of the replica: all its processes' in multiprocess
        mode (a few to tens of ms: call it in a thread, after `fold()` in the loop's)."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(self.multiprocess_dir))
        return generate_latest(registry)

    def process_died(self, pid: int) -> None:
        """A worker process of this replica ended: its live gauges stop counting."""
        if self.multiprocess_dir is not None:
            from prometheus_client import multiprocess
            multiprocess.mark_process_dead(pid, str(self.multiprocess_dir))


def clear_metrics_dir(path: Path) -> None:
    """At a replica's start, before its workers: the files of processes from before are not
    this replica's now (a counter would resume from a dead run's value)."""
    if path.is_dir():
        for f in path.glob("*.db"):
            f.unlink(missing_ok=True)
