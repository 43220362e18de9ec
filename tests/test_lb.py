"""`moorage lb haproxy` with a real HAProxy in front of real replicas.

Each test runs `moorage lb haproxy --watch` as a child process exactly as an
operator would, on a free loopback port, and talks to the cluster only
through it: kills, removals and joins happen underneath while clients push
and pull.

The replicas run on hosts of their own (tests/hosts.py); HAProxy runs on the
test's client host and binds its loopback. HAProxy passes TLS through (mode
tcp): clients speak HTTPS to the replicas themselves and trust the cluster CA,
and the load balancer's address (127.0.0.1) is one every replica certificate
covers. The guide's test runs HAProxy on a host of its own under its name.
"""

from __future__ import annotations

import csv
import io
import json
import random
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from auth import BearerAuth
from conftest import (ADMIN_PASSWORD, DRIVERS, MOORAGE, Cluster, Registry, cli_env, free_port, moorage, terminate,
                      wait_for)
from layout import Layout, LayoutImage
from moorage.cluster import haproxy, pki
from oci import OCI_MANIFEST, Image, make_image, new_repo, pull_blob, pull_manifest, push_image, sha256
from test_skopeo import skopeo

pytestmark = pytest.mark.lb


@pytest.fixture
def cluster(hosts_cluster: Cluster) -> Cluster:
    """Each replica on a host of its own (conftest's `three` builds on this)."""
    return hosts_cluster

HAPROXY = "/usr/sbin/haproxy"
RETRY_PAUSE = 0.5


# --------------------------------------------------------------------------- helpers


