#!/usr/bin/env python3
"""Moorage against the reference registry (CNCF distribution), same workload.

Both registries run side by side on loopback. Every scenario runs on registry A,
then on registry B, for several rounds, so that drift of the machine (page
cache, writeback, thermal state) hits both alike; the table reports medians and
the ratio Moorage / distribution against the project's targets.

Usage: bench/bench.py [--quick] [--only moorage|distribution] [--json FILE]

Nothing here talks to anything but 127.0.0.1. Every subprocess and network call
has a timeout, so a dead server turns into an error in its row, never a hang.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import urljoin, urlsplit

import aiohttp
import yarl

MiB = 1 << 20
NET_TIMEOUT = 60.0          # one HTTP request, including a 256 MiB body
START_TIMEOUT = 60.0        # a registry (and etcd) becoming ready
STOP_TIMEOUT = 20.0         # graceful SIGTERM before SIGKILL of the group

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
# What containerd's resolver (docker, nerdctl) sends on a pull. Without an Accept
# naming OCI, distribution answers 404 for an OCI manifest, and a server could
# skip content negotiation entirely: the manifest scenario must pay for it.
ACCEPT = ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    OCI_MANIFEST,
    "application/vnd.oci.image.index.v1+json",
    "*/*",
])


class BenchError(Exception):
    """A failed run: reported in its row, the bench goes on."""


# --------------------------------------------------------------------------
# Workload size

@dataclass(frozen=True)
class Config:
    """Sizes of one bench run; `--quick` shrinks them for a smoke run."""

    rounds: int = 3
    blob_size: int = 256 * MiB
    chunk_size: int = 8 * MiB
    pull_streams: int = 8
    wrk_seconds: int = 5
    wrk_threads: int = 2
    wrk_conns: int = 64
    tags: int = 1000
    small_blobs: int = 2000
    small_manifests: int = 200
    small_clients: int = 8


QUICK = Config(rounds=1, blob_size=64 * MiB, wrk_seconds=2, tags=200,
               small_blobs=400, small_manifests=40)


# --------------------------------------------------------------------------
# OCI content (copied from tests/oci.py: too small to be worth an import of httpx)

def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def descriptor(media_type: str, data: bytes) -> dict:
    return {"mediaType": media_type, "digest": sha256(data), "size": len(data)}


@dataclass
class Image:
    """A small image: blobs (config first) and the manifest that names them."""

    blobs: list[bytes]
    manifest: bytes

    @classmethod
    def random(cls, n_layers: int, min_size: int = 1024, max_size: int = 4096) -> "Image":
        layers = [os.urandom(random.randint(min_size, max_size)) for _ in range(n_layers)]
        config = canonical({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha256(x) for x in layers]},
        })
        manifest = canonical({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": descriptor(OCI_CONFIG, config),
            "layers": [descriptor(OCI_LAYER, x) for x in layers],
        })
        return cls([config, *layers], manifest)


class SourceFile:
    """The big blob on disk, streamed with sendfile so the client costs little CPU.

    Each push rewrites its first bytes, so every push is a blob the registry has
    never seen (no deduplication shortcut) at the cost of one sha256 pass.
    """

    def __init__(self, path: Path, size: int) -> None:
        self.path, self.size = path, size
        with open(path, "wb") as f:
            for _ in range(0, size, 8 * MiB):
                f.write(os.urandom(min(8 * MiB, size - f.tell())))
        self.digest = self._hash()

    def refresh(self) -> str:
        """Make the content new; returns its digest."""
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, os.urandom(32), 0)
        finally:
            os.close(fd)
        self.digest = self._hash()
        return self.digest

    def _hash(self) -> str:
        with open(self.path, "rb") as f:
            return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


# --------------------------------------------------------------------------
# Processes: /proc only, so the bench needs no extra package

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat from `state` on (comm may hold spaces)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def descendants(root: int) -> list[int]:
    """All live descendants of root, found through the ppid of every process."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := proc_stat(int(entry))):
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = proc_stat(pid)
    if not fields:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_seconds() -> float:
    """Non-idle CPU time of the whole machine, all cores together (first line of /proc/stat)."""
    user, nice, system, idle, iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def wait_for_quiet(max_wait: float, threshold: float = 0.25, window: float = 0.5) -> float:
    """Wait until the machine is nearly idle, up to max_wait seconds; returns the seconds waited.

    On 2 cores a test suite running beside the bench halves every figure; a run
    that starts in a quiet moment is worth the wait. Ends early, never hangs.
    """
    start = time.monotonic()
    while True:
        before = machine_busy_seconds()
        time.sleep(window)
        if (machine_busy_seconds() - before) / window < threshold:
            return time.monotonic() - start
        if time.monotonic() - start >= max_wait:
            return time.monotonic() - start


