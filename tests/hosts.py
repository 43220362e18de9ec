"""Separate hosts for tests: one network namespace per host, all on one bridge.

A `Network` is a "switch" namespace holding a bridge, and one namespace per
host joined to it by a veth pair: the host's end is its `eth0` with the
host's address, the other end a port of the bridge. Nothing is created in the
machine's own namespace, so deleting the namespaces removes everything (the
veths and the bridge go with them), and the guide's own addresses
(10.0.0.11, .12, ...) collide with nothing.

The test process is one more host on that network, the client (10.0.0.100):
`Network.client()` switches the calling thread into its namespace (setns
acts on one thread), so httpx and every command the test starts from then on
(moorage, skopeo, HAProxy) reach the hosts over the bridge; a command meant
for a given host runs there with `ip netns exec`, which also gives it
/etc/netns/NS/hosts as /etc/hosts (names like registry.example.com).

Names carry the run's identity (the pytest process id), so concurrent runs
in other worktrees never meet, and a run that crashed has its leftovers
removed by the next one (those whose process is gone).
"""

from __future__ import annotations

import ctypes
import ipaddress
import itertools
import json
import os
import shutil
import signal
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

PREFIX = "moorage-t"
SUBNET = ipaddress.ip_network("10.0.0.0/24")   # the HA guide's addresses
CLIENT_IP = "10.0.0.100"
_CLONE_NEWNET = 0x40000000
_counter = itertools.count()