class LoadBalancer:
    """A `moorage lb haproxy --watch` child process and the HAProxy it runs."""

    def __init__(self, root: Path, existing: Registry):
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"https://{self.host}"
        self.registry = existing  # whose cluster CA clients trust
        self.config = root / "haproxy.cfg"
        self.log_path = root / "lb.log"
        args = ["lb", "haproxy", "--watch", "--existing", existing.url, "--output", str(self.config),
                "--bind", self.host]
        self.proc = subprocess.Popen(
            MOORAGE + args, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT, env=cli_env(args),
            stdin=subprocess.DEVNULL)
        wait_for(lambda: self._serving(), 30, f"HAProxy to serve:\n{self.log()}")

    def client(self, cls: type[httpx.Client] = httpx.Client, **kw) -> httpx.Client:
        """A client of the registry through HAProxy: trusts the cluster CA, authenticates as admin."""
        return cls(base_url=self.url, timeout=30, verify=self.registry.ssl_context(),
                   auth=BearerAuth("admin", ADMIN_PASSWORD), **kw)

    def _serving(self) -> bool:
        assert self.proc.poll() is None, f"lb exited {self.proc.returncode}:\n{self.log()}"
        try:
            return httpx.get(self.url + "/v2/", timeout=2, verify=self.registry.ssl_context()
                             ).status_code in (200, 401)
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    def servers(self) -> dict[str, dict[str, str]]:
        """HAProxy's own view (`show stat` on the stats socket): replica id -> its row."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(f"{self.config}.sock")
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        rows = csv.DictReader(io.StringIO(data.decode().removeprefix("# ")))
        return {r["svname"]: r for r in rows
                if r["pxname"] == "replicas" and r["svname"] not in ("FRONTEND", "BACKEND")}

    def up(self) -> set[str]:
        return {name for name, row in self.servers().items() if row["status"].startswith("UP")}

    def stop(self) -> int:
        return terminate(self.proc)


@pytest.fixture
def lb_factory(tmp_path) -> Iterator:
    made: list[LoadBalancer] = []

    def make(existing: Registry) -> LoadBalancer:
        made.append(LoadBalancer(tmp_path, existing))
        return made[-1]
    yield make
    for lb in made:
        code = lb.stop()
        assert code == 0, f"lb exited {code}:\n{lb.log()}"
        assert "HAProxy stopped" in lb.log()


class CountingClient(httpx.Client):
    """An HTTP client that counts its requests and failures (transport errors, 5xx) and, as
    real clients do, retries a failed request once, after a short pause (docker and
    containers/image back off before retrying). The failure is counted before the retry.

    The pause matters with TLS passthrough: a connection HAProxy hands to a replica in
    the instant it dies (its kernel still completing handshakes) cannot be redispatched
    once established, so an immediate retry can meet the same dying replica; HAProxy
    marks it down within a fraction of a second."""

    def __init__(self, tally: "Tally", **kw):
        super().__init__(**kw)
        self.tally = tally

    def request(self, method: str, url, **kw) -> httpx.Response:  # type: ignore[override]
        for attempt in range(2):
            self.tally.add(requests=1)
            try:
                r = super().request(method, url, **kw)
            except httpx.TransportError as e:
                self.tally.add(failures=1, note=f"{method} {url}: {type(e).__name__}")
                if attempt:
                    raise
                time.sleep(RETRY_PAUSE)
                continue
            if r.status_code < 500 or attempt:
                if r.status_code >= 500:
                    self.tally.add(failures=1, note=f"{method} {url}: {r.status_code}")
                return r
            self.tally.add(failures=1, note=f"{method} {url}: {r.status_code} {r.text[:120]}")
            time.sleep(RETRY_PAUSE)
        raise AssertionError("unreachable")


@dataclass
class Tally:
    requests: int = 0
    failures: int = 0
    notes: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, requests: int = 0, failures: int = 0, note: str = "") -> None:
        with self.lock:
            self.requests += requests
            self.failures += failures
            if note:
                self.notes.append(f"{time.monotonic():.2f} {note}")


class Load:
    """Clients pushing and pulling through the load balancer until told to stop."""

    def __init__(self, lb: LoadBalancer, layout: Layout, images: list[LayoutImage]):
        self.lb, self.layout, self.images = lb, layout, images
        self.tally = Tally()
        self.stop = threading.Event()
        self.pushed: list[tuple[str, str, Image]] = []  # acknowledged HTTP pushes
        self.copied: list[tuple[str, LayoutImage]] = []  # acknowledged skopeo pushes: (ref, image)
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._guard, args=(f,), daemon=True)
                        for f in (self._push, self._push, self._pull, self._skopeo)]

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)
        assert not any(t.is_alive() for t in self.threads), "a client thread hung"

    def _guard(self, work) -> None:
        try:
            work()
        except Exception as e:  # an unretried failure: counted by the tally, kept for the report
            self.errors.append(f"{work.__name__}: {type(e).__name__}: {e}"[:300])

    def _client(self) -> CountingClient:
        return self.lb.client(CountingClient, tally=self.tally)

    def _push(self) -> None:
        repo = new_repo("lb")
        with self._client() as c:
            for i in range(10_000):
                if self.stop.is_set():
                    return
                try:
                    image = push_image(c, repo, f"t{i}", make_image(n_layers=2, layer_size=4096))
                except (AssertionError, httpx.HTTPError) as e:  # failed twice: not acknowledged
                    self.errors.append(f"push {repo}:t{i}: {e}"[:300])
                    continue
                self.pushed.append((repo, f"t{i}", image))

    def _pull(self) -> None:
        rng = random.Random()
        with self._client() as c:
            for _ in range(100_000):
                if self.stop.is_set():
                    return
                if not self.pushed:
                    time.sleep(0.05)
                    continue
                repo, tag, image = rng.choice(self.pushed)
                try:
                    assert pull_manifest(c, repo, tag) == image.manifest
                    for layer in image.layers:
                        pull_blob(c, repo, sha256(layer))
                except (AssertionError, httpx.HTTPError) as e:
                    self.errors.append(f"pull {repo}:{tag}: {e}"[:300])

    def _skopeo(self) -> None:
        repo = new_repo("lbskopeo")
        for i in range(1000):
            if self.stop.is_set():
                return
            image = self.images[i % len(self.images)]
            ref = f"{self.lb.host}/{repo}:c{i}"
            for attempt in range(2):
                self.tally.add(requests=1)
                out = skopeo("copy", "--dest-cert-dir", str(self.lb.registry.cert_dir),
                             f"oci:{self.layout.path}:i{i % len(self.images)}", f"docker://{ref}",
                             timeout=60, check=False)
                if out.returncode == 0:
                    self.copied.append((ref, image))
                    break
                self.tally.add(failures=1, note=f"skopeo copy {ref}: {out.stderr.strip()[-200:]}")


def build_layout(root: Path, count: int) -> tuple[Layout, list[LayoutImage]]:
    layout, rng = Layout(root / "layout"), random.Random(7)
    images = []
    for i in range(count):
        image = layout.image(rng, n_layers=2, max_file=16 * 1024)
        layout.tag(f"i{i}", OCI_MANIFEST, image.manifest)
        images.append(image)
    return layout, images


def assert_all_pull_back(lb: LoadBalancer, load: Load) -> None:
    """Every acknowledged push, HTTP or skopeo, is there byte for byte."""
    with lb.client() as c:
        for repo, tag, image in load.pushed:
            assert pull_manifest(c, repo, tag) == image.manifest, (repo, tag)
            assert pull_blob(c, repo, sha256(image.config)) == image.config
            for layer in image.layers:
                assert pull_blob(c, repo, sha256(layer)) == layer
        for ref, limage in load.copied:
            repo, tag = ref.split("/", 1)[1].rsplit(":", 1)
            assert pull_manifest(c, repo, tag) == limage.manifest, ref
            for blob in (limage.config, *limage.layers):
                assert pull_blob(c, repo, sha256(blob)) == blob


def time_until_down(lb: LoadBalancer, replica_id: str, since: float, timeout: float = 15) -> float:
    """Seconds from `since` until HAProxy holds `replica_id` out of the pool."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = lb.servers()[replica_id]["status"]
        if status.startswith(("DOWN", "MAINT")):
            return time.monotonic() - since
        time.sleep(0.02)
    raise AssertionError(f"HAProxy still sends to {replica_id} after {timeout}s: {lb.servers()}")


