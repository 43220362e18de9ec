"""The replica's own etcd member: started, supervised and stopped by the replica.

etcd runs as a child process that dies with its parent (PR_SET_PDEATHSIG), so
a `kill -9` of the replica never leaves an orphan member holding the ports.
If etcd exits on its own, it is restarted with backoff, as Patroni does for
PostgreSQL: the replica keeps serving reads from its index meanwhile.

Client and peer traffic are mutual TLS: etcd serves both with the replica's
node certificate and accepts only clients and peers that present a
certificate from the cluster CA (`--client-cert-auth`,
`--peer-client-cert-auth`). Nothing without one, not even a process on the
same machine, reads or writes a key.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from moorage.backoff import Backoff
from moorage.cluster import pki
from moorage.cluster.addresses import url_host
from moorage.meta.etcd import EtcdClient, EtcdTls, EtcdUnavailable

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
# etcd that ran this long before it died is restarted after the shortest wait again.
STEADY_SECONDS = 60.0


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class EtcdError(Exception):
    """etcd could not be started; the message says why in one sentence."""


def node_tls(data_dir: Path) -> EtcdTls:
    """The replica's etcd TLS identity: cluster CA and node certificate from DATA_DIR."""
    paths = pki.Paths(data_dir)
    return EtcdTls(ca=paths.ca_cert, cert=paths.node_cert, key=paths.node_key)


@dataclass
class EtcdMember:
    name: str
    data_dir: Path
    tls: EtcdTls
    client_port: int
    peer_port: int
    host: str                               # the replica's advertised address (cluster/addresses.py)
    cluster_token: str = "moorage"
    initial_cluster: str | None = None      # None: this member alone
    log_path: Path | None = None
    member_id: int | None = None            # known when joining as a learner
    on_removed: Callable[[], None] | None = None
    # One-off flags after the usual ones (emergency-repair's --force-new-cluster).
    extra_flags: list[str] = field(default_factory=list)
    proc: asyncio.subprocess.Process | None = field(default=None, init=False)
    _stopping: bool = field(default=False, init=False)
    _log_offset: int = field(default=0, init=False)

    @property
    def client_url(self) -> str:
        return f"https://{url_host(self.host)}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"https://{url_host(self.host)}:{self.peer_port}"

    @property
    def endpoint(self) -> str:
        return f"{url_host(self.host)}:{self.client_port}"

    def command(self) -> list[str]:
        binary = shutil.which("etcd")
        if binary is None:
            raise EtcdError("the etcd binary is not installed (Debian package etcd-server); "
                            "`make install` installs it")
        cmd = [
            binary,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster-token", self.cluster_token,
            # Mutual TLS on both ports, with the cluster CA as the only trust.
            "--cert-file", str(self.tls.cert),
            "--key-file", str(self.tls.key),
            "--client-cert-auth",
            "--trusted-ca-file", str(self.tls.ca),
            "--peer-cert-file", str(self.tls.cert),
            "--peer-key-file", str(self.tls.key),
            "--peer-client-cert-auth",
            "--peer-trusted-ca-file", str(self.tls.ca),
            # A manifest transaction compares every blob it references.
            "--max-txn-ops", "10000",
            "--max-request-bytes", str(10 << 20),
            "--quota-backend-bytes", str(8 << 30),
            "--auto-compaction-mode", "periodic",
            "--auto-compaction-retention", "1h",
            "--logger", "zap",
            "--log-level", "warn",
        ]
        if self.log_path is not None:
            cmd += ["--log-outputs", str(self.log_path)]
        if not (self.data_dir / "member").exists():
            cmd += ["--initial-cluster", self.initial_cluster or f"{self.name}={self.peer_url}",
                    "--initial-cluster-state", "existing" if self.initial_cluster else "new"]
        return cmd + self.extra_flags

    async def start(self, timeout: float = 30.0) -> None:
        """Run etcd and wait until it answers; a replica then runs `supervise` among its tasks."""
        self._stopping = False
        await self._spawn()
        await self.wait_ready(timeout)

    async def _spawn(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path and self.log_path.exists() else 0
        os.chmod(self.data_dir, 0o700)
        self.proc = await asyncio.create_subprocess_exec(
            *self.command(), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE if self.log_path is None
            else asyncio.subprocess.DEVNULL, preexec_fn=_die_with_parent)
        log.debug("etcd started", extra={"pid": self.proc.pid, "client": self.client_url})

    async def wait_ready(self, timeout: float) -> None:
        client = EtcdClient(self.endpoint, self.tls, timeout=1.0)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.proc is not None and self.proc.returncode is not None:
                    raise EtcdError(f"etcd exited with code {self.proc.returncode} at start-up; "
                                    f"see {self.log_path or 'its output'} (is port {self.client_port} "
                                    f"or {self.peer_port} in use?)")
                try:
                    status = await client.status()
                    # Whoever answers must be our own member, not another
                    # replica's etcd that happens to hold the port. A learner
                    # cannot list members; it is ours if it has our member id.
                    if status.isLearner:
                        ours = status.header.member_id == self.member_id
                    else:
                        members = {m.ID: m.name for m in await client.members()}
                        ours = members.get(status.header.member_id) == self.name
                    if not ours:
                        raise EtcdError(f"the etcd answering on port {self.client_port} belongs to "
                                        "another replica; choose other --etcd-client-port/--etcd-peer-port")
                    return
                except EtcdUnavailable:
                    if time.monotonic() > deadline:
                        raise EtcdError(f"etcd did not become ready within {timeout:.0f}s; "
                                        f"see {self.log_path}") from None
                    await asyncio.sleep(0.1)
        finally:
            await client.close()

    async def supervise(self) -> None:
        """Restart etcd when it dies; when it was removed from the cluster, call on_removed and end."""
        backoff = Backoff(1.0, 30.0)
        while not self._stopping:
            assert self.proc is not None
            started = time.monotonic()
            code = await self.proc.wait()
            if self._stopping:
                return
            if self._was_removed():
                log.warning("this replica's etcd member was removed from the cluster")
                if self.on_removed is not None:
                    self.on_removed()
                return
            if time.monotonic() - started > STEADY_SECONDS:
                backoff.reset()   # it ran a while: this is a new failure, not the same one again
            wait = backoff.next()
            log.error("etcd exited unexpectedly; restarting", extra={"code": code, "restart_in_seconds": round(wait, 2)})
            await asyncio.sleep(wait)
            try:
                await self._spawn()
            except Exception as e:
                log.error("etcd restart failed", extra={"error": str(e)})

    def _was_removed(self) -> bool:
        """Whether etcd, since its last start, said it was removed (then it exits, code 0)."""
        if self.log_path is None:
            return False
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return b"permanently removed from the cluster" in f.read(1 << 20)
        except OSError:
            return False

    async def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("etcd did not stop in time; killing it")
            self.proc.kill()
            await self.proc.wait()
