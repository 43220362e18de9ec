"""The two registries as child processes: start, stop, and what they cost in CPU and memory."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from credentials import Credentials
from load import BenchError, request
from tls import make_certificate

if TYPE_CHECKING:
    from objectstore import Bucket


START_TIMEOUT = 60.0        # a registry (and etcd) becoming ready
STOP_TIMEOUT = 20.0         # graceful SIGTERM before SIGKILL of the group


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


def role(pid: int) -> str:
    """What a server's child is, for the memory table: Moorage's workers are forked by
    multiprocessing's fork server and carry its command line, so its parent tells them apart."""
    args = comm_args(pid)
    if "resource_tracker" in args:
        return "resource tracker"
    if "forkserver" in args:
        fields = proc_stat(pid)
        parent = int(fields[1]) if fields else 0
        return "worker" if "forkserver" in comm_args(parent) else "fork server"
    return comm(pid)


def comm_args(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""



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
    seeded_kib: int = 0                     # the peak RSS of all its processes once seeded
    tls: bool = False                       # serves HTTPS, with a certificate `ca` signed
    ca: Path | None = None                  # the CA the clients trust (Moorage's exists once it started)
    credentials: Credentials | None = None  # None: the registry runs without authentication
    env: dict[str, str] = field(default_factory=dict)
    drop_env: tuple[str, ...] = ()          # prefixes of this environment's variables it must not see
    helpers: list[int] = field(default_factory=list)  # pids it works through (SeaweedFS): their CPU is its
    # Seeding a blob straight into its storage, where pushing cannot work (repo, digest, data).
    put_blob_directly: Callable[[str, str, bytes], None] | None = None
    _ssl: ssl.SSLContext | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The clients' context: trusts this server's CA only (None over plain HTTP)."""
        if self.tls and self._ssl is None:
            assert self.ca is not None
            self._ssl = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        return self._ssl

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         env=self.child_env())
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                # 401: serving, and asking for credentials (the bench sends none to /v2/ itself).
                if request(self, "GET", "/v2/", timeout=2.0)[0] in (200, 401):
                    return
            except (OSError, ssl.SSLError):
                pass
            time.sleep(0.2)
        raise BenchError(f"{self.name} not ready after {START_TIMEOUT:.0f}s\n{self.log_tail()}")

    def blob_target(self, repo: str, digest: str) -> str:
        """What a client asks for to pull a blob (the direct-read baseline overrides it)."""
        return f"/v2/{repo}/blobs/{digest}"

    def child_env(self) -> dict[str, str]:
        """The environment of its processes: this one's, less drop_env, plus env."""
        return {**{k: v for k, v in os.environ.items() if not k.startswith(self.drop_env)}, **self.env}

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
        """CPU seconds so far of its own processes and of the helpers it works through.

        A helper (the object store) is shared, so its memory is nobody's, but
        its CPU during a run is that run's work.
        """
        helpers = [p for h in self.helpers for p in (h, *descendants(h))]
        return {pid: cpu_seconds(pid) for pid in [*self.tree(), *helpers]}

    def observe_memory(self) -> None:
        """Keep the largest VmHWM seen per process: a child may not live to the end."""
        for pid in self.tree():
            self.peak_kib[pid] = max(self.peak_kib.get(pid, 0), vm_hwm_kib(pid))
            self.names.setdefault(pid, role(pid))

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


ADMIN_PASSWORD = "bench-admin-password"


def moorage_server(workdir: Path, tls: bool = True, bucket: Bucket | None = None,
                   workers: int | None = None) -> Server:
    """Moorage as an operator starts it: HTTPS with its cluster CA (unless tls is False), and an admin;
    `workers` None: its default number of worker processes.

    With a bucket, its blobs go there (`--storage s3://BUCKET`), with the
    credentials in the standard AWS variables, as an operator gives them.
    """
    port = free_port()
    cmd = [sys.executable, "-m", "moorage", "serve",
           "--data-dir", str(workdir / "data"),
           "--listen", f"127.0.0.1:{port}",
           "--etcd-client-port", str(free_port()),
           "--etcd-peer-port", str(free_port())]
    env = {"MOORAGE_ADMIN_PASSWORD": ADMIN_PASSWORD}
    if bucket is not None:
        cmd += ["--storage", f"s3://{bucket.name}", "--s3-endpoint", bucket.endpoint,
                "--s3-region", bucket.region, "--s3-path-style"]
        env.update(bucket.store.env, AWS_EC2_METADATA_DISABLED="true")
    if not tls:
        cmd.append("--insecure-http")
    if workers is not None:
        cmd += ["--workers", str(workers)]
    return Server("moorage", cmd, port, workdir, tls=tls, ca=workdir / "data" / "tls" / "ca.crt",
                  credentials=Credentials("admin", ADMIN_PASSWORD), env=env)


def distribution_storage(workdir: Path, bucket: Bucket | None, root: str = "/") -> str:
    """The `storage:` stanza: the Debian package's filesystem default, or S3 in `bucket` under `root`.

    On S3, distribution 2.8 uses path-style requests whenever `regionendpoint`
    is set, and redirects blob GETs to presigned URLs by default (as Moorage
    does), so nothing beyond the bucket and its endpoint is configured.
    """
    if bucket is None:
        driver = f"""\
  filesystem:
    rootdirectory: {workdir / "data"}
"""
    else:
        driver = f"""\
  s3:
    accesskey: {bucket.store.access_key}
    secretkey: {bucket.store.secret_key}
    region: {bucket.region}
    regionendpoint: {bucket.endpoint}
    bucket: {bucket.name}
    secure: {"true" if bucket.endpoint.startswith("https:") else "false"}
    v4auth: true
    rootdirectory: {root}
"""
    return f"""\
storage:
  cache:
    blobdescriptor: inmemory
{driver}  delete:
    enabled: true
"""


def distribution_server(workdir: Path, tls: bool = True, bucket: Bucket | None = None) -> Server:
    """docker-registry with the Debian package's own defaults, minus auth, plus a loopback port.

    With tls, it serves HTTPS with a certificate the bench makes (its own TLS
    stack, Go's crypto/tls): the same transport as Moorage's. With a bucket,
    its storage is S3 there (distribution_storage).
    """
    port = free_port()
    config = workdir / "config.yml"
    ca = None
    tls_config = ""
    if tls:
        ca, cert, key = make_certificate(workdir)
        tls_config = f"""\
  tls:
    certificate: {cert}
    key: {key}
"""
    config.write_text(f"""\
version: 0.1
log:
  level: warn
{distribution_storage(workdir, bucket)}http:
  addr: 127.0.0.1:{port}
  headers:
    X-Content-Type-Options: [nosniff]
{tls_config}""")
    binary = shutil.which("docker-registry") or "/usr/bin/docker-registry"
    return Server("distribution", [binary, "serve", str(config)], port, workdir, tls=tls, ca=ca,
                  # Its AWS SDK panics at start when AWS_CA_BUNDLE is set ("unable to load
                  # custom CA bundle, HTTPClient's transport unsupported type"), and its
                  # credentials are in the configuration: it sees no AWS_* variable.
                  drop_env=("AWS_",))
