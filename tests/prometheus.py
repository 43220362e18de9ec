"""A real Prometheus for tests: Debian's `prometheus` binary on a free loopback port.

`Prometheus` writes a configuration from `ScrapeJob`s (static targets or a
file_sd list, bearer token file, TLS CA and server name, target labels) and
rule files, with everything fast for a test: scrapes and rule evaluations
every second, and a TSDB of its own in the test's directory. It asks the HTTP
API what a person would look at: `query` (/api/v1/query), `targets`
(/api/v1/targets), `alerts` (/api/v1/alerts), and waits on them with
`wait_for`. `fast_rules` copies a rule file with every `for:` cut short, so an
alert of docs/monitoring/alerts.yml fires within seconds of its condition.

Use it as a context manager (`with Prometheus(tmp_path, jobs, rules) as prom:`)
or in a fixture that stops it in `finally`: it is stopped when the test ends,
failed or not, and its log is in the error of a failed start or wait.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import httpx
import yaml

from conftest import free_port, terminate

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
START_TIMEOUT = 30.0   # ready in about a second here; a loaded machine takes longer
INTERVAL = "1s"        # scrape and evaluation interval: alerts move within seconds
T = TypeVar("T")


class PrometheusError(Exception):
    """The API answered with an error (a query that does not parse, say)."""


@dataclass
class ScrapeJob:
    """One scrape_config: every replica a target of its own."""

    name: str
    targets: list[str] = field(default_factory=list)    # HOST:PORT each
    file_sd: Path | None = None                         # a file_sd list (JSON or YAML), besides or instead of targets
    scheme: str = "http"
    metrics_path: str = "/metrics"
    bearer_token_file: Path | None = None               # Authorization: Bearer <the file's content>
    ca_file: Path | None = None                         # the CA the targets' certificates must chain to
    server_name: str | None = None                      # the name their certificates must carry, if not the address
    labels: dict[str, str] = field(default_factory=dict)  # added to the static targets (a file_sd list has its own)

    def config(self) -> dict[str, Any]:
        job: dict[str, Any] = {"job_name": self.name, "scheme": self.scheme, "metrics_path": self.metrics_path}
        if self.targets:
            job["static_configs"] = [{"targets": self.targets, "labels": self.labels}]
        if self.file_sd is not None:
            job["file_sd_configs"] = [{"files": [str(self.file_sd)], "refresh_interval": INTERVAL}]
        if self.bearer_token_file is not None:
            job["authorization"] = {"type": "Bearer", "credentials_file": str(self.bearer_token_file)}
        tls: dict[str, str] = {}
        if self.ca_file is not None:
            tls["ca_file"] = str(self.ca_file)
        if self.server_name is not None:
            tls["server_name"] = self.server_name
        if tls:
            job["tls_config"] = tls
        return job


@dataclass
class Prometheus:
    """One `prometheus` child process, its configuration and its TSDB under `root`."""

    root: Path
    jobs: list[ScrapeJob] = field(default_factory=list)
    rule_files: list[Path] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.root / "prometheus.yml"

    @property
    def log_path(self) -> Path:
        return self.root / "prometheus.log"

    def config(self) -> dict[str, Any]:
        return {
            "global": {"scrape_interval": INTERVAL, "scrape_timeout": INTERVAL,
                       "evaluation_interval": INTERVAL},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [job.config() for job in self.jobs],
        }

    def write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))

    def command(self) -> list[str]:
        return [PROMETHEUS, f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.root / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=info"]

    def start(self, timeout: float = START_TIMEOUT) -> "Prometheus":
        self.write_config()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/-/ready", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"prometheus was not ready within {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc, timeout=10)

    def __enter__(self) -> "Prometheus":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    # -- the HTTP API ----------------------------------------------------------------

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/PATH; the `data` of a success, else PrometheusError with Prometheus's own message."""
        r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = r.json()
        if body.get("status") != "success":
            raise PrometheusError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result: [{"metric": {labels}, "value": [time, "value"]}, ...]."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def values(self, expr: str, by: str = "instance") -> dict[str, float]:
        """An instant query's values keyed by one label (e.g. each replica's)."""
        return {s["metric"].get(by, ""): float(s["value"][1]) for s in self.query(expr)}

    def targets(self) -> list[dict[str, Any]]:
        """The active targets: scrapeUrl, labels, health ("up", "down", "unknown"), lastError."""
        return self.api("targets", state="active")["activeTargets"]

    def alerts(self, state: str | None = None) -> list[dict[str, Any]]:
        """Alerts now pending or firing: labels, annotations, state, activeAt, value."""
        alerts = self.api("alerts")["alerts"]
        return [a for a in alerts if state is None or a["state"] == state]

    def wait_for(self, predicate: Callable[[], T], timeout: float, what: str) -> T:
        """Poll until `predicate` returns something true; on a timeout say what was awaited, with the log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
            result = predicate()
            if result:
                return result
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n"
                             f"targets: {self.targets()}\nalerts: {self.alerts()}\nlog:\n{self.log()}")


def fast_rules(source: Path, dest: Path, for_: str = "1s") -> Path:
    """Copy a rule file with every alert's `for:` set to `for_`: the expressions stay as they are."""
    rules = yaml.safe_load(source.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                rule["for"] = for_
    dest.write_text(yaml.safe_dump(rules, sort_keys=False))
    return dest