# --------------------------------------------------------------------------- tests


def test_render_is_a_pure_function_of_the_replicas():
    status = {"replicas": [
        {"id": "bb", "url": "http://10.0.0.2:5000/"}, {"id": "aa", "url": "http://10.0.0.1:5000"},
        {"id": "(joining)", "url": None}, {"id": "cc", "url": "https://reg-3.example:5443"}]}
    found = haproxy.backends(status)
    assert [b.replica_id for b in found] == ["aa", "bb", "cc"]
    text = haproxy.render(found, haproxy.Options(bind="127.0.0.1:8080"))
    assert text == haproxy.render(list(reversed(found)), haproxy.Options(bind="127.0.0.1:8080"))
    assert "    server aa 10.0.0.1:5000\n    server bb 10.0.0.2:5000\n" in text
    # TLS passes through to the replicas; only the health check speaks TLS, verifying the
    # certificate (against the system's store unless a CA file is given) and its name.
    assert "server cc reg-3.example:5443 check-ssl verify required ca-file @system-ca " \
           "check-sni reg-3.example\n" in text
    assert "mode tcp" in text and "mode http" not in text and " ssl " not in text
    assert "bind 127.0.0.1:8080" in text and "stats socket" not in text
    assert "balance leastconn" in text and "on-marked-down shutdown-sessions" in text
    assert "uri /_ping ver" in text and "uri /_ping?reads=1 ver" in text
    for line in text.splitlines():  # bounded: every timeout has a value
        if line.strip().startswith("timeout "):
            assert len(line.split()) == 3, line
    # With the cluster CA; an IP address cannot be matched by HAProxy, the chain to the CA is the check.
    tls = [haproxy.Backend("dd", "https://10.0.0.4:5000")]
    text = haproxy.render(tls, haproxy.Options(ca_file="/etc/haproxy/moorage-ca.crt"))
    assert "server dd 10.0.0.4:5000 check-ssl verify required ca-file /etc/haproxy/moorage-ca.crt\n" in text
    text = haproxy.render(tls, haproxy.Options(verify_tls=False))
    assert "server dd 10.0.0.4:5000 check-ssl verify none\n" in text
    assert haproxy.check_bind("[::1]:5000") == "::1:5000" and haproxy.check_bind(":5000") == ":5000"
    for bad in ("5000", "host:", "host:99999", "a b:1", "host:80\n"):
        with pytest.raises(haproxy.ConfigError):
            haproxy.check_bind(bad)
    # Addresses come over the network: nothing but a name and an address gets into the file.
    for rid, url in (("aa", "http://x;global:80"), ("aa", "http://x y:80"), ("aa", "ftp://x:1"),
                     ("aa", "http://x:port"), ("a a", "http://x:1"), ("aa\nbackend", "http://x:1")):
        with pytest.raises(haproxy.ConfigError):
            haproxy.render([haproxy.Backend(rid, url)])