def own_cpu_seconds() -> float:
    """CPU of this process and of its reaped children (curl, wrk): the load generators."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def vm_hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


# --------------------------------------------------------------------------
# Servers

@dataclass
class Server:
    """A registry child process in its own session, so that its whole group can be killed."""

    name: str
    command: list[str]
    port: int
    workdir: Path
    proc: subprocess.Popen | None = None
    peak_kib: dict[int, int] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    seed_error: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if request(self, "GET", "/v2/", timeout=2.0)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise BenchError(f"{self.name} not ready after {START_TIMEOUT:.0f}s\n{self.log_tail()}")

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise BenchError(f"{self.name} is not running (exit {code})\n{self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def tree(self) -> list[int]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        return [self.proc.pid, *descendants(self.proc.pid)]

    def cpu_snapshot(self) -> dict[int, float]:
        return {pid: cpu_seconds(pid) for pid in self.tree()}

    def observe_memory(self) -> None:
        """Keep the largest VmHWM seen per process: a child may not live to the end."""
        for pid in self.tree():
            self.peak_kib[pid] = max(self.peak_kib.get(pid, 0), vm_hwm_kib(pid))
            self.names.setdefault(pid, comm(pid))

    def memory_report(self) -> dict[str, Any]:
        root = self.proc.pid if self.proc else -1
        children = {f"{self.names[p]}[{p}]": kib for p, kib in self.peak_kib.items() if p != root}
        server = self.peak_kib.get(root, 0)
        return {"server_kib": server, "children_kib": children,
                "total_kib": server + sum(children.values())}

    def stop(self) -> None:
        """SIGTERM and wait (Moorage stops its etcd), then SIGKILL whatever is left of the group."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(f"  {self.name} did not stop in {STOP_TIMEOUT:.0f}s: SIGKILL", file=sys.stderr)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


class CpuMeter:
    """Cores kept busy during a run: by the server, its children, the bench, and everyone else.

    "Everyone else" is what makes absolute figures meaningless: a test suite
    running beside the bench on a 2-core machine. It is reported, not hidden.
    """

    def __init__(self, server: Server) -> None:
        self.server = server
        self.tree = server.cpu_snapshot()
        self.machine, self.own = machine_busy_seconds(), own_cpu_seconds()
        self.start = time.perf_counter()

    def stop(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        after = self.server.cpu_snapshot()
        used = {pid: cpu - self.tree.get(pid, 0.0) for pid, cpu in after.items()}
        root = self.server.proc.pid if self.server.proc else -1
        server, children = used.get(root, 0.0), sum(v for p, v in used.items() if p != root)
        bench = own_cpu_seconds() - self.own
        other = machine_busy_seconds() - self.machine - server - children - bench
        return {"seconds": elapsed, "cpu_server": server / elapsed,
                "cpu_children": children / elapsed, "cpu_bench": bench / elapsed,
                "cpu_other": max(other, 0.0) / elapsed}


def moorage_server(workdir: Path) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "moorage", "serve",
           "--data-dir", str(workdir / "data"),
           "--listen", f"127.0.0.1:{port}",
           "--etcd-client-port", str(free_port()),
           "--etcd-peer-port", str(free_port())]
    return Server("moorage", cmd, port, workdir)


def distribution_server(workdir: Path) -> Server:
    """docker-registry with the Debian package's own defaults, minus auth, plus a loopback port."""
    port = free_port()
    config = workdir / "config.yml"
    config.write_text(f"""\
version: 0.1
log:
  level: warn
storage:
  cache:
    blobdescriptor: inmemory
  filesystem:
    rootdirectory: {workdir / "data"}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
  headers:
    X-Content-Type-Options: [nosniff]
""")
    binary = shutil.which("docker-registry") or "/usr/bin/docker-registry"
    return Server("distribution", [binary, "serve", str(config)], port, workdir)


# --------------------------------------------------------------------------
# HTTP, synchronous: http.client, with sendfile for big bodies

Response = tuple[int, http.client.HTTPMessage, bytes]


def connect(server: Server, timeout: float = NET_TIMEOUT) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)


def call(conn: http.client.HTTPConnection, method: str, target: str,
         headers: dict[str, str] | None = None, body: bytes = b"") -> Response:
    conn.request(method, target, body=body, headers=headers or {})
    resp = conn.getresponse()
    return resp.status, resp.headers, resp.read()


