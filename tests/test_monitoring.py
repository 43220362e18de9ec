"""The monitoring files of docs/monitoring/: the alert rules and the Grafana dashboard.

promtool checks the rules and runs their unit tests (tests/monitoring/
alerts_test.yml); every expression of the rules and the dashboard uses only
the metrics of tests/metrics_spec.py; a real Prometheus parses every panel's
query; and the Prometheus harness (tests/prometheus.py) scrapes three
stand-in replicas over HTTPS with a bearer token, and an alert of alerts.yml
fires once, through /api/v1/alerts, when one of them is killed.
"""

from __future__ import annotations

import json
import re
import secrets
import signal
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx
import promql_parser
import pytest
import yaml

from conftest import free_port, scratch, terminate
from metrics_spec import METRICS, SCRAPE_SERIES, series_names
from prometheus import Prometheus, PrometheusError, ScrapeJob, fast_rules

pytestmark = pytest.mark.monitoring

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "docs" / "monitoring" / "alerts.yml"
ALERTS_TEST = ROOT / "tests" / "monitoring" / "alerts_test.yml"
DASHBOARD = ROOT / "docs" / "monitoring" / "dashboard.json"
EXPORTER = ROOT / "tests" / "metrics_exporter.py"
SEVERITIES = {"critical", "warning"}
# Grafana fills these in before a query reaches Prometheus; any value of the right kind parses the same.
GRAFANA_INTERVALS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(container: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside (collapsed) rows too."""
    for panel in container.get("panels", []):
        yield panel
        yield from panels(panel)


def as_promql(grafana_expr: str) -> str:
    """The query Prometheus gets: Grafana's intervals and the dashboard's variables filled in."""
    expr = grafana_expr
    for name, value in GRAFANA_INTERVALS.items():
        expr = expr.replace(name, value)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)  # variables are only ever label values: "$job", "$instance"


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every variable's selector."""
    board = dashboard()
    found = [(f"panel {p['title']!r} {t['refId']}", as_promql(t["expr"]))
             for p in panels(board) for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"]["query"])
            assert m, f"variable {var['name']}: not label_values(SELECTOR, LABEL): {var['query']}"
            found.append((f"variable {var['name']}", as_promql(m.group(1))))
    return found


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects, read from the PromQL parser's syntax tree."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            name = node.name or next((m.value for m in node.matchers.matchers if m.name == "__name__"), None)
            assert name, f"a selector without a metric name in {expr!r}"
            names.add(name)
        for attr in ("expr", "lhs", "rhs", "param", "vector_selector"):
            child = getattr(node, attr, None)
            if child is not None:
                walk(child)
        for arg in getattr(node, "args", None) or []:
            walk(arg)

    walk(promql_parser.parse(expr))
    return names


# -- alert rules ---------------------------------------------------------------------

def test_promtool_accepts_the_rules() -> None:
    r = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rules())} rules found" in r.stdout


