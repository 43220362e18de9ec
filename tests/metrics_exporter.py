"""A stand-in for a replica's /metrics, for tests of the monitoring files.

It serves the series a test writes to a JSON file, with prometheus-client,
over HTTPS with a certificate of the test's own CA and behind a bearer token,
as the replicas are to serve theirs: so the Prometheus harness
(tests/prometheus.py) and the alert rules can be run against a real scrape
before the replicas have metrics. The file is read again at every scrape, so a
test changes the values while Prometheus watches. Only the names, types and
labels of tests/metrics_spec.py are served; anything else is an error.

    python tests/metrics_exporter.py --listen 127.0.0.1:PORT --series FILE \
        [--token-file FILE] [--cert FILE --key FILE]

The series file: [{"name": "moorage_quorum", "labels": {}, "value": 1}, ...];
a counter's value is its total, a histogram's is one observation.
"""

from __future__ import annotations

import argparse
import hmac
import json
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from metrics_spec import BY_NAME


def build_registry(series: list[dict]) -> CollectorRegistry:
    registry = CollectorRegistry()
    made: dict[str, Counter | Gauge | Histogram] = {}
    for s in series:
        spec = BY_NAME.get(s["name"])
        if spec is None:
            raise ValueError(f"{s['name']} is not a metric of the spec")
        labels: dict[str, str] = s.get("labels", {})
        if set(labels) != set(spec.labels):
            raise ValueError(f"{spec.name} takes the labels {spec.labels}, not {tuple(labels)}")
        for label, allowed in spec.values.items():
            if labels[label] not in allowed:
                raise ValueError(f"{spec.name}: {label}={labels[label]!r} is not one of {allowed}")
        metric = made.get(spec.name)
        if metric is None:
            kind = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}[spec.type]
            # prometheus-client adds _total to a counter's name itself.
            metric = kind(spec.name.removesuffix("_total"), spec.help, spec.labels, registry=registry)
            made[spec.name] = metric
        child = metric.labels(**labels) if spec.labels else metric
        if spec.type == "counter":
            child.inc(s["value"])
        elif spec.type == "gauge":
            child.set(s["value"])
        else:
            child.observe(s["value"])
    return registry


def handler(series_file: Path, token: str | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            sent = self.headers.get("Authorization", "")
            if token is not None and not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
                self.send_error(401)
                return
            body = generate_latest(build_registry(json.loads(series_file.read_text())))
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # quiet: Prometheus scrapes every second
            pass

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--series", required=True, type=Path)
    parser.add_argument("--token-file", type=Path)
    parser.add_argument("--cert", type=Path)
    parser.add_argument("--key", type=Path)
    args = parser.parse_args(argv)
    host, port = args.listen.rsplit(":", 1)
    token = args.token_file.read_text().strip() if args.token_file else None
    build_registry(json.loads(args.series.read_text()))  # a bad file fails at start, not at a scrape
    server = ThreadingHTTPServer((host, int(port)), handler(args.series, token))
    if args.cert:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args.cert, args.key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print(f"serving on {args.listen}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