def call_file(conn: http.client.HTTPConnection, method: str, target: str, path: Path,
              offset: int, length: int, headers: dict[str, str]) -> Response:
    """A request whose body is a slice of a file, sent with sendfile(2)."""
    conn.putrequest(method, target, skip_accept_encoding=True)
    for name, value in {**headers, "Content-Length": str(length)}.items():
        conn.putheader(name, value)
    conn.endheaders()
    with open(path, "rb") as f:
        sent = conn.sock.sendfile(f, offset, length)
    if sent != length:
        raise BenchError(f"sent {sent} of {length} bytes")
    resp = conn.getresponse()
    return resp.status, resp.headers, resp.read()


def request(server: Server, method: str, target: str, headers: dict[str, str] | None = None,
            body: bytes = b"", timeout: float = NET_TIMEOUT) -> Response:
    conn = connect(server, timeout)
    try:
        return call(conn, method, target, headers, body)
    finally:
        conn.close()


def expect(resp: Response, status: int, what: str) -> Response:
    if resp[0] != status:
        raise BenchError(f"{what}: HTTP {resp[0]} (wanted {status}): {resp[2][:200]!r}")
    return resp


def location(server: Server, base: str, resp: Response) -> str:
    """The Location of an upload as a request target (path and query)."""
    loc = resp[1].get("Location")
    if not loc:
        raise BenchError("upload response without Location")
    parts = urlsplit(urljoin(server.url + base, loc))
    return parts.path + (f"?{parts.query}" if parts.query else "")


def with_digest(target: str, digest: str) -> str:
    return target + ("&" if "?" in target else "?") + "digest=" + digest


def start_upload(server: Server, conn: http.client.HTTPConnection, repo: str) -> str:
    base = f"/v2/{repo}/blobs/uploads/"
    return location(server, base, expect(call(conn, "POST", base), 202, "POST upload"))


def push_monolithic(server: Server, repo: str, src: SourceFile) -> None:
    """POST, then one PUT ?digest= carrying the whole blob (the spec's monolithic upload)."""
    conn = connect(server)
    try:
        target = start_upload(server, conn, repo)
        resp = call_file(conn, "PUT", with_digest(target, src.digest), src.path, 0, src.size,
                         {"Content-Type": "application/octet-stream"})
        expect(resp, 201, "PUT blob")
    finally:
        conn.close()


def push_chunked(server: Server, repo: str, src: SourceFile, chunk: int) -> None:
    """POST, PATCH chunk by chunk (following each new Location), then PUT ?digest=."""
    conn = connect(server)
    try:
        target = start_upload(server, conn, repo)
        for offset in range(0, src.size, chunk):
            length = min(chunk, src.size - offset)
            resp = call_file(conn, "PATCH", target, src.path, offset, length, {
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{offset + length - 1}",
            })
            target = location(server, target, expect(resp, 202, f"PATCH at {offset}"))
        expect(call(conn, "PUT", with_digest(target, src.digest), {"Content-Length": "0"}),
               201, "PUT close")
    finally:
        conn.close()


def push_small_blob(server: Server, repo: str, data: bytes) -> str:
    conn = connect(server)
    try:
        target = start_upload(server, conn, repo)
        digest = sha256(data)
        expect(call(conn, "PUT", with_digest(target, digest),
                    {"Content-Type": "application/octet-stream"}, data), 201, "PUT blob")
        return digest
    finally:
        conn.close()


def push_manifest(server: Server, repo: str, ref: str, body: bytes) -> None:
    expect(request(server, "PUT", f"/v2/{repo}/manifests/{ref}", {"Content-Type": OCI_MANIFEST},
                   body), 201, "PUT manifest")


# --------------------------------------------------------------------------
# HTTP, asynchronous: the concurrent small-push clients

async def push_image_async(session: aiohttp.ClientSession, base: str, repo: str, tag: str,
                           image: Image) -> int:
    """Every blob with POST + PUT ?digest=, then the manifest; returns the operations done."""
    post_url = f"{base}/v2/{repo}/blobs/uploads/"
    for blob in image.blobs:
        async with session.post(post_url) as r:
            await r.read()
            if r.status != 202:
                raise BenchError(f"POST upload: HTTP {r.status}")
            loc = r.headers.get("Location", "")
        put_url = yarl.URL(with_digest(urljoin(post_url, loc), sha256(blob)), encoded=True)
        async with session.put(put_url, data=blob,
                               headers={"Content-Type": "application/octet-stream"}) as r:
            text = await r.read()
            if r.status != 201:
                raise BenchError(f"PUT blob: HTTP {r.status} {text[:200]!r}")
    await put_manifest_async(session, base, repo, tag, image.manifest)
    return len(image.blobs) + 1


