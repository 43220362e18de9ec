"""Test harness: real `moorage serve` processes with their own etcd members.

Nothing here is mocked. Each `Registry` is a child process started exactly as a
user would start it, on free loopback ports, with its own data directory.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx
import pytest

MOORAGE = [sys.executable, "-m", "moorage"]
ADMIN_PASSWORD = "test-admin-password"
# Every child replica and command gets the admin's credentials this way.
ENV = {**os.environ, "MOORAGE_ADMIN_PASSWORD": ADMIN_PASSWORD,
       "MOORAGE_USERNAME": "admin", "MOORAGE_PASSWORD": ADMIN_PASSWORD}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def blob_dir(self) -> Path:
        return self.storage_dir or (self.data_dir / "blobs")

    def command(self) -> list[str]:
        joining = self.join is not None and not (self.data_dir / "replica.json").exists()
        cmd = MOORAGE + (["join", "--existing", self.join] if joining else ["serve"]) + [
            "--data-dir", str(self.data_dir),
            "--listen", self.host,
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
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=ENV,
            stdin=subprocess.DEVNULL,
        )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"moorage exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/v2/", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"moorage did not become ready:\n{self.log()}")

    def log(self) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-5000:]
        return ""

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (graceful drain) and wait; returns the exit code."""
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

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 30.0), **kw)


def moorage(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    """Run a `moorage` command as a user would, with the admin's credentials in the environment."""
    out = subprocess.run(MOORAGE + list(args), capture_output=True, text=True, timeout=timeout, env=ENV,
                         stdin=subprocess.DEVNULL)
    if check:
        assert out.returncode == 0, f"moorage {' '.join(args)} exited {out.returncode}:\n{out.stderr}"
    return out


@pytest.fixture(scope="session")
def registry(tmp_path_factory) -> Iterator[Registry]:
    """One shared replica for tests that do not restart or kill it."""
    reg = Registry(tmp_path_factory.mktemp("shared") / "data").start()
    yield reg
    reg.stop()


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


class Cluster:
    def __init__(self, root):
        self.root = root
        self.storage = root / "blobs"
        self.replicas: list[Registry] = []

    def start_first(self) -> Registry:
        first = Registry(self.root / "r0", storage_dir=self.storage).start()
        self.replicas.append(first)
        return first

    def join(self, via: Registry | None = None) -> Registry:
        via = via or next(r for r in self.replicas if r.proc and r.proc.poll() is None)
        new = Registry(self.root / f"r{len(self.replicas)}", storage_dir=self.storage, join=via.url)
        new.start(timeout=90)
        self.replicas.append(new)
        return new

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
def three(cluster) -> Cluster:
    """A cluster of three replicas made with `moorage join`."""
    first = cluster.start_first()
    cluster.join(first)
    cluster.join(first)
    return cluster


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
