"""The replicas' own metrics: /metrics on every replica, and a real Prometheus scraping a cluster.

A replica serves every metric of tests/metrics_spec.py with the spec's labels
(and `promtool check metrics` finds nothing to say), behind the metrics token
or an admin's credentials, or without either on --metrics-listen. Three
replicas on hosts of their own, listed for Prometheus by `moorage status
--prometheus-targets`: requests show on the replicas that served them, and
when one is SIGKILLed its `up` is 0, the survivors report no failure
tolerated, and the alerts of docs/monitoring/alerts.yml fire.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import ADMIN_PASSWORD, MOORAGE, Cluster, Registry, cli_env, free_port, moorage, scratch, terminate, wait_for
from metrics_spec import METRICS
from moorage.cli.cluster import prometheus_targets
from oci import new_repo, pull_blob, pull_manifest, push_image
from prometheus import Prometheus, ScrapeJob, fast_rules

pytestmark = pytest.mark.monitoring

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "docs" / "monitoring" / "alerts.yml"
TYPES = {"counter": "counter", "gauge": "gauge", "histogram": "histogram"}


def scrape(reg: Registry, **kw) -> httpx.Response:
    return httpx.get(reg.url + "/metrics", verify=reg.ssl_context(), timeout=10, **kw)


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


@pytest.fixture(scope="module")
def replica(request) -> Iterator[Registry]:
    root = scratch(request, "metrics")
    reg = Registry(root / "data", extra_args=["--metrics-listen", f"127.0.0.1:{free_port()}"]).start()
    yield reg
    reg.kill9()


@pytest.fixture(scope="module")
def token(replica, request) -> str:
    value = secrets.token_hex(24)
    path = scratch(request, "token") / "metrics.token"
    path.write_text(value + "\n")
    moorage("config", "set", "metrics.token", "--from-file", str(path), "--existing", replica.url)
    return value


def test_metrics_need_the_token_or_a_cluster_admin(replica, token):
    refused = scrape(replica)
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert "registry_" not in refused.text
    assert scrape(replica, headers={"Authorization": "Bearer " + token[:-1] + "x"}).status_code == 401
    ok = scrape(replica, headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 200 and ok.headers["Content-Type"].startswith("text/plain")
    assert scrape(replica, auth=("admin", ADMIN_PASSWORD)).status_code == 200
    assert scrape(replica, auth=("admin", "wrong-password")).status_code == 401
    # The token is kept as a hash and shown as set, nowhere in clear.
    listed = json.loads(moorage("config", "list", "--json", "--existing", replica.url).stdout)
    assert listed["settings"]["metrics.token"]["value"] == "(set)"
    with replica.client() as c:
        assert c.get("/health").json()["settings"]["metrics.token"] == "(set)"
    assert token not in replica.log_path.read_text()
    short = moorage("config", "set", "metrics.token", "short", "--existing", replica.url, check=False)
    assert short.returncode == 1 and "at least 16 characters" in short.stderr


def test_metrics_listen_serves_metrics_alone_without_authentication(replica):
    address = replica.extra_args[replica.extra_args.index("--metrics-listen") + 1]
    r = httpx.get(f"http://{address}/metrics", timeout=10)
    assert r.status_code == 200 and "moorage_build_info" in r.text
    assert httpx.get(f"http://{address}/v2/", timeout=10).status_code == 404


def test_every_metric_of_the_spec_is_served_with_its_labels(replica, token, tmp_path):
    repo = new_repo("metrics")
    with replica.client() as c:
        image = push_image(c, repo, "v1")
        pull_manifest(c, repo, "v1")
        assert pull_blob(c, repo, sha(image.layers[0])) == image.layers[0]
    with replica.client(password="not-the-password") as c:
        assert c.get(f"/v2/{repo}/tags/list").status_code == 401
    moorage("config", "set", "readonly", "true", "--existing", replica.url)
    try:
        with replica.client() as c:
            assert c.post(f"/v2/{repo}/blobs/uploads/").status_code == 405
    finally:
        moorage("config", "set", "readonly", "false", "--existing", replica.url)
    moorage("webhook", "add", "nobody", "--url", f"http://127.0.0.1:{free_port()}/", "--repository", "none/*",
            "--existing", replica.url)
    moorage("gc", "--existing", replica.url)

    def text() -> str:
        r = scrape(replica, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200
        return r.text

    body = wait_for(lambda: (t := text()) and sample(t, "moorage_gc_last_success_timestamp_seconds") > 0 and t,
                    15, "the GC run in the metrics")
    found = families(body)
    for spec in METRICS:
        name = spec.name.removesuffix("_total") if spec.type == "counter" else spec.name
        if spec.s3_only:   # this replica is on the filesystem (tests/test_s3.py checks these)
            assert not [s for s in getattr(found.get(name), "samples", ()) if s.name in spec.series_names()], spec.name
            continue
        assert name in found, f"{spec.name} is not served"
        family = found[name]
        assert family.type == TYPES[spec.type], (spec.name, family.type)
        samples = [s for s in family.samples if s.name in spec.series_names()]
        assert samples, f"{spec.name} has no sample"
        for s in samples:
            labels = set(s.labels) - {"le"}
            assert labels == set(spec.labels), (spec.name, s.labels)
            for label, allowed in spec.values.items():
                assert s.labels[label] in allowed, (spec.name, s.labels)
    # What the traffic above must have moved.
    assert sample(body, "registry_http_requests_total", handler="manifest", method="PUT", code="201") == 1
    assert sample(body, "registry_http_requests_total", handler="blob", method="GET", code="200") == 1
    assert sample(body, "registry_http_request_duration_seconds_count", handler="blob_upload", method="POST") >= 3
    assert sample(body, "moorage_pushed_bytes_total") >= sum(map(len, [image.config, *image.layers]))
    assert sample(body, "moorage_pulled_bytes_total") == len(image.layers[0])
    assert sample(body, "moorage_logins_refused_total", reason="bad_credentials") >= 1
    assert sample(body, "moorage_writes_refused_total", reason="readonly") == 1
    assert sample(body, "moorage_writes_refused_total", reason="no_quorum") == 0
    assert sample(body, "moorage_gc_runs_total", result="success") == 1
    assert sample(body, "registry_storage_action_seconds_count", driver="filesystem", action="PutContent") >= 1
    assert sample(body, "moorage_etcd_request_duration_seconds_count", op="txn") >= 1
    assert sample(body, "moorage_replicas", state="healthy") == 1 and sample(body, "moorage_quorum") == 1
    assert sample(body, "moorage_webhook_dropped_total", endpoint="nobody") == 0
    # No repository name, digest or user is a label value anywhere.
    assert repo not in body and sha(image.layers[0]) not in body and "admin" not in body.replace("handler=\"admin\"", "")
    # Prometheus's own linter on the exposition.
    check = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr


def test_requests_tallied_then_folded_read_as_if_each_was_observed(monkeypatch):
    """The hot path tallies requests in plain Python and folds them into the metrics later
    (moorage/metrics.py says why): what a scrape shows is what observing each would show."""
    import asyncio
    import random
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, Counter, Histogram
    from moorage import metrics
    from moorage.metrics import Metrics

    # The registry's clock stands still, so each request lasts exactly the seconds given to
    # the reference: a stall between two reads of a running clock (a busy CI machine took
    # 2 ms once) would move a request across a bucket's bound in one and not the other.
    monkeypatch.setattr(metrics, "time", SimpleNamespace(perf_counter=lambda: 1000.0))
    # Away from the default buckets' bounds (.005, .01, ..., 2.5, 5, 10, +Inf), so the float
    # rounding of (now - (now - seconds)) never moves one across a bound either.
    durations = [random.choice([0.0001, 0.003, 0.007, 0.2, 3.0, 42.0]) * random.uniform(0.9, 1.1)
                 for _ in range(500)]
    reference = CollectorRegistry()
    counted = Counter("registry_http_requests", "", ("method", "code", "handler"), registry=reference)
    observed = Histogram("registry_http_request_duration_seconds", "", ("method", "handler"), registry=reference)

    async def run() -> str:
        m = Metrics()
        for i, seconds in enumerate(durations):
            method = "GET" if i % 3 else "HEAD"
            started = m.request_started("manifest")
            m.request_done(method, 200, "manifest", started - seconds)
            counted.labels(method, "200", "manifest").inc()
            observed.labels(method, "manifest").observe(seconds)
            if i == 250:
                await asyncio.sleep(1.1)  # a fold by the timer, half way
        in_flight = m.request_started("blob")  # one still being answered
        m.fold()
        text = m.exposition().decode()
        m.request_done("GET", 200, "blob", in_flight)
        return text

    text = asyncio.run(run())
    mine = {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}
    for family in reference.collect():
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            if s.name.endswith("_sum"):
                assert mine[key] == pytest.approx(s.value, rel=1e-3)
            elif not s.name.endswith("_created"):
                assert mine[key] == s.value, key
    assert sample(text, "registry_http_in_flight_requests", handler="blob") == 1
    assert sample(text, "registry_http_in_flight_requests", handler="manifest") == 0


def sha(data: bytes) -> str:
    import hashlib
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_one_scrape_sums_every_process_of_a_replica(tmp_path):
    """Worker processes of one replica write their values to one directory; a scrape sums them
    (prometheus-client's multiprocess mode), dead processes' counters included."""
    directory = tmp_path / "metrics"
    worker = textwrap.dedent(f"""
        from pathlib import Path
        from moorage.metrics import Metrics
        m = Metrics(Path({str(directory)!r}))
        started = m.request_started("manifest")
        m.request_done("GET", 200, "manifest", started)
        m.pushed_bytes.inc(1000)
        m.uploads_in_progress.inc()
    """)
    for _ in range(3):
        subprocess.run([sys.executable, "-c", worker], check=True, timeout=60)
    reader = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from moorage.metrics import Metrics
        m = Metrics(Path({str(directory)!r}))
        for pid in {{int(f.stem.rsplit("_", 1)[1]) for f in Path({str(directory)!r}).glob("gauge_livesum_*.db")}}:
            m.process_died(pid)
        print(m.exposition().decode())
    """)
    text = subprocess.run([sys.executable, "-c", reader], check=True, capture_output=True, text=True, timeout=60).stdout
    assert sample(text, "registry_http_requests_total", handler="manifest", method="GET", code="200") == 3
    assert sample(text, "moorage_pushed_bytes_total") == 3000
    assert sample(text, "moorage_uploads_in_progress") == 0  # the dead processes' uploads are not in progress