async def put_manifest_async(session: aiohttp.ClientSession, base: str, repo: str, tag: str,
                             body: bytes) -> int:
    async with session.put(f"{base}/v2/{repo}/manifests/{tag}", data=body,
                           headers={"Content-Type": OCI_MANIFEST}) as r:
        text = await r.read()
        if r.status != 201:
            raise BenchError(f"PUT manifest {repo}:{tag}: HTTP {r.status} {text[:200]!r}")
    return 1


Job = Callable[[aiohttp.ClientSession], Awaitable[int]]  # one client's unit of work; returns ops done


async def run_clients(jobs: list[Job], clients: int,
                      timeout: float) -> int:
    """Run jobs from `clients` concurrent workers, each one request at a time; returns the ops."""
    pending = iter(jobs)  # shared by the workers: each takes the next job when it is free
    per_request = aiohttp.ClientTimeout(total=NET_TIMEOUT)
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=per_request) as session:
        async def worker() -> int:
            done = 0
            for job in pending:
                done += await job(session)
            return done
        counts = await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(clients))), timeout)
    return sum(counts)


# --------------------------------------------------------------------------
# External load generators

def curl_pull(server: Server, target: str, streams: int, size: int) -> float:
    """MiB/s over all streams: total bytes over the slowest stream's time, as curl measures it.

    curl's own clock leaves out its process start (~5 ms, 4% of a 256 MiB pull);
    the streams start within a few milliseconds of each other.
    """
    cmd = ["curl", "-sS", "--max-time", "60", "-o", "/dev/null",
           "-w", "%{http_code} %{size_download} %{time_total}", server.url + target]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(streams)]
    try:
        outputs = [proc.communicate(timeout=90) for proc in procs]
    except subprocess.TimeoutExpired:
        raise BenchError("curl timed out") from None
    finally:
        for proc in procs:  # none outlives its run, even on Ctrl-C
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    times = []
    for out, err in outputs:
        fields = out.split()
        if fields[:2] != ["200", str(size)]:
            raise BenchError(f"curl pull: {out!r} {err.strip()!r}")
        times.append(float(fields[2]))
    return streams * size / MiB / max(times)


@dataclass
class Measurement:
    value: float
    p99_ms: float | None = None
    note: str = ""


