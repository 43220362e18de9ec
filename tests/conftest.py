"""Test harness: real `moorage serve` processes with their own etcd members.

Nothing here is mocked. Each `Registry` is a child process started exactly as a
user would start it, with its own data directory: on free loopback ports, or
on a host of its own (tests/hosts.py: a network namespace with the HA guide's
addresses and default ports) for anything that depends on addresses.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator

import httpx
import pytest

import hosts
from auth import BearerAuth, fetch_token, scopes_for
# The run's own housekeeping (tests/housekeeping.py): hooks pytest finds here, and `scratch`.
from housekeeping import pytest_collection_modifyitems, pytest_runtest_logreport, pytest_sessionstart, scratch  # noqa: F401
from moorage.cluster.replica import DRAIN_SECONDS

MOORAGE = [sys.executable, "-m", "moorage"]
ADMIN_PASSWORD = "test-admin-password"
# Every child replica and command gets the admin's credentials this way.
ENV = {**os.environ, "MOORAGE_ADMIN_PASSWORD": ADMIN_PASSWORD,
       "MOORAGE_USERNAME": "admin", "MOORAGE_PASSWORD": ADMIN_PASSWORD}


def _port_block() -> tuple[int, int]:
    """This test process's own ports: [start, end), below the kernel's ephemeral range.

    A port the kernel hands out for port 0 and that we release is free only until
    the next outgoing connection takes it as its source port (etcd, gRPC and HTTP
    clients make many): a replica then fails to start with its port in use. Ports
    below the ephemeral range are never given to outgoing connections, and each
    xdist worker takes its own block, so no other test process picks them either.
    """
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral = int(f.read().split()[0])
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    size = (ephemeral - PORTS_FROM) // max(workers, 1)
    return PORTS_FROM + index * size, PORTS_FROM + (index + 1) * size


PORTS_FROM = 10000
_START, _END = _port_block()
_ports = itertools.cycle(range(_START, _END))


def free_port() -> int:
    """A port no server holds, from this process's block (going round it again once spent)."""
    if _END - _START < 100:  # an ephemeral range that starts too low: ask the kernel
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    for _ in range(_END - _START):
        port = next(_ports)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue   # held by a server, or still in TIME_WAIT
            return port
    raise RuntimeError(f"no free port in {_START}-{_END}")