class NetnsError(Exception):
    """The test network cannot be made; the message says why in one sentence."""


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except FileNotFoundError:
        raise NetnsError("the `ip` command (Debian package iproute2) is missing; `make install` installs it") from None
    if check and out.returncode != 0:
        raise NetnsError(f"`{' '.join(cmd)}` failed: {out.stderr.strip() or out.returncode}")
    return out.stdout


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        raise NetnsError(f"cannot enter a network namespace: {os.strerror(ctypes.get_errno())}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers() -> None:
    """Namespaces (and their /etc/netns files) of earlier runs whose pytest is gone."""
    for line in ip("netns", "list", check=False).splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            _delete(name)


def _delete(netns: str) -> None:
    """Kill what still runs in the namespace (never this process), then delete it."""
    for pid in ip("netns", "pids", netns, check=False).split():
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    ip("netns", "delete", netns, check=False)
    shutil.rmtree(Path("/etc/netns") / netns, ignore_errors=True)


def check_subnet_free() -> None:
    """The machine must not already route our subnet: its hosts could be mistaken for ours."""
    routes = json.loads(ip("-j", "-4", "route", "show", "table", "all") or "[]")
    for r in routes:
        dst = r.get("dst", "")
        if dst in ("default", "") or r.get("type") in ("local", "broadcast"):
            continue
        try:
            net = ipaddress.ip_network(dst, strict=False)
        except ValueError:
            continue
        if net.overlaps(SUBNET) and net.prefixlen > 0:
            raise NetnsError(f"this machine already routes {dst} (dev {r.get('dev', '?')}), which overlaps the "
                             f"test hosts' {SUBNET}; the tests will not use addresses that could be real")


@dataclass
class Host:
    name: str
    ip: str
    netns: str
    network: "Network"

    def run_prefix(self) -> list[str]:
        """Put before a command to run it on this host."""
        return ["ip", "netns", "exec", self.netns]

    def cut_off(self, *others: "Host") -> None:
        """A partition between this host and `others`: packets between them are silently
        dropped both ways (iptables in this host's namespace), as a broken link would,
        while every other host still reaches both."""
        for other in others:
            self._iptables("-A", other)

    def heal(self, *others: "Host") -> None:
        for other in others:
            self._iptables("-D", other)

    def _iptables(self, action: str, other: "Host") -> None:
        for chain, direction in (("INPUT", "-s"), ("OUTPUT", "-d")):
            cmd = [*self.run_prefix(), "iptables", action, chain, direction, other.ip, "-j", "DROP"]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            if out.returncode != 0:
                raise NetnsError(f"`{' '.join(cmd)}` failed: {out.stderr.strip()}")

    def add_address(self, address: str) -> None:
        ip("addr", "add", f"{address}/24", "dev", "eth0", netns=self.netns)


@dataclass
class Network:
    """Hosts on one bridge; `close()` (or a crashed run's successor) removes them all."""

    tag: str = field(default_factory=lambda: str(next(_counter)))
    hosts: dict[str, Host] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)   # extra /etc/hosts entries: name -> address
    _made: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if os.geteuid() != 0:
            raise NetnsError("the separate-host tests need root to create network namespaces (CI runs as root)")
        remove_leftovers()
        check_subnet_free()
        self.base = f"{PREFIX}{os.getpid()}-{self.tag}"
        self.switch = self._netns("switch")
        ip("link", "add", "br0", "type", "bridge", netns=self.switch)
        ip("link", "set", "br0", "up", netns=self.switch)
        self.client_host = self.host("client", CLIENT_IP)

    def _netns(self, name: str) -> str:
        netns = f"{self.base}-{name}"
        out = subprocess.run(["ip", "netns", "add", netns], capture_output=True, text=True, timeout=20)
        if out.returncode != 0:
            raise NetnsError(f"cannot create the network namespace {netns}: {out.stderr.strip()}")
        self._made.append(netns)
        ip("link", "set", "lo", "up", netns=netns)
        return netns

    def host(self, name: str, address: str) -> Host:
        """A new host `name` at `address`, or the one already made."""
        if name in self.hosts:
            return self.hosts[name]
        if ipaddress.ip_address(address) not in SUBNET:
            raise NetnsError(f"{address} is outside the test subnet {SUBNET}")
        netns = self._netns(name)
        port = f"p{len(self.hosts)}"
        ip("link", "add", "eth0", "netns", netns, "type", "veth", "peer", "name", port, "netns", self.switch)
        ip("link", "set", port, "master", "br0", "up", netns=self.switch)
        ip("addr", "add", f"{address}/{SUBNET.prefixlen}", "dev", "eth0", netns=netns)
        ip("link", "set", "eth0", "up", netns=netns)
        host = self.hosts[name] = Host(name, address, netns, self)
        self._write_hosts_files()
        return host

    def name(self, hostname: str, address: str) -> None:
        """Resolve `hostname` to `address` for commands run on the hosts (e.g. the load balancer's name)."""
        self.names[hostname] = address
        self._write_hosts_files()

    def _write_hosts_files(self) -> None:
        lines = ["127.0.0.1 localhost", "::1 localhost"]
        lines += [f"{h.ip} {h.name}" for h in self.hosts.values()]
        lines += [f"{a} {n}" for n, a in self.names.items()]
        for h in self.hosts.values():
            d = Path("/etc/netns") / h.netns
            d.mkdir(parents=True, exist_ok=True)
            (d / "hosts").write_text("\n".join(lines) + "\n")

    def require_client(self) -> None:
        """Refuse to talk to the hosts from any other namespace: there, 10.0.0.x would leave
        the machine by its default route, and no test may send traffic anywhere real."""
        if os.stat("/proc/thread-self/ns/net").st_ino != os.stat(f"/run/netns/{self.client_host.netns}").st_ino:
            raise AssertionError("a test reached for the separate hosts outside `Network.client()`")

    @contextmanager
    def client(self) -> Iterator[Host]:
        """Run the calling thread (and what it starts) on the client host until the block ends."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.client_host.netns}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield self.client_host
            finally:
                _setns(own)
        finally:
            os.close(own)
            os.close(target)

    def close(self) -> None:
        for netns in reversed(self._made):
            _delete(netns)
        self._made.clear()


@contextmanager
def network() -> Iterator[Network]:
    """A new network, with the calling thread on its client host until the block ends; removed after."""
    net = Network()
    try:
        with net.client():
            yield net
    finally:
        net.close()