def parse_wrk(output: str) -> Measurement:
    """Requests/s and the 99th percentile; a run with more than 1% errors is no figure at all."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    total = re.search(r"(\d+) requests in", output)
    if not rps or not total:
        raise BenchError(f"unreadable wrk output: {output[-300:]!r}")
    p99 = None
    if m := re.search(r"^\s*99%\s+([\d.]+)(us|ms|s)\s*$", output, re.M):
        p99 = float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    sock = re.search(r"Socket errors: (.*)", output)
    errors = int(bad.group(1)) if bad else 0
    if sock:
        errors += sum(int(n) for n in re.findall(r"\d+", sock.group(1)))
    if int(total.group(1)) == 0:
        raise BenchError("wrk: no request completed")
    if errors > 0.01 * int(total.group(1)):
        raise BenchError(f"wrk: {errors} errors of {total.group(1)} requests")
    return Measurement(float(rps.group(1)), p99, f"{errors} errors" if errors else "")


def wrk(server: Server, target: str, cfg: Config, headers: dict[str, str] | None = None,
        script: Path | None = None) -> Measurement:
    cmd = ["wrk", f"-t{cfg.wrk_threads}", f"-c{cfg.wrk_conns}", f"-d{cfg.wrk_seconds}s",
           "--timeout", "5s", "--latency"]
    for name, value in (headers or {}).items():
        cmd += ["-H", f"{name}: {value}"]
    if script:
        cmd += ["-s", str(script)]
    try:
        out = subprocess.run(cmd + [server.url + target], capture_output=True, text=True,
                             timeout=cfg.wrk_seconds + 30)
    except subprocess.TimeoutExpired:
        raise BenchError("wrk timed out") from None
    if out.returncode != 0:
        raise BenchError(f"wrk exit {out.returncode}: {out.stderr.strip()[:300]}")
    return parse_wrk(out.stdout)


# --------------------------------------------------------------------------
# Seeding: what the read scenarios read, pushed once per registry, untimed

# wrk 4.1 waits for the body a HEAD response announces (its parser is never told
# the request was HEAD), so the HEAD scenario asks for the empty blob: same code
# path in both registries (link lookup, stat, headers), Content-Length: 0.
EMPTY_DIGEST = sha256(b"")

PULL_REPO, IMAGE_REPO, TAGS_REPO, PUSH_REPO = "bench/pull", "bench/app", "bench/tags", "bench/push"


@dataclass
class Seed:
    """What every registry holds before the timed runs start."""

    pull_digest: str
    pull_size: int
    image: Image
    tag_count: int


def make_seed(cfg: Config, src: SourceFile) -> Seed:
    """The same content for every registry: the source file as it is now, before any push refreshes it."""
    return Seed(src.digest, src.size, Image.random(n_layers=2), cfg.tags)


def seed_server(server: Server, seed: Seed, src: SourceFile, cfg: Config) -> None:
    """Push the pull blob, one image tagged latest, and a repository with cfg.tags tags."""
    if src.digest != seed.pull_digest:
        raise BenchError("the source file changed before seeding")
    push_monolithic(server, PULL_REPO, src)
    for blob in seed.image.blobs:
        push_small_blob(server, IMAGE_REPO, blob)
        push_small_blob(server, TAGS_REPO, blob)
    push_small_blob(server, IMAGE_REPO, b"")
    push_manifest(server, IMAGE_REPO, "latest", seed.image.manifest)
    jobs = [lambda s, t=f"t{i:04d}": put_manifest_async(s, server.url, TAGS_REPO, t,
                                                        seed.image.manifest)
            for i in range(cfg.tags)]
    asyncio.run(run_clients(jobs, cfg.small_clients, timeout=300))
    verify_seed(server, seed)


def verify_seed(server: Server, seed: Seed) -> None:
    """The read scenarios must read what a client would: check it once before wrk hammers it."""
    status, headers, body = request(server, "GET", f"/v2/{IMAGE_REPO}/manifests/latest",
                                    {"Accept": ACCEPT})
    if status != 200 or body != seed.image.manifest:
        raise BenchError(f"manifest GET: HTTP {status}, body {'differs' if status == 200 else body[:200]!r}")
    if headers.get("Content-Type") != OCI_MANIFEST:
        raise BenchError(f"manifest GET: Content-Type {headers.get('Content-Type')!r}")
    status, headers, _ = request(server, "HEAD", f"/v2/{IMAGE_REPO}/blobs/{EMPTY_DIGEST}")
    if status != 200 or headers.get("Content-Length") != "0":
        raise BenchError(f"blob HEAD: HTTP {status}, Content-Length {headers.get('Content-Length')}")
    status, _, body = request(server, "GET", f"/v2/{TAGS_REPO}/tags/list")
    tags = json.loads(body).get("tags") or [] if status == 200 else []
    if len(tags) != seed.tag_count:
        raise BenchError(f"tags/list: HTTP {status}, {len(tags)} tags, wanted {seed.tag_count}")
    # A warm pull, so the timed pulls of both registries start from the page cache.
    curl_pull(server, f"/v2/{PULL_REPO}/blobs/{seed.pull_digest}", 1, seed.pull_size)


# --------------------------------------------------------------------------
# Scenarios

@dataclass
class Scenario:
    """One row of the table.

    `prepare` runs untimed before each run (fresh content, digests); `run` is
    the measured part, around which the servers' CPU time is sampled.
    """

    key: str
    title: str
    unit: str
    target: float
    run: Callable[[Server, Any], Measurement]
    prepare: Callable[[Server, int], Any] = lambda server, rnd: None
    needs_seed: bool = True


def timed_mib_s(size: int, action: Callable[[], None]) -> Measurement:
    start = time.perf_counter()
    action()
    return Measurement(size / MiB / (time.perf_counter() - start))


def fresh_source(src: SourceFile) -> Callable[[Server, int], Any]:
    """A new blob per push, and no dirty pages of the previous push to flush meanwhile."""
    def prepare(server: Server, rnd: int) -> None:
        src.refresh()
        os.sync()
    return prepare


def small_jobs(server: Server, rnd: int, cfg: Config) -> list[Job]:
    per_image = cfg.small_blobs // cfg.small_manifests
    images = [Image.random(n_layers=per_image - 1) for _ in range(cfg.small_manifests)]
    return [lambda s, i=i, img=img: push_image_async(
                s, server.url, f"small/r{rnd}-c{i % cfg.small_clients}", f"v{i}", img)
            for i, img in enumerate(images)]


def run_small(jobs: list[Job], cfg: Config) -> Measurement:
    start = time.perf_counter()
    ops = asyncio.run(run_clients(jobs, cfg.small_clients, timeout=600))
    return Measurement(ops / (time.perf_counter() - start))


def scenarios(cfg: Config, src: SourceFile, seed: Seed, head_lua: Path) -> list[Scenario]:
    size_label = f"{cfg.blob_size // MiB} MiB"
    return [
        Scenario("push_monolithic", f"blob push monolithic {size_label}", "MiB/s", 2.0,
                 lambda s, _: timed_mib_s(src.size, lambda: push_monolithic(s, PUSH_REPO, src)),
                 prepare=fresh_source(src), needs_seed=False),
        Scenario("push_chunked", f"blob push chunked {size_label}, {cfg.chunk_size // MiB} MiB PATCHes",
                 "MiB/s", 2.0,
                 lambda s, _: timed_mib_s(src.size,
                                          lambda: push_chunked(s, PUSH_REPO, src, cfg.chunk_size)),
                 prepare=fresh_source(src), needs_seed=False),
        Scenario("pull_1", f"blob pull {size_label}, 1 stream", "MiB/s", 0.95,
                 lambda s, _: Measurement(curl_pull(
                     s, f"/v2/{PULL_REPO}/blobs/{seed.pull_digest}", 1, src.size))),
        Scenario("pull_n", f"blob pull {size_label}, {cfg.pull_streams} streams", "MiB/s", 0.95,
                 lambda s, _: Measurement(curl_pull(
                     s, f"/v2/{PULL_REPO}/blobs/{seed.pull_digest}", cfg.pull_streams, src.size))),
        Scenario("manifest_get", f"manifest GET by tag, {cfg.wrk_conns} conns", "req/s", 5.0,
                 lambda s, _: wrk(s, f"/v2/{IMAGE_REPO}/manifests/latest", cfg,
                                  headers={"Accept": ACCEPT})),
        Scenario("blob_head", f"blob HEAD (empty blob), {cfg.wrk_conns} conns", "req/s", 5.0,
                 lambda s, _: wrk(s, f"/v2/{IMAGE_REPO}/blobs/{EMPTY_DIGEST}", cfg,
                                  script=head_lua)),
        Scenario("tags_list", f"tags list, {cfg.tags} tags, {cfg.wrk_conns} conns", "req/s", 3.0,
                 lambda s, _: wrk(s, f"/v2/{TAGS_REPO}/tags/list", cfg)),
        Scenario("small_pushes",
                 f"{cfg.small_blobs} small blob pushes + {cfg.small_manifests} manifests, "
                 f"{cfg.small_clients} clients", "ops/s", 1.5,
                 lambda s, jobs: run_small(jobs, cfg),
                 prepare=lambda s, rnd: small_jobs(s, rnd, cfg), needs_seed=False),
    ]


# --------------------------------------------------------------------------
# Running and reporting

@dataclass
class Run:
    value: float | None = None
    p99_ms: float | None = None
    error: str | None = None
    note: str = ""
    seconds: float = 0.0
    cpu_server: float | None = None     # cores busy in the server process
    cpu_children: float | None = None   # cores busy in its children (Moorage: etcd)
    cpu_bench: float | None = None      # cores busy in the load generators
    cpu_other: float | None = None      # cores busy in anything else on the machine


def measure(sc: Scenario, server: Server, rnd: int, quiet_wait: float) -> Run:
    """One run of one scenario on one server; any failure becomes the run's error."""
    try:
        server.check_alive()
        if sc.needs_seed and server.seed_error:
            raise BenchError(f"seeding failed: {server.seed_error}")
        ctx = sc.prepare(server, rnd)
        # Each run starts with no dirty pages: a registry that does not sync
        # (distribution) would otherwise have its writes flushed by the kernel
        # during the other registry's run, which alternates with it.
        os.sync()
        wait_for_quiet(quiet_wait)
        meter = CpuMeter(server)
        m = sc.run(server, ctx)
        return Run(m.value, m.p99_ms, None, m.note, **meter.stop())
    except Exception as exc:  # noqa: BLE001 - one row's failure must not end the bench
        alive = server.proc is not None and server.proc.poll() is None
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
        return Run(error=msg if alive else f"server died: {msg}")
    finally:
        server.observe_memory()