@dataclass
class Registry:
    """One replica: a `moorage serve` child process and its directories."""

    data_dir: Path
    storage_dir: Path | None = None
    port: int = field(default_factory=free_port)
    etcd_client_port: int = field(default_factory=free_port)
    etcd_peer_port: int = field(default_factory=free_port)
    extra_args: list[str] = field(default_factory=list)
    join: str | None = None  # URL of a replica of the cluster to join on the first start
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    trust: Path | None = None  # the CA clients trust, when not the cluster CA (an operator's certificate)
    on: hosts.Host | None = None  # its own host (network namespace); None: this machine's loopback
    wrapper: list[str] = field(default_factory=list)  # put before the command (e.g. faketime)
    listen: str | None = None  # --listen when not HOST:PORT (e.g. 0.0.0.0:5000)
    env: dict = field(default_factory=dict)  # more environment (an object store's AWS credentials)
    object_store: tuple | None = None  # (tests/seaweed.py's SeaweedFS, prefix) when the blobs are there
    # Every registry started so far, by URL: `moorage(..., "--existing", URL)`
    # trusts the CA of the one it names.
    started: ClassVar[dict[str, "Registry"]] = {}

    @property
    def ip(self) -> str:
        if self.on is None:
            return "127.0.0.1"
        self.on.network.require_client()
        return self.on.ip

    @property
    def host(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def tls(self) -> bool:
        return "--insecure-http" not in self.extra_args

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    @property
    def ca(self) -> Path:
        """The cluster CA (joined replicas hold the same one); also a valid skopeo --cert-dir."""
        return self.data_dir / "tls" / "ca.crt"

    @property
    def cert_dir(self) -> Path:
        return self.ca.parent

    def ssl_context(self) -> ssl.SSLContext:
        """Trusts this registry's cluster CA (or `trust`) and nothing else."""
        return ssl.create_default_context(cafile=str(self.trust or self.ca))

    def connection(self, timeout: float = 30) -> http.client.HTTPConnection:
        """A raw http.client connection, for requests httpx would rewrite."""
        if not self.tls:
            return http.client.HTTPConnection(self.ip, self.port, timeout=timeout)
        return http.client.HTTPSConnection(self.ip, self.port, timeout=timeout,
                                           context=self.ssl_context())

    @property
    def blob_dir(self) -> Path:
        return self.storage_dir or (self.data_dir / "blobs")

    def command(self) -> list[str]:
        joining = self.join is not None and not (self.data_dir / "replica.json").exists()
        cmd = MOORAGE + (["join", "--existing", self.join] if joining else ["serve"]) + [
            "--data-dir", str(self.data_dir),
            "--listen", self.listen or self.host,
            "--etcd-client-port", str(self.etcd_client_port),
            "--etcd-peer-port", str(self.etcd_peer_port),
        ]
        if self.storage_dir is not None:
            cmd += ["--storage-dir", str(self.storage_dir)]
        return cmd + self.extra_args

    def start(self, timeout: float = 30.0) -> "Registry":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        log = open(self.log_path, "ab")
        cmd = self.command()
        self.proc = subprocess.Popen(
            (self.on.run_prefix() if self.on else []) + self.wrapper + cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=cli_env(cmd, self.env),
            stdin=subprocess.DEVNULL,
        )
        self.wait_ready(timeout)
        Registry.started[self.url] = self  # once serving: a start that failed does not take over the URL
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"moorage exited with {self.proc.returncode}:\n{self.log()}")
            # A joining replica receives its CA while it starts; 401: auth is on.
            if not self.tls or (self.trust or self.ca).exists():
                try:
                    verify = self.ssl_context() if self.tls else True
                    if httpx.get(self.url + "/v2/", timeout=1.0, verify=verify).status_code in (200, 401):
                        return
                except (httpx.HTTPError, ssl.SSLError, OSError):
                    pass
            time.sleep(0.1)
        raise TimeoutError(f"moorage did not become ready:\n{self.log()}")

    def log(self) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-5000:]
        return ""

    def stop(self, timeout: float = DRAIN_SECONDS + 15) -> int | None:
        """SIGTERM (graceful drain) and wait; returns the exit code.

        The replica waits up to DRAIN_SECONDS for requests in flight (a client that sent a
        body's headers and stalled is one, until its idle timeout), then stops etcd: the wait
        here covers both, or a test that left a request hanging fails the teardown of another.
        """
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise

    def kill9(self) -> None:
        """SIGKILL the whole process group: the replica and its etcd member."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    @property
    def replica_id(self) -> str:
        import json
        return json.loads((self.data_dir / "replica.json").read_text())["replica_id"]

    def restart(self) -> "Registry":
        self.stop()
        return self.start()

    def authorization(self, method: str, path: str, user: str | None = "admin",
                      password: str | None = None) -> str:
        """An `Authorization` header with a token for the request, for raw http.client requests."""
        scopes = scopes_for(method, path.split("?")[0], httpx.URL(path).params)
        if user == "admin" and password is None:
            password = ADMIN_PASSWORD
        with self.client(auth=None) as c:
            r = fetch_token(c, scopes, user, password)
        assert r.status_code == 200, (r.status_code, r.text)
        return f"Bearer {r.json()['token']}"

    def etcd_client(self):
        """A client of this replica's etcd member (on this machine's loopback), with its node
        certificate; the caller closes it."""
        from moorage.cluster.etcd_member import node_tls
        from moorage.meta.etcd import EtcdClient
        return EtcdClient(f"127.0.0.1:{self.etcd_client_port}", node_tls(self.data_dir))

    def client(self, user: str | None = "admin", password: str | None = None, **kw) -> httpx.Client:
        """An HTTP client for this registry, trusting its CA (pass verify= to override).

        It authenticates as `user` (default: admin; None: anonymous) the way
        docker does: Bearer tokens fetched with Basic credentials on a 401
        challenge (tests/auth.py). Pass auth= to do something else.
        """
        if "auth" not in kw:
            if user == "admin" and password is None:
                password = ADMIN_PASSWORD
            kw["auth"] = BearerAuth(user, password)
        kw.setdefault("timeout", 30.0)
        kw.setdefault("verify", self.ssl_context() if self.tls else True)
        return httpx.Client(base_url=self.url, **kw)


def cli_env(args, env: dict | None = None) -> dict:
    """ENV for a `moorage` command: trusts the CA of the registry after `--existing`."""
    out = {**ENV, **(env or {})}
    args = list(args)
    if "MOORAGE_CA_CERT" not in (env or {}) and "--existing" in args[:-1]:
        registry = Registry.started.get(args[args.index("--existing") + 1].rstrip("/"))
        if registry is not None and registry.tls:
            out["MOORAGE_CA_CERT"] = str(registry.ca)
    return out


def moorage(*args: str, timeout: float = 60, check: bool = True, env: dict | None = None,
            on: hosts.Host | None = None) -> subprocess.CompletedProcess:
    """Run a `moorage` command as a user would, with the admin's credentials in the environment
    (`on`: on that host, e.g. a replica's own for emergency-repair)."""
    out = subprocess.run((on.run_prefix() if on else []) + MOORAGE + list(args), capture_output=True,
                         text=True, timeout=timeout,
                         env=cli_env(args, env), stdin=subprocess.DEVNULL)
    if check:
        assert out.returncode == 0, f"moorage {' '.join(args)} exited {out.returncode}:\n{out.stderr}"
    return out


@pytest.fixture(scope="session")
def registry(request) -> Iterator[Registry]:
    """One shared replica for tests that do not restart or kill it."""
    reg = Registry(scratch(request, "shared") / "data").start()
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def object_store(request):
    """One SeaweedFS for the run (tests/seaweed.py), started when a test first needs it."""
    from seaweed import SeaweedFS  # seaweed.py imports this module

    store = SeaweedFS(scratch(request, "objects")).start()
    yield store
    store.cleanup()


@pytest.fixture(scope="session")
def s3_registry(object_store, request) -> Iterator[Registry]:
    """A shared replica with its blobs in the run's SeaweedFS. Blob GETs stream through it
    (storage.redirect off), so that the spec modules' Range and body checks hold as written;
    tests/test_s3.py checks the redirects."""
    store = ObjectStore.on(object_store, "shared", "--s3-redirect=false")
    reg = Registry(scratch(request, "shared-s3") / "data", env=store.env, extra_args=store.args).start()
    yield reg
    reg.stop()


@pytest.fixture
def fresh_s3_registry(tmp_path, object_store) -> Iterator[Registry]:
    """A replica of the test's own on a prefix of the run's SeaweedFS (`object_store` names both)."""
    import uuid

    prefix = f"fresh-{uuid.uuid4().hex[:8]}"
    store = ObjectStore.on(object_store, prefix)
    reg = Registry(tmp_path / "data", extra_args=store.args, env=store.env,
                   object_store=(object_store, prefix)).start()
    yield reg
    if reg.proc and reg.proc.poll() is None:
        reg.kill9()


# The blob drivers a test about blobs runs on; the S3 variant is in the `s3` area too.
DRIVERS = ["filesystem", pytest.param("s3", marks=pytest.mark.s3)]


@pytest.fixture(params=DRIVERS)
def fresh_registry_each_driver(request) -> Registry:
    """`fresh_registry`, then `fresh_s3_registry`: for what a test says of blobs on either driver."""
    return request.getfixturevalue("fresh_registry" if request.param == "filesystem" else "fresh_s3_registry")


def stored_blobs(reg: Registry) -> dict[str, bytes]:
    """Every blob the replica's storage holds (hex digest -> its bytes): files under the blob
    directory, or objects under blobs/ in its bucket: at a content address, or at an upload's
    own key (blobs/u/<upload id>, named by the hex digest of what it holds). A digest held
    twice (a writer's object left beside the record's) fails."""
    import hashlib
    import re

    if reg.object_store is not None:
        store, prefix = reg.object_store
        s3 = store.client(timeout=30.0)
        found = {}
        try:
            for key in store.objects(prefix):
                if key.startswith(("blobs/sha256/", "blobs/u/")):
                    data = s3.get_object(Bucket=store.bucket, Key=f"{prefix}/{key}")["Body"].read()
                    name = key.rsplit("/", 1)[1] if key.startswith("blobs/sha256/") else hashlib.sha256(data).hexdigest()
                    assert name not in found, f"two objects hold the digest {name}"
                    found[name] = data
            return found
        finally:
            s3.close()
    # Anywhere under the directory, so that a torn write under some other name is seen too.
    hex64, found = re.compile(r"[0-9a-f]{64}"), {}
    for path in reg.blob_dir.rglob("*"):
        if path.is_file() and hex64.fullmatch(path.name):
            name = path.name
        elif path.is_file() and path.name == "data" and hex64.fullmatch(path.parent.name):
            name = path.parent.name
        else:
            continue
        assert name not in found, f"two files are named by the digest {name}"
        found[name] = path.read_bytes()
    return found


def on_both_drivers(request, registry: Registry) -> Registry:
    """For a module's `registry` fixture parametrized over ["filesystem", "s3"]: the run's shared
    replica of that driver."""
    return registry if request.param == "filesystem" else request.getfixturevalue("s3_registry")


@pytest.fixture
def fresh_registry(tmp_path) -> Iterator[Registry]:
    """A replica of the test's own, free to be restarted or killed."""
    reg = Registry(tmp_path / "data").start()
    yield reg
    if reg.proc and reg.proc.poll() is None:
        reg.kill9()


@pytest.fixture
def client(registry) -> Iterator[httpx.Client]:
    with registry.client() as c:
        yield c


def on_host(host: hosts.Host, data_dir: Path, **kw) -> Registry:
    """A replica on a host of its own, on the default ports as the HA guide runs them."""
    return Registry(data_dir, on=host, port=5000, etcd_client_port=2379, etcd_peer_port=2380, **kw)


class Cluster:
    """Replicas sharing one storage directory: on loopback, or with `network`, replica i
    on host registry-(i+1) at 10.0.0.(11+i) on the guide's default ports, one host each."""

    def __init__(self, root, network: hosts.Network | None = None, object_store: "ObjectStore | None" = None):
        self.root = root
        self.storage = root / "blobs"
        self.network = network
        # Blobs in an object store instead: no shared directory at all; the first replica names
        # the store, the others learn it when they join, and every one has the credentials.
        self.object_store = object_store
        self.replicas: list[Registry] = []

    def new(self, first: bool = False, **kw) -> Registry:
        i = len(self.replicas)
        if self.object_store is not None:
            kw.setdefault("env", self.object_store.env)
            if first:
                kw["extra_args"] = self.object_store.args + kw.get("extra_args", [])
        else:
            kw["storage_dir"] = self.storage
        if self.network is not None:
            return on_host(self.network.host(f"registry-{i + 1}", f"10.0.0.{11 + i}"), self.root / f"r{i}", **kw)
        return Registry(self.root / f"r{i}", **kw)

    def start_first(self) -> Registry:
        first = self.new(first=True).start()
        self.replicas.append(first)
        return first

    def join(self, via: Registry | None = None) -> Registry:
        via = via or next(r for r in self.replicas if r.proc and r.proc.poll() is None)
        new = self.new(join=via.url)
        new.start(timeout=90)
        self.replicas.append(new)
        return new

    def start_three(self) -> "Cluster":
        """A first replica and two that `moorage join` it."""
        first = self.start_first()
        self.join(first)
        self.join(first)
        return self

    def status(self, via: Registry) -> dict:
        return json.loads(moorage("status", "--existing", via.url, "--json").stdout)

    def stop(self) -> None:
        for r in self.replicas:
            if r.proc and r.proc.poll() is None:
                r.kill9()


@pytest.fixture
def cluster(tmp_path) -> Iterator[Cluster]:
    """An empty cluster on loopback; `start_first()` then `join()` replicas into it."""
    c = Cluster(tmp_path)
    yield c
    c.stop()


@pytest.fixture
def network() -> Iterator[hosts.Network]:
    """A network of separate hosts; the test runs on its client host (tests/hosts.py)."""
    with hosts.network() as net:
        yield net


@pytest.fixture
def hosts_cluster(tmp_path, network) -> Iterator[Cluster]:
    """An empty cluster whose replicas each run on a host of their own; a module that
    depends on addresses names it `cluster` (`three` then builds on it)."""
    c = Cluster(tmp_path, network)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def net() -> Iterator[hosts.Network]:
    """A network of separate hosts for a whole module (its cluster of three serves several tests)."""
    with hosts.network() as n:
        yield n


@pytest.fixture(scope="module")
def trio(net, request) -> Iterator[Cluster]:
    """Three replicas made with `moorage join`, each on a host of its own, for a whole module."""
    c = Cluster(scratch(request, "trio"), net)
    try:
        yield c.start_three()
    finally:
        c.stop()


@pytest.fixture
def three(cluster) -> Cluster:
    """A cluster of three replicas made with `moorage join`."""
    return cluster.start_three()


@pytest.fixture
def three_s3(tmp_path, object_store) -> Iterator[Cluster]:
    """Three replicas made with `moorage join`, their blobs in a prefix of the run's SeaweedFS
    and no shared directory."""
    import uuid

    c = Cluster(tmp_path, object_store=ObjectStore.on(object_store, f"three-{uuid.uuid4().hex[:8]}"))
    try:
        yield c.start_three()
    finally:
        c.stop()


@dataclass
class ObjectStore:
    """How replicas reach a bucket: `serve`'s flags for it and the AWS variables they need."""

    args: list[str]
    env: dict

    @classmethod
    def on(cls, store, prefix: str, *extra: str) -> "ObjectStore":
        """A prefix of a SeaweedFS's bucket (tests/seaweed.py), with its identity's variables."""
        return cls(["--storage", f"s3://{store.bucket}/{prefix}", "--s3-endpoint", store.endpoint,
                    "--s3-path-style", *extra], {**store.env, "AWS_EC2_METADATA_DISABLED": "true"})


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def terminate(proc: subprocess.Popen, timeout: float = 30) -> int:
    """SIGTERM, a graceful stop's chance, then SIGKILL; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
