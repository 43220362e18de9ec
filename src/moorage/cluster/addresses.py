"""The address a replica advertises: where other replicas, etcd peers and clients reach it.

It defaults to the listen host, so `--listen 10.0.0.11:5000` is all a node
with one network interface needs. A wildcard listen (0.0.0.0, ::) says
nothing about where the node is reached, so it is resolved to the host's one
routable address (and the log says so); with none or several, the replica
refuses to guess and asks for --advertise. etcd binds its client and peer
ports to the advertised address and checks peers' certificates against the
address they connect from, so it must be an IP address of this host that the
other nodes route to: never a loopback default on a multi-node cluster.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import ipaddress
import socket
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
WILDCARDS = ("0.0.0.0", "::", "")


class AddressError(Exception):
    """No address can be advertised as given; the message says what to pass, in one sentence."""


@dataclass(frozen=True)
class Advertised:
    host: str               # an IP address literal, without brackets
    resolved_from: str | None = None   # the wildcard it was resolved from, to say so in the log


def advertised(listen_host: str, advertise: str | None) -> Advertised:
    """The address to advertise for a replica listening on `listen_host`."""
    if advertise is not None:
        host = advertise.strip("[]")
        if host in WILDCARDS:
            raise AddressError(f"--advertise takes the address other replicas reach this one at, not {advertise!r}")
        return Advertised(_one_ip(host, "--advertise"))
    if listen_host not in WILDCARDS:
        return Advertised(_one_ip(listen_host, "the --listen host"))
    wildcard = listen_host or "0.0.0.0"
    found = routable(host_addresses(), ipv4_only=wildcard == "0.0.0.0")
    if len(found) == 1:
        return Advertised(str(found[0]), resolved_from=wildcard)
    if not found:
        raise AddressError(f"--listen {wildcard} listens on every address but this host has no routable one "
                           "(only loopback or link-local); pass --advertise with the address other replicas "
                           "reach this one at")
    raise AddressError(f"--listen {wildcard} listens on every address and this host has several routable ones "
                       f"({', '.join(map(str, found))}); pass --advertise with the one other replicas reach "
                       "this one at")


def url_host(host: str) -> str:
    """A host as it goes into a URL: IPv6 literals in brackets."""
    return f"[{host}]" if ":" in host else host


def parse_listen(value: str) -> tuple[str, int]:
    """(host, port) of a --listen HOST:PORT; an empty host is every IPv4 address."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise AddressError(f"--listen takes HOST:PORT, not {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def check_ports_free(ports: list[tuple[str, int, str]]) -> None:
    """Refuse, before anything starts, a (host, port, what it is for) that is taken."""
    for host, port, what in ports:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                raise AddressError(f"{what} {host}:{port} {in_use(e)}") from None


def listen_socket(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """The API's listening socket, non-blocking (raises OSError: see in_use)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def in_use(e: OSError) -> str:
    """Why a port could not be bound, as the end of a sentence."""
    return "is already in use" if e.errno == errno.EADDRINUSE else f"cannot be used: {e.strerror}"


def _one_ip(host: str, what: str) -> str:
    """An IP literal as is; a name resolved to its one address (etcd binds to IP addresses only)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if host == "localhost":  # often both 127.0.0.1 and ::1: etcd and the API agree on the IPv4 one
        return "127.0.0.1"
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise AddressError(f"{what} {host!r} does not resolve ({e.strerror}); pass --advertise with this "
                           "replica's IP address") from None
    found = list(dict.fromkeys(str(ipaddress.ip_address(i[4][0].split("%")[0])) for i in infos))
    if len(found) != 1:
        raise AddressError(f"{what} {host!r} resolves to several addresses ({', '.join(found)}); pass "
                           "--advertise with the one other replicas reach this one at")
    return found[0]


def routable(addresses: list[IPAddress], ipv4_only: bool = False) -> list[IPAddress]:
    """Addresses another host can reach this one at: no loopback, link-local, multicast or unspecified."""
    out = []
    for a in addresses:
        if ipv4_only and a.version != 4:
            continue
        if a.is_loopback or a.is_link_local or a.is_multicast or a.is_unspecified:
            continue
        if a not in out:
            out.append(a)
    return out


# -- getifaddrs(3): every address of every interface that is up -----------------------

class _SockAddr(ctypes.Structure):
    _fields_ = [("sa_family", ctypes.c_ushort), ("sa_data", ctypes.c_ubyte * 14)]


class _SockAddrIn6(ctypes.Structure):
    _fields_ = [("sin6_family", ctypes.c_ushort), ("sin6_port", ctypes.c_ushort),
                ("sin6_flowinfo", ctypes.c_uint32), ("sin6_addr", ctypes.c_ubyte * 16),
                ("sin6_scope_id", ctypes.c_uint32)]


class _IfAddrs(ctypes.Structure):
    pass


_IfAddrs._fields_ = [("ifa_next", ctypes.POINTER(_IfAddrs)), ("ifa_name", ctypes.c_char_p),
                     ("ifa_flags", ctypes.c_uint), ("ifa_addr", ctypes.POINTER(_SockAddr)),
                     ("ifa_netmask", ctypes.POINTER(_SockAddr)), ("ifa_ifu", ctypes.c_void_p),
                     ("ifa_data", ctypes.c_void_p)]

_IFF_UP = 0x1


def host_addresses() -> list[IPAddress]:
    """Every IPv4 and IPv6 address of this host's interfaces that are up (the stdlib has no call for it)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    head = ctypes.POINTER(_IfAddrs)()
    if libc.getifaddrs(ctypes.byref(head)) != 0:
        raise AddressError(f"cannot list this host's addresses ({ctypes.get_errno()}); pass --advertise")
    out: list[IPAddress] = []
    try:
        node = head
        while node:
            ifa = node.contents
            if ifa.ifa_addr and ifa.ifa_flags & _IFF_UP:
                family = ifa.ifa_addr.contents.sa_family
                if family == socket.AF_INET:
                    out.append(ipaddress.IPv4Address(bytes(ifa.ifa_addr.contents.sa_data[2:6])))
                elif family == socket.AF_INET6:
                    six = ctypes.cast(ifa.ifa_addr, ctypes.POINTER(_SockAddrIn6)).contents
                    out.append(ipaddress.IPv6Address(bytes(six.sin6_addr)))
            node = ifa.ifa_next
    finally:
        libc.freeifaddrs(head)
    return out