def median_of(runs: list[Run], attr: str) -> float | None:
    values = [getattr(r, attr) for r in runs if r.error is None and getattr(r, attr) is not None]
    return statistics.median(values) if values else None


def summarize(sc: Scenario, runs: dict[str, list[Run]]) -> dict[str, Any]:
    row: dict[str, Any] = {"scenario": sc.title, "unit": sc.unit, "target": sc.target}
    for name, rs in runs.items():
        row[name] = {
            "median": median_of(rs, "value"), "p99_ms": median_of(rs, "p99_ms"),
            **{k: median_of(rs, k) for k in ("cpu_server", "cpu_children", "cpu_bench", "cpu_other")},
            "errors": [r.error for r in rs if r.error], "runs": [asdict(r) for r in rs],
        }
    m = row.get("moorage", {}).get("median")
    d = row.get("distribution", {}).get("median")
    row["ratio"] = m / d if m and d else None
    row["met"] = None if row["ratio"] is None else row["ratio"] >= sc.target
    return row


def fmt_value(side: dict | None) -> str:
    if not side:
        return "-"
    if side["median"] is None:
        return "ERROR"
    text = f"{side['median']:,.0f}"
    if side["p99_ms"] is not None:
        text += f" (p99 {side['p99_ms']:.1f} ms)"
    if side["errors"]:
        text += f" [{len(side['errors'])} failed]"
    return text