# -- a real Prometheus and a cluster of three ---------------------------------------------------


def test_prometheus_scrapes_a_cluster_and_fires_its_alerts(trio, tmp_path):
    first = trio.replicas[0]
    token_file = tmp_path / "metrics.token"
    token_file.write_text(secrets.token_urlsafe(32))
    moorage("config", "set", "metrics.token", "--from-file", str(token_file), "--existing", first.url)
    targets = tmp_path / "moorage-targets.json"
    # The target list that follows the cluster, as the guide runs it.
    watch = subprocess.Popen(MOORAGE + ["status", "--prometheus-targets", str(targets), "--cluster-label", "test",
                                        "--watch", "--existing", first.url],
                             env=cli_env(["--existing", first.url]), stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    job = ScrapeJob("moorage", file_sd=targets, scheme="https", bearer_token_file=token_file, ca_file=first.ca)
    try:
        wait_for(targets.exists, 20, "the targets file")
        assert json.loads(targets.read_text()) == [{"targets": sorted(r.host for r in trio.replicas),
                                                    "labels": {"cluster": "test"}}]
        with Prometheus(tmp_path / "prometheus", [job], [fast_rules(ALERTS, tmp_path / "alerts.yml")]) as prom:
            scrape_a_cluster(trio, prom)
            # The dead replica removed: it leaves the list, and Prometheus stops scraping it.
            third = trio.replicas[2]
            moorage("remove", "--replica-id", third.replica_id, "--force", "--existing", trio.replicas[0].url)
            wait_for(lambda: len(json.loads(targets.read_text())[0]["targets"]) == 2, 20, "the list rewritten")
            prom.wait_for(lambda: third.host not in {t["labels"]["instance"] for t in prom.targets()}, 20,
                          "the removed replica's target gone")
    finally:
        terminate(watch)
    assert watch.returncode == 0, watch.stderr.read() if watch.stderr else ""


def scrape_a_cluster(trio: Cluster, prom: Prometheus) -> None:
    """Requests show on the replicas that served them; a replica SIGKILLed is down, the others
    see the cluster tolerating no more failures, and the alerts fire."""
    first, second, third = trio.replicas
    prom.wait_for(lambda: (u := prom.values('up{job="moorage"}')) and len(u) == 3 and set(u.values()) == {1.0},
                  30, "the three replicas scraped")
    tolerated = prom.wait_for(lambda: (v := prom.values("moorage_failures_tolerated")) and len(v) == 3 and v,
                              20, "every replica's view of the cluster")
    assert set(tolerated.values()) == {1.0}

    # Pushes through two replicas: their request counters rise, the third's does not.
    def pushes() -> dict[str, float]:
        return prom.values('sum by (instance) (registry_http_requests_total{handler="manifest", method="PUT"})')

    before = pushes()
    for reg in (first, second):
        with reg.client() as c:
            for i in range(3):
                push_image(c, new_repo("scraped"), f"v{i}")
    after = prom.wait_for(lambda: (p := pushes()) and all(p.get(r.host, 0) - before.get(r.host, 0) == 3
                                                          for r in (first, second)) and p,
                          20, "the pushes in Prometheus")
    assert after.get(third.host, 0) == before.get(third.host, 0), after
    # Nothing about the cluster's health fires while all three serve (the machine's own disk
    # may be nearly full, and then MoorageDiskNearlyFull rightly fires: not this test's concern).
    health = {"MoorageReplicaDown", "MoorageQuorumAtRisk", "MoorageNoQuorum", "MoorageWritesRefused"}
    assert [a for a in prom.alerts(state="firing") if a["labels"]["alertname"] in health] == []

    # One replica killed: Prometheus finds it down, the survivors find that the cluster
    # tolerates no more failures, and the alerts fire.
    third.kill9()
    prom.wait_for(lambda: prom.values(f'up{{instance="{third.host}"}}') == {third.host: 0.0}, 15,
                  "the killed replica's up to be 0")
    prom.wait_for(lambda: prom.values("moorage_failures_tolerated") == {first.host: 0.0, second.host: 0.0},
                  30, "the survivors to report 0 failures tolerated")
    assert prom.values('moorage_replicas{state="unhealthy"}') == {first.host: 1.0, second.host: 1.0}

    def firing() -> set[tuple[str, str]] | None:
        found = {(a["labels"]["alertname"], a["labels"].get("instance", "")) for a in prom.alerts(state="firing")}
        return found if {("MoorageReplicaDown", third.host), ("MoorageQuorumAtRisk", "")} <= found else None

    fired = prom.wait_for(firing, 30, "MoorageReplicaDown and MoorageQuorumAtRisk firing")
    assert ("MoorageNoQuorum", "") not in fired
    down = next(a for a in prom.alerts(state="firing") if a["labels"]["alertname"] == "MoorageReplicaDown"
                and a["labels"].get("instance") == third.host)
    assert down["labels"]["cluster"] == "test" and down["labels"]["severity"] == "warning"


def test_the_monitoring_guide_configures_prometheus_as_it_parses(tmp_path):
    """docs/monitoring.md's prometheus.yml blocks are what promtool accepts (with the alert rules);
    its file_sd example is what `moorage status --prometheus-targets` writes, in shape."""
    guide = (ROOT / "docs" / "monitoring.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", guide, re.S)
    scrape = [b for b in blocks if "scrape_configs:" in b]
    assert len(scrape) == 2
    for block in scrape:
        config = yaml.safe_load(block)
        config["rule_files"] = [str(ALERTS)]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        # Syntax only: the guide's files (/etc/prometheus/...) are the reader's to make.
        check = subprocess.run(["promtool", "check", "config", "--syntax-only", str(tmp_path / "prometheus.yml")],
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        assert config["scrape_configs"][0]["job_name"] == "moorage"
    example = json.loads(next(b for b in re.findall(r"```json\n(.*?)```", guide, re.S) if b.lstrip().startswith("[")))
    status = {"replicas": [{"url": f"https://{t}"} for t in example[0]["targets"]]}
    assert json.loads(prometheus_targets(status, example[0]["labels"]["cluster"])) == example
