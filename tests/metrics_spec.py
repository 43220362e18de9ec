"""The metrics a Moorage replica is to serve on /metrics (issue 15), as data.

The names, types and labels are the ones the lead decided: distribution's
where they mean the same (so existing dashboards work), Moorage's own under
`moorage_`. The alert rules and the Grafana dashboard of docs/monitoring/ may
use nothing else (tests/test_monitoring.py checks), the test exporter serves
only these, and the test that scrapes real replicas can hold their /metrics
against the same table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class Metric:
    name: str  # as exposed: counters end in _total; histograms add _bucket, _sum and _count
    type: Literal["counter", "gauge", "histogram"]
    help: str
    labels: tuple[str, ...] = ()
    # The bounded values a label takes, where the spec lists them.
    values: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Served only by replicas whose blobs are on S3 (a filesystem replica has no such series).
    s3_only: bool = False

    def series_names(self) -> set[str]:
        """Every series name Prometheus stores for this metric."""
        if self.type == "histogram":
            return {self.name + suffix for suffix in ("_bucket", "_sum", "_count")}
        return {self.name}


HANDLERS = ("base", "blob", "blob_upload", "blob_upload_chunk", "manifest", "tags", "catalog",
            "referrers", "token", "admin", "console", "ping", "other")
STORAGE_ACTIONS = ("Stat", "GetContent", "PutContent", "Reader", "Writer", "Move", "Delete", "List", "URLFor")
DRIVERS = ("filesystem", "s3")

METRICS: tuple[Metric, ...] = (
    # distribution's
    Metric("registry_http_requests_total", "counter", "HTTP requests answered",
           ("method", "code", "handler"), {"handler": HANDLERS}),
    Metric("registry_http_request_duration_seconds", "histogram", "time to answer an HTTP request",
           ("method", "handler"), {"handler": HANDLERS}),
    Metric("registry_http_in_flight_requests", "gauge", "HTTP requests being answered",
           ("handler",), {"handler": HANDLERS}),
    Metric("registry_storage_action_seconds", "histogram", "time a storage driver action took",
           ("driver", "action"), {"driver": DRIVERS, "action": STORAGE_ACTIONS}),
    # Moorage's own
    Metric("moorage_replicas", "gauge", "replicas of the cluster as this replica sees them",
           ("state",), {"state": ("healthy", "unhealthy")}),
    Metric("moorage_failures_tolerated", "gauge", "failures the cluster tolerates now, as this replica sees it"),
    Metric("moorage_failures_tolerated_when_healthy", "gauge", "floor((N-1)/2) for the cluster's N replicas"),
    Metric("moorage_quorum", "gauge", "1 while this replica reaches an etcd quorum, else 0"),
    Metric("moorage_writes_refused_total", "counter", "writes answered 503/405 without being tried",
           ("reason",), {"reason": ("no_quorum", "readonly")}),
    Metric("moorage_etcd_leader_changes_total", "counter", "leader changes this replica's etcd member saw"),
    Metric("moorage_etcd_request_duration_seconds", "histogram", "etcd client latency", ("op",)),
    Metric("moorage_index_lag_revisions", "gauge", "etcd revision minus the index's applied revision"),
    Metric("moorage_uploads_in_progress", "gauge", "upload sessions open on this replica"),
    Metric("moorage_pushed_bytes_total", "counter", "blob bytes received"),
    Metric("moorage_pulled_bytes_total", "counter", "blob bytes served (or redirected)"),
    Metric("moorage_gc_runs_total", "counter", "GC runs this replica ran",
           ("result",), {"result": ("success", "failed", "abandoned")}),
    Metric("moorage_gc_freed_bytes_total", "counter", "bytes GC freed"),
    Metric("moorage_gc_last_success_timestamp_seconds", "gauge", "when the last GC run succeeded"),
    Metric("moorage_logins_refused_total", "counter", "logins refused",
           ("reason",), {"reason": ("bad_credentials", "throttled")}),
    Metric("moorage_http_throttled_total", "counter", "429 answers"),
    Metric("moorage_audit_dropped_total", "counter", "audit entries dropped (writer backlog full)"),
    Metric("moorage_certificate_expiry_timestamp_seconds", "gauge", "not-after of this replica's certificates",
           ("certificate",), {"certificate": ("api", "etcd_node", "ca")}),
    Metric("moorage_storage_errors_total", "counter", "storage actions that failed",
           ("driver", "action"), {"driver": DRIVERS, "action": STORAGE_ACTIONS}),
    Metric("moorage_object_store_up", "gauge", "1 while this replica's probe of the object store succeeds, else 0",
           ("driver",), {"driver": ("s3",)}, s3_only=True),
    Metric("moorage_storage_free_bytes", "gauge", "free bytes of a volume",
           ("volume",), {"volume": ("blobs", "data")}),
    Metric("moorage_storage_size_bytes", "gauge", "total bytes of a volume",
           ("volume",), {"volume": ("blobs", "data")}),
    Metric("moorage_etcd_db_size_bytes", "gauge", "etcd's backend size"),
    Metric("moorage_etcd_db_quota_bytes", "gauge", "etcd's backend quota"),
    Metric("moorage_webhook_pending", "gauge", "events waiting", ("endpoint",)),
    Metric("moorage_webhook_deliveries_total", "counter", "webhook deliveries",
           ("endpoint", "result"), {"result": ("delivered", "failed")}),
    Metric("moorage_webhook_dropped_total", "counter", "events dropped when the backlog was full", ("endpoint",)),
    Metric("moorage_build_info", "gauge", "1, with the version as a label", ("version",)),
)

BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}

# What Prometheus adds to every target's series.
SCRAPE_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped",
                 "scrape_samples_post_metric_relabeling", "scrape_series_added"}


def series_names() -> dict[str, Metric]:
    """Every series name the spec lets a query use, and the metric it belongs to."""
    return {series: m for m in METRICS for series in m.series_names()}