def render(head: list[str], body: list[list[str]]) -> None:
    """A plain fixed-width table: readable in a terminal and in a CI log alike."""
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    for cells in [head, ["-" * w for w in widths], *body]:
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())


def print_table(rows: list[dict], names: list[str]) -> None:
    body = []
    for row in rows:
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else "-"
        status = {True: "met", False: "NOT met", None: "-" if len(names) < 2 else "error"}[row["met"]]
        body.append([row["scenario"], row["unit"], *(fmt_value(row.get(n)) for n in names),
                     ratio, f">={row['target']:g}x", status])
    print()
    render(["scenario", "unit", *names, "ratio M/D", "target", "status"], body)
    print_errors(rows, names)
    print_cpu(rows, names)


def print_errors(rows: list[dict], names: list[str]) -> None:
    errors = [(row["scenario"], n, e) for row in rows for n in names
              for e in dict.fromkeys(row.get(n, {}).get("errors", []))]
    if errors:
        print("\nErrors:")
        for scenario, name, err in errors:
            print(f"  {scenario} / {name}: {err}")


CPU_COLUMNS = {"cpu_server": "server", "cpu_children": "children", "cpu_bench": "bench",
               "cpu_other": "other"}


def print_cpu(rows: list[dict], names: list[str]) -> None:
    """Where the cores went during the runs (medians).

    server ~1.0 with little else: one Python process is the bottleneck.
    children high: etcd is. other > 0: something outside the bench competed.
    """
    print(f"\nCPU during the runs, cores busy (the machine has {os.cpu_count()}); "
          "children = etcd for Moorage; bench = curl/wrk/the Python clients:")
    head, body = ["scenario"], []
    for n in names:
        head += [f"{n[0].upper()} {label}" for label in CPU_COLUMNS.values()]
    for row in rows:
        cells = [row["scenario"]]
        for n in names:
            side = row.get(n) or {}
            cells += ["-" if side.get(k) is None else f"{side[k]:.2f}" for k in CPU_COLUMNS]
        body.append(cells)
    render(head, body)
    busy = [row[n]["cpu_other"] for row in rows for n in names
            if (row.get(n) or {}).get("cpu_other") is not None]
    if busy and max(busy) > 0.25:
        print(f"WARNING: other processes kept up to {max(busy):.2f} cores busy during the runs: "
              "absolute figures are low and ratios noisy; rerun on a quiet machine.")


def print_memory(servers: list[Server]) -> dict[str, Any]:
    print("\nPeak RSS (VmHWM):")
    report = {}
    for s in servers:
        mem = s.memory_report()
        report[s.name] = mem
        kids = ", ".join(f"{k} {v / 1024:.0f} MiB" for k, v in mem["children_kib"].items())
        print(f"  {s.name:<13} server {mem['server_kib'] / 1024:.0f} MiB"
              + (f" + {kids}" if kids else "") + f" = {mem['total_kib'] / 1024:.0f} MiB")
    return report


