"""Moorage through HAProxy: three replicas against one, and failover.

Usage: python bench/cluster_bench.py [--rounds N] [--json FILE]

Everything runs on this machine: replicas with their own etcd members on
loopback ports, one shared storage directory, and a real HAProxy configured
by `moorage lb haproxy`. Figures, medians of the rounds:

- pulls: 8 curl streams of a 64 MiB blob through HAProxy (MiB/s);
- writes: small image pushes (POST + PUT per blob, then the manifest) from 8
  clients through HAProxy (ops/s);
- failover: clients keep pulling a manifest through HAProxy while one replica
  is killed with SIGKILL; seconds from the kill to the last failed request,
  the requests that failed, and whether every write acknowledged around the
  kill reads back (zero lost writes).

Targets (issue 3): pulls over 3 replicas >= 1.5x one replica, writes >= 0.7x,
zero lost writes, failover under 3 s. On a 2-core machine three replicas
share the same two cores as one, so the ratios show what replication costs
more than what it buys; the guide's sizing says why production uses nodes.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import http.client
import json
import os
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from content import MiB, OCI_MANIFEST, Image  # noqa: E402
from credentials import Credentials  # noqa: E402
from load import BenchError, curl_pull, push_image_async, repo_auth, request, run_clients  # noqa: E402
from servers import Server, free_port  # noqa: E402

ADMIN_PASSWORD = "bench-admin-password"
CREDENTIALS = {"MOORAGE_ADMIN_PASSWORD": ADMIN_PASSWORD, "MOORAGE_USERNAME": "admin",
               "MOORAGE_PASSWORD": ADMIN_PASSWORD}
PULL_SIZE = 64 * MiB
STREAMS = 8
SMALL_IMAGES = 60          # x 11 operations each
CLIENTS = 8
FAILOVER_SECONDS = 8.0


@dataclass
class Endpoint:
    """Something with a URL that load.py's helpers can aim at (HAProxy here).

    HAProxy passes TLS through (mode tcp): clients see the replicas' own
    certificates, from the cluster CA, and log in to the replicas' token endpoint.
    """

    port: int
    ca: Path
    credentials: Credentials
    tls: bool = True
    _ssl: ssl.SSLContext | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        return self._ssl


def moorage(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "moorage", *args], capture_output=True, text=True,
                         timeout=120, env={**os.environ, **CREDENTIALS}, stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        raise BenchError(f"moorage {' '.join(args[:2])} failed: {out.stderr.strip()[-300:]}")
    return out


def replica(workdir: Path, storage: Path, join: str | None, ca: Path | None = None) -> Server:
    port = free_port()
    verb = ["join", "--existing", join] if join else ["serve"]
    cmd = [sys.executable, "-m", "moorage", *verb, "--data-dir", str(workdir / "data"),
           "--listen", f"127.0.0.1:{port}", "--storage-dir", str(storage),
           "--etcd-client-port", str(free_port()), "--etcd-peer-port", str(free_port())]
    workdir.mkdir(parents=True, exist_ok=True)
    # A joined replica receives the cluster CA, so every replica is trusted through the first's.
    return Server(f"replica-{workdir.name}", cmd, port, workdir, tls=True,
                  ca=ca or workdir / "data" / "tls" / "ca.crt",
                  credentials=Credentials("admin", ADMIN_PASSWORD),
                  env={"MOORAGE_CA_CERT": str(ca)} if ca else {})


class Cluster:
    def __init__(self, root: Path, size: int):
        self.root = root
        self.storage = root / "storage"
        self.replicas: list[Server] = []
        self.haproxy: subprocess.Popen | None = None
        os.environ.update(CREDENTIALS)  # the replicas' first start reads the admin password
        first = replica(root / "r0", self.storage, None)
        first.start()
        self.replicas.append(first)
        assert first.ca is not None
        os.environ["MOORAGE_CA_CERT"] = str(first.ca)  # `moorage lb`, `join`: trust the cluster CA
        self.lb = Endpoint(free_port(), first.ca, Credentials("admin", ADMIN_PASSWORD))
        for i in range(1, size):
            joined = replica(root / f"r{i}", self.storage, first.url, first.ca)
            joined.start()
            self.replicas.append(joined)

    def start_haproxy(self) -> None:
        config = self.root / "haproxy.cfg"
        config.write_text(moorage("lb", "haproxy", "--existing", self.replicas[0].url,
                                  "--bind", f"127.0.0.1:{self.lb.port}").stdout)
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self.haproxy = subprocess.Popen([haproxy, "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                                        stderr=open(self.root / "haproxy.log", "wb"), start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if request(self.lb, "GET", "/v2/", timeout=2.0)[0] in (200, 401):
                    time.sleep(1.5)  # let every health check pass once
                    return
            except (OSError, ssl.SSLError):
                pass
            time.sleep(0.2)
        raise BenchError("HAProxy did not start; see haproxy.log")

    def stop(self) -> None:
        if self.haproxy and self.haproxy.poll() is None:
            self.haproxy.terminate()
            self.haproxy.wait(timeout=10)
        for r in self.replicas:
            r.stop()


# -- workloads --------------------------------------------------------------------

def seed_pull_blob(cluster: Cluster) -> str:
    data = os.urandom(PULL_SIZE)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    status, _, _ = request(cluster.lb, "POST", f"/v2/bench/pull/blobs/uploads/?digest={digest}",
                           {"Content-Type": "application/octet-stream"}, data, timeout=120)
    if status != 201:
        raise BenchError(f"seeding the pull blob: HTTP {status}")
    return digest


def pulls(cluster: Cluster, digest: str) -> float:
    return curl_pull(cluster.lb, f"/v2/bench/pull/blobs/{digest}", STREAMS, PULL_SIZE)


def writes(cluster: Cluster, rnd: int) -> float:
    images = [Image.random(10) for _ in range(SMALL_IMAGES)]
    auth = repo_auth(cluster.lb, f"bench/w{rnd}")
    jobs = [lambda s, i=i, img=img: push_image_async(s, cluster.lb.url, f"bench/w{rnd}", f"t{i}", img, auth)
            for i, img in enumerate(images)]
    started = time.perf_counter()
    ops = asyncio.run(run_clients(jobs, CLIENTS, timeout=300, ssl_context=cluster.lb.ssl_context()))
    return ops / (time.perf_counter() - started)


def failover(cluster: Cluster) -> dict:
    """Kill one replica while clients read and write through HAProxy."""
    image = Image.random(2)
    auth = repo_auth(cluster.lb, "bench/fo")
    asyncio.run(run_clients([lambda s: push_image_async(s, cluster.lb.url, "bench/fo", "v1", image, auth)], 1, 60,
                            ssl_context=cluster.lb.ssl_context()))
    results: list[tuple[float, bool]] = []
    acked: list[tuple[str, bytes]] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            ok = False
            try:
                conn = http.client.HTTPSConnection("127.0.0.1", cluster.lb.port, timeout=5,
                                                   context=cluster.lb.ssl_context())
                conn.request("GET", "/v2/bench/fo/manifests/v1", headers={**auth, "Accept": OCI_MANIFEST})
                r = conn.getresponse()
                ok = r.status == 200 and r.read() == image.manifest
                conn.close()
            except OSError:
                pass
            results.append((time.monotonic(), ok))

    def writer() -> None:
        n = 0
        while not stop.is_set():
            data = os.urandom(512)
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            try:
                status, _, _ = request(cluster.lb, "POST", f"/v2/bench/fo/blobs/uploads/?digest={digest}",
                                       {"Content-Type": "application/octet-stream"}, data, timeout=10)
                if status == 201:
                    acked.append((digest, data))
            except OSError:
                pass
            n += 1

    threads = [threading.Thread(target=reader) for _ in range(3)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    victim = cluster.replicas[-1]
    killed_at = time.monotonic()
    os.killpg(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait()
    time.sleep(FAILOVER_SECONDS)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    after = [(t, ok) for t, ok in results if t >= killed_at]
    failed = [t for t, ok in after if not ok]
    lost = 0
    for digest, data in acked:
        status, _, body = request(cluster.lb, "GET", f"/v2/bench/fo/blobs/{digest}", timeout=10)
        lost += status != 200 or body != data
    return {"failover_seconds": (max(failed) - killed_at) if failed else 0.0,
            "requests_after_kill": len(after), "failed_requests": len(failed),
            "acknowledged_writes": len(acked), "lost_writes": lost}


# -- the run ------------------------------------------------------------------------

def measure(size: int, rounds: int, root: Path) -> dict:
    cluster = Cluster(root / f"n{size}", size)
    try:
        cluster.start_haproxy()
        digest = seed_pull_blob(cluster)
        pull = [pulls(cluster, digest) for _ in range(rounds)]
        write = [writes(cluster, r) for r in range(rounds)]
        result = {"pull_mib_s": statistics.median(pull), "write_ops_s": statistics.median(write)}
        if size > 1:
            result.update(failover(cluster))
        return result
    finally:
        cluster.stop()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, metavar="FILE")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="moorage-cluster-bench-"))
    try:
        one = measure(1, args.rounds, root)
        three = measure(3, args.rounds, root)
    except BenchError as e:
        print(f"bench failed: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    pull_ratio, write_ratio = three["pull_mib_s"] / one["pull_mib_s"], three["write_ops_s"] / one["write_ops_s"]
    rows = [
        ("pulls, 8 streams of 64 MiB", f"{one['pull_mib_s']:,.0f} MiB/s", f"{three['pull_mib_s']:,.0f} MiB/s",
         f"{pull_ratio:.2f}x", ">=1.5x", pull_ratio >= 1.5),
        ("small pushes, 8 clients", f"{one['write_ops_s']:,.0f} ops/s", f"{three['write_ops_s']:,.0f} ops/s",
         f"{write_ratio:.2f}x", ">=0.7x", write_ratio >= 0.7),
    ]
    print(f"\n{'scenario':<28} {'1 replica':>14} {'3 replicas':>14} {'ratio':>7} {'target':>7}  status")
    for name, a, b, ratio, target, met in rows:
        print(f"{name:<28} {a:>14} {b:>14} {ratio:>7} {target:>7}  {'met' if met else 'NOT met'}")
    print(f"\nfailover (3 replicas, one killed with SIGKILL under load through HAProxy):\n"
          f"  seconds until no more failed requests: {three['failover_seconds']:.2f} "
          f"({'met' if three['failover_seconds'] < 3 else 'NOT met'}: < 3 s)\n"
          f"  requests failed: {three['failed_requests']} of {three['requests_after_kill']} after the kill\n"
          f"  writes acknowledged: {three['acknowledged_writes']}, lost: {three['lost_writes']}")
    if args.json:
        args.json.write_text(json.dumps({"one": one, "three": three}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