def test_rules_unit_tests_pass() -> None:
    r = subprocess.run(["promtool", "test", "rules", str(ALERTS_TEST)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_every_alert_is_complete_and_tested_firing_and_not() -> None:
    alerts = [r for r in rules() if "alert" in r]
    names = {a["alert"] for a in alerts}
    for a in alerts:
        assert "for" in a, f"{a['alert']} has no for:"
        assert a["labels"]["severity"] in SEVERITIES, a["alert"]
        assert a["annotations"]["summary"].strip() and a["annotations"]["description"].strip(), a["alert"]
    cases = [case for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
             for case in test.get("alert_rule_test", [])]
    fired = {(c["alertname"], e["exp_labels"]["severity"]) for c in cases for e in c.get("exp_alerts") or []}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    for a in alerts:
        assert (a["alert"], a["labels"]["severity"]) in fired, f"no test fires {a['alert']} ({a['labels']['severity']})"
    assert names <= quiet, f"never shown not firing: {sorted(names - quiet)}"
    assert {c["alertname"] for c in cases} <= names, "a test names an alert the rules do not have"


def test_rules_use_only_the_spec_metrics() -> None:
    recorded = {r["record"] for r in rules() if "record" in r}
    allowed = set(series_names()) | recorded | {"up"}
    for rule in rules():
        used = metric_names(rule["expr"])
        assert used, rule
        assert used <= allowed, f"{rule.get('alert') or rule.get('record')}: not in the spec: {used - allowed}"


# -- dashboard -----------------------------------------------------------------------

def test_dashboard_structure() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 41 and board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    all_panels = list(panels(board))
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    grid: set[tuple[int, int]] = set()
    for p in all_panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & grid, f"panel {p['title']!r} overlaps another"
        grid |= cells
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p.get("description"), f"panel {p['title']!r} says nothing about what it shows"
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"] and t["expr"].strip(), p["title"]
    # Per-replica and cluster-wide views: some panels split by replica, some add the replicas up.
    exprs = [t["expr"] for p in all_panels for t in p.get("targets", [])]
    assert any('instance=~"$instance"' in e for e in exprs)
    assert any(re.match(r"(min|max|sum|count)\(", e) for e in exprs)


def test_dashboard_uses_every_spec_metric_and_nothing_else() -> None:
    allowed = series_names()
    used: set[str] = set()
    for where, expr in dashboard_queries():
        names = metric_names(expr)
        assert names, where
        unknown = names - set(allowed) - SCRAPE_SERIES
        assert not unknown, f"{where}: not in the spec: {unknown}"
        used |= names
    unused = {m.name for m in METRICS if not m.series_names() & used}
    assert not unused, f"spec metrics the dashboard never shows: {sorted(unused)}"


@pytest.fixture(scope="module")
def empty_prometheus(request) -> Iterator[Prometheus]:
    """A Prometheus with an empty TSDB: it answers every valid query with nothing, and a bad one with an error."""
    with Prometheus(scratch(request, "prometheus")) as prom:
        yield prom


def test_dashboard_queries_parse_in_prometheus(empty_prometheus: Prometheus) -> None:
    with pytest.raises(PrometheusError, match="bad_data"):  # the check can fail
        empty_prometheus.query('sum by (handler (rate(registry_http_requests_total[1m]))')
    errors = []
    for where, expr in dashboard_queries():
        try:
            empty_prometheus.query(expr)
        except PrometheusError as e:
            errors.append(f"{where}: {e}")
    assert not errors, "\n".join(errors)


# -- the Prometheus harness against a real scrape -------------------------------------

@dataclass
class Exporter:
    """A tests/metrics_exporter.py process: one stand-in replica's /metrics."""

    root: Path
    token_file: Path
    cert: Path
    key: Path
    ca: Path
    series: list[dict[str, Any]] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def series_file(self) -> Path:
        return self.root / f"series-{self.port}.json"

    def serve(self, series: list[dict[str, Any]]) -> None:
        """What the next scrape gets (written whole, then renamed: a scrape never reads half a file)."""
        tmp = self.series_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(series))
        tmp.replace(self.series_file)

    def start(self) -> "Exporter":
        self.serve(self.series)
        self.proc = subprocess.Popen(
            [sys.executable, str(EXPORTER), "--listen", self.address, "--series", str(self.series_file),
             "--token-file", str(self.token_file), "--cert", str(self.cert), "--key", str(self.key)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return self

    def wait_ready(self, timeout: float = 20) -> None:
        auth = {"Authorization": f"Bearer {self.token_file.read_text()}"}
        with httpx.Client(verify=ssl.create_default_context(cafile=str(self.ca)), timeout=1) as client:
            for _ in range(int(timeout / 0.1)):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the exporter exited: {self.proc.stderr.read().decode()}")
                try:
                    if client.get(f"https://{self.address}/metrics", headers=auth).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        raise TimeoutError("the exporter did not answer")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc, timeout=5)


def replica_series(replicas: int, healthy: int) -> list[dict[str, Any]]:
    """What a replica of a cluster of `replicas`, `healthy` of them healthy, reports."""
    quorum = healthy > replicas // 2
    return [
        {"name": "moorage_build_info", "labels": {"version": "0.1.0"}, "value": 1},
        {"name": "moorage_replicas", "labels": {"state": "healthy"}, "value": healthy},
        {"name": "moorage_replicas", "labels": {"state": "unhealthy"}, "value": replicas - healthy},
        {"name": "moorage_failures_tolerated", "labels": {}, "value": max(healthy - replicas // 2 - 1, 0)},
        {"name": "moorage_failures_tolerated_when_healthy", "labels": {}, "value": (replicas - 1) // 2},
        {"name": "moorage_quorum", "labels": {}, "value": int(quorum)},
        {"name": "moorage_certificate_expiry_timestamp_seconds", "labels": {"certificate": "api"},
         "value": 4102444800},  # 2100-01-01
        {"name": "registry_http_requests_total",
         "labels": {"method": "GET", "code": "200", "handler": "manifest"}, "value": 42},
    ]


def test_prometheus_scrapes_replicas_and_fires_alerts(tmp_path: Path) -> None:
    from moorage.cluster import pki

    paths = pki.Paths(tmp_path / "pki")
    pki.create_ca(paths, "monitoring-test")
    pki.ensure_api_cert(paths, ("127.0.0.1", "localhost"))
    token_file = tmp_path / "metrics.token"
    token_file.write_text(secrets.token_urlsafe(24))
    exporters = [Exporter(tmp_path, token_file, paths.api_cert, paths.api_key, paths.ca_cert,
                          series=replica_series(3, 3)) for _ in range(3)]
    try:
        for e in exporters:
            e.start()
        for e in exporters:
            e.wait_ready()
        # The replicas from a file_sd list, as `moorage status --prometheus-targets` is to write it.
        targets_file = tmp_path / "moorage-targets.json"
        targets_file.write_text(json.dumps([{"targets": [e.address for e in exporters],
                                             "labels": {"cluster": "test"}}]))
        replicas = ScrapeJob("moorage", file_sd=targets_file, scheme="https",
                             bearer_token_file=token_file, ca_file=paths.ca_cert)
        tokenless = ScrapeJob("without-token", [exporters[0].address], scheme="https", ca_file=paths.ca_cert,
                              labels={"cluster": "test"})
        rule_file = fast_rules(ALERTS, tmp_path / "alerts.yml")
        with Prometheus(tmp_path / "prometheus", [replicas, tokenless], [rule_file]) as prom:
            def health() -> dict[tuple[str, str], dict]:
                return {(t["labels"]["job"], t["labels"]["instance"]): t for t in prom.targets()}

            prom.wait_for(lambda: len(health()) == 4 and all(t["health"] != "unknown" for t in health().values()),
                          20, "every target scraped once")
            targets = health()
            assert all(targets[("moorage", e.address)]["health"] == "up" for e in exporters), targets
            refused = targets[("without-token", exporters[0].address)]
            assert refused["health"] == "down" and "401" in refused["lastError"], refused
            assert all(t["labels"]["cluster"] == "test" for t in targets.values()), targets

            # The spec's series, with the target's labels; the recording rules ran on them.
            assert prom.values('moorage_failures_tolerated{job="moorage", cluster="test"}') == {
                e.address: 1.0 for e in exporters}
            days = prom.wait_for(lambda: len(d := prom.values("moorage:certificate_expiry:days")) == 3 and d,
                                 10, "a rule evaluation over every replica's series")
            assert set(days) == {e.address for e in exporters} and all(d > 365 for d in days.values())
            assert prom.alerts() == []

            # One replica killed; once Prometheus finds it down (the `for:` of the rules is
            # 1 s here, not the minute that lets a real cluster's view catch up), the
            # survivors see it unhealthy and no failure tolerated.
            dead, *survivors = exporters
            dead.kill()
            prom.wait_for(lambda: prom.values(f'up{{instance="{dead.address}"}}') == {dead.address: 0.0},
                          10, "the killed replica's up to be 0")
            for e in survivors:
                e.serve(replica_series(3, 2))

            def firing() -> list[tuple[str, str]] | None:
                alerts = prom.alerts(state="firing")
                names = sorted((a["labels"]["alertname"], a["labels"].get("instance", "")) for a in alerts)
                return names if len(names) >= 2 else None

            fired = prom.wait_for(firing, 20, "MoorageReplicaDown and MoorageQuorumAtRisk firing")
            assert fired == [("MoorageQuorumAtRisk", ""), ("MoorageReplicaDown", dead.address)], fired
            assert prom.values('up{job="moorage"}') == {dead.address: 0.0, **{e.address: 1.0 for e in survivors}}
            at_risk = next(a for a in prom.alerts() if a["labels"]["alertname"] == "MoorageQuorumAtRisk")
            assert at_risk["labels"] == {"alertname": "MoorageQuorumAtRisk", "job": "moorage", "cluster": "test",
                                         "severity": "critical"}
            assert at_risk["annotations"]["summary"] == "Moorage cluster test tolerates no more failures"
    finally:
        for e in exporters:
            e.stop()