def test_printed_config_is_valid_and_lists_every_replica(three, tmp_path):
    a, b, c = three.replicas
    bind = f"127.0.0.1:{free_port()}"
    out = moorage("lb", "haproxy", "--existing", b.url, "--bind", bind).stdout
    path = tmp_path / "printed.cfg"
    path.write_text(out)
    check = subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    for r in three.replicas:
        assert f"server {r.replica_id} {r.host}" in out
    assert "httpchk" in out and "uri /_ping" in out and "option redispatch" in out
    # HAProxy checks the replicas against the cluster CA the command trusted ($MOORAGE_CA_CERT here).
    assert out.count(f"check-ssl verify required ca-file {b.ca}\n") == 2 * len(three.replicas), out
    # --output writes the same text to a file, whichever replica is asked.
    moorage("lb", "haproxy", "--existing", a.url, "--bind", bind, "--output", str(tmp_path / "o.cfg"),
            env={"MOORAGE_CA_CERT": str(b.ca)})
    assert (tmp_path / "o.cfg").read_text() == out
    # Trust by fingerprint: the CA it fetched and checked is written next to the configuration.
    fingerprint = pki.fingerprint(a.ca.read_bytes())
    no_ca = {"MOORAGE_CA_CERT": ""}
    moorage("lb", "haproxy", "--existing", a.url, "--bind", bind, "--ca-fingerprint", fingerprint,
            "--output", str(tmp_path / "f.cfg"), env=no_ca)
    written = tmp_path / "f.cfg.ca.crt"
    assert written.read_bytes() == a.ca.read_bytes()
    assert f"ca-file {written}\n" in (tmp_path / "f.cfg").read_text()
    check = subprocess.run([HAPROXY, "-c", "-f", str(tmp_path / "f.cfg")], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    bad = moorage("lb", "haproxy", "--existing", a.url, "--ca-fingerprint", fingerprint, env=no_ca, check=False)
    assert bad.returncode == 1 and "--ca-cert FILE, or --output FILE" in bad.stderr, bad.stderr
    bad = moorage("lb", "haproxy", "--existing", a.url, "--bind", "nowhere", check=False)
    assert bad.returncode == 1 and "--bind takes HOST:PORT" in bad.stderr and "Traceback" not in bad.stderr
    bad = moorage("lb", "haproxy", "--existing", a.url, "--watch", check=False)
    assert bad.returncode == 1 and "--watch needs --output" in bad.stderr


@pytest.fixture(params=DRIVERS)
def trio(request) -> Cluster:
    """Three replicas on either blob driver: a shared directory, or a bucket and nothing shared."""
    return request.getfixturevalue("three" if request.param == "filesystem" else "three_s3")


def test_clients_push_and_pull_through_a_replica_kill(trio, lb_factory, tmp_path):
    three = trio
    a, b, c = three.replicas
    lb = lb_factory(a)
    wait_for(lambda: lb.up() == {r.replica_id for r in three.replicas}, 10, "every replica UP")
    layout, images = build_layout(tmp_path, 4)
    with Load(lb, layout, images) as load:
        time.sleep(3)
        before = load.tally.requests
        killed_at = time.monotonic()
        b.kill9()
        down_after = time_until_down(lb, b.replica_id, killed_at)
        time.sleep(5)
    failed = load.tally.failures
    print(f"\nfailover: HAProxy took {b.replica_id} out {down_after:.2f}s after kill -9; "
          f"{failed} of {load.tally.requests} requests failed before retry ({before} before the kill); "
          f"{len(load.pushed)} HTTP pushes and {len(load.copied)} skopeo copies acknowledged")
    for note in load.tally.notes:
        print("  failed:", note)
    assert load.tally.requests > 200 and load.pushed and load.copied, (load.tally, load.errors)
    assert failed < 0.01 * load.tally.requests, (failed, load.tally.requests, load.tally.notes)
    assert not load.errors, load.errors
    assert_all_pull_back(lb, load)
    table = moorage("status", "--existing", a.url).stdout
    assert "tolerates 0 more" in table, table
    dead = next(line for line in table.splitlines() if line.startswith(b.replica_id))
    assert "healthy" not in dead.split()[2:3], table
    assert b.replica_id not in lb.up()


def test_watch_follows_remove_and_join(three, lb_factory):
    a, b, c = three.replicas
    lb = lb_factory(a)
    wait_for(lambda: lb.up() == {r.replica_id for r in three.replicas}, 10, "every replica UP")
    moorage("remove", "--existing", a.url, "--replica-id", c.replica_id)
    wait_for(lambda: c.replica_id not in lb.config.read_text(), 10, f"{c.replica_id} to leave the file")
    wait_for(lambda: c.replica_id not in lb.servers(), 10, f"{c.replica_id} to leave HAProxy's pool")
    fresh = three.join(b)
    wait_for(lambda: fresh.replica_id in lb.config.read_text(), 10, f"{fresh.replica_id} in the file")
    wait_for(lambda: fresh.replica_id in lb.up(), 10, f"{fresh.replica_id} UP in HAProxy")
    assert f"server {fresh.replica_id} {fresh.host}" in lb.config.read_text()
    # Requests reach the new replica: HAProxy counts what it sent there. Passthrough balances
    # connections (leastconn, ties in turn), so each push comes on a connection of its own.
    repo = new_repo("lbjoin")
    images = []
    for i in range(6):
        with lb.client() as client:
            images.append(push_image(client, repo, f"t{i}"))
    with lb.client() as client:
        for i, image in enumerate(images):
            assert pull_manifest(client, repo, f"t{i}") == image.manifest
    assert int(lb.servers()[fresh.replica_id]["stot"]) > 0, lb.servers()[fresh.replica_id]
    log = lb.log()
    assert f"-{c.replica_id}" in log and f"+{fresh.replica_id}" in log, log
    assert log.count("HAProxy started") == 1, log  # reloaded, never restarted


def test_five_replicas_survive_two_kills_through_the_lb(cluster: Cluster, lb_factory):
    first = cluster.start_first()
    for _ in range(4):
        cluster.join(first)
    r = cluster.replicas
    lb = lb_factory(first)
    wait_for(lambda: len(lb.up()) == 5, 10, "five replicas UP")
    repo = new_repo("lbfive")
    with lb.client() as client:
        before = [push_image(client, repo, f"b{i}") for i in range(3)]
    # One of the two is the replica the watcher was pointed at: it must carry on through the others.
    killed_at = time.monotonic()
    first.kill9()
    # No traffic now, so only the health checks can notice (traffic notices sooner: see above).
    idle = time_until_down(lb, first.replica_id, killed_at)
    print(f"\nidle failover: HAProxy took {first.replica_id} out {idle:.2f}s after kill -9")
    r[3].kill9()
    wait_for(lambda: lb.up() == {x.replica_id for x in (r[1], r[2], r[4])}, 10, "the dead two out")
    tally = Tally()
    with lb.client(CountingClient, tally=tally) as client:
        after = [push_image(client, repo, f"a{i}") for i in range(5)]
        for i, image in enumerate(before):
            assert pull_manifest(client, repo, f"b{i}") == image.manifest
            for layer in image.layers:
                assert pull_blob(client, repo, sha256(layer)) == layer
        for i, image in enumerate(after):
            assert pull_manifest(client, repo, f"a{i}") == image.manifest
    # Killing the etcd leader costs an election: a write in that window gets a clear 503 and
    # the client's one retry succeeds (push_image asserted every acknowledgement).
    print(f"\nafter two kills: {tally.failures} of {tally.requests} requests failed before retry", tally.notes)
    assert tally.failures < 0.1 * tally.requests, tally.notes
    status = json.loads(moorage("status", "--existing", r[1].url, "--json").stdout)
    assert status["voters"] == 5 and status["healthy"] == 3 and status["tolerates"] == 0, status
    # The watcher still follows the cluster without its --existing replica.
    moorage("remove", "--existing", r[2].url, "--replica-id", r[3].replica_id)
    wait_for(lambda: r[3].replica_id not in lb.config.read_text(), 15, "the removed replica to leave the file")


def test_without_quorum_pulls_still_go_through_the_lb(cluster: Cluster, lb_factory):
    """Every replica fails /_ping without quorum; HAProxy then falls back to the
    `degraded` backend: pulls of what the replicas know go on, and writes get the
    replicas' own 503 that names the cause."""
    first = cluster.start_first()
    second = cluster.join(first)
    lb = lb_factory(first)
    wait_for(lambda: len(lb.up()) == 2, 10, "two replicas UP")
    repo = new_repo("lbnoquorum")
    with lb.client() as client:
        image = push_image(client, repo, "v1")
    second.kill9()
    wait_for(lambda: not lb.up(), 15, "the pool to empty as quorum is lost")
    with lb.client() as client:
        for _ in range(5):
            assert pull_manifest(client, repo, "v1") == image.manifest
            for layer in image.layers:
                assert pull_blob(client, repo, sha256(layer)) == layer
        r = client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": sha256(b"x")}, content=b"x")
        assert r.status_code == 503, (r.status_code, r.text)
        assert "quorum" in r.json()["errors"][0]["message"]