def run_bench(cfg: Config, servers: list[Server], src: SourceFile, workdir: Path,
              quiet_wait: float, wanted: set[str] = frozenset()) -> list[dict]:
    seed = make_seed(cfg, src)
    for s in servers:
        print(f"seeding {s.name} ...", flush=True)
        try:
            seed_server(s, seed, src, cfg)
        except Exception as exc:  # noqa: BLE001
            s.seed_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            print(f"  seeding {s.name} failed: {s.seed_error}", flush=True)
        s.observe_memory()
    head_lua = workdir / "head.lua"
    head_lua.write_text('wrk.method = "HEAD"\n')
    rows = []
    for sc in scenarios(cfg, src, seed, head_lua):
        if wanted and sc.key not in wanted:
            continue
        runs: dict[str, list[Run]] = {s.name: [] for s in servers}
        for rnd in range(cfg.rounds):
            for s in servers:
                r = measure(sc, s, rnd, quiet_wait)
                runs[s.name].append(r)
                shown = f"{r.value:,.1f} {sc.unit}" if r.error is None else f"ERROR {r.error}"
                print(f"  {sc.title} | round {rnd + 1} | {s.name}: {shown}", flush=True)
        rows.append(summarize(sc, runs))
    return rows


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 round, smaller sizes: a smoke run")
    p.add_argument("--only", choices=["moorage", "distribution"], help="bench one registry alone")
    p.add_argument("--rounds", type=int, help="override the number of rounds")
    p.add_argument("--scenarios", metavar="KEYS",
                   help="comma-separated scenario keys to run (default: all)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write all results as JSON")
    p.add_argument("--quiet-wait", type=float, default=20.0, metavar="S",
                   help="before each run, wait up to S seconds for the machine to be idle (default 20)")
    p.add_argument("--tmp", type=Path, default=None,
                   help="parent of the temp dir (default: system temp dir; keep it on the same disk)")
    return p.parse_args(argv)


def tool_output(cmd: list[str]) -> str:
    """First line a tool prints about itself, or '?' (wrk prints its version on stderr)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return ((out.stdout or out.stderr).strip().splitlines() or ["?"])[0]


def environment() -> dict[str, str]:
    """What was measured, so that two result files can be told apart."""
    repo = Path(__file__).resolve().parent.parent
    dirty = tool_output(["git", "-C", str(repo), "status", "--porcelain", "--", "src"]) not in ("?", "")
    return {
        "moorage": tool_output(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
                   + (" + uncommitted changes in src/" if dirty else ""),
        "distribution": tool_output(["docker-registry", "--version"]),
        "wrk": tool_output(["wrk", "-v"]),
        "python": sys.version.split()[0],
        "cores": str(os.cpu_count()),
        "loadavg": Path("/proc/loadavg").read_text().strip(),
    }


def check_tools() -> None:
    missing = [t for t in ("wrk", "curl") if not shutil.which(t)]
    if missing:
        sys.exit(f"missing tools: {', '.join(missing)} (make bench installs them)")


def raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    cfg = QUICK if args.quick else Config()
    if args.rounds:
        cfg = Config(**{**asdict(cfg), "rounds": args.rounds})
    check_tools()
    signal.signal(signal.SIGTERM, raise_interrupt)
    started = time.monotonic()
    env = environment()
    print("; ".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="moorage-bench-", dir=args.tmp))
    servers: list[Server] = []
    try:
        names = [args.only] if args.only else ["moorage", "distribution"]
        factories = {"moorage": moorage_server, "distribution": distribution_server}
        for name in names:
            (workdir / name).mkdir()
            servers.append(factories[name](workdir / name))
        print(f"writing the {cfg.blob_size // MiB} MiB source blob ...", flush=True)
        src = SourceFile(workdir / "source.bin", cfg.blob_size)
        for s in servers:
            print(f"starting {s.name} on {s.url} ...", flush=True)
            s.start()
        wanted = set(args.scenarios.split(",")) if args.scenarios else set()
        rows = run_bench(cfg, servers, src, workdir, args.quiet_wait, wanted)
        print_table(rows, names)
        memory = print_memory(servers)
        took = time.monotonic() - started
        print(f"\n{cfg.rounds} round(s), medians; bench took {took:.0f} s")
        if args.json:
            args.json.write_text(json.dumps({"environment": env, "config": asdict(cfg), "rows": rows,
                                             "memory": memory, "seconds": took}, indent=2))
        return 0
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        cleanup(servers, workdir)


def cleanup(servers: list[Server], workdir: Path) -> None:
    """Stop every server and remove the temp dir, whatever fails on the way (even a second Ctrl-C)."""
    for s in servers:
        try:
            s.stop()
        except BaseException as exc:  # noqa: BLE001 - the next server must still be stopped
            print(f"stopping {s.name}: {exc!r}", file=sys.stderr)
            if s.proc is not None:
                with contextlib.suppress(OSError):
                    os.killpg(s.proc.pid, signal.SIGKILL)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
