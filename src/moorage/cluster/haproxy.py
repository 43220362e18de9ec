"""An HAProxy configuration for a Moorage cluster: replicas in, configuration text out.

Pure on purpose: the same input always gives the same text, byte for byte, so
`moorage lb haproxy --watch` can tell a membership change from a no-op by
comparing texts, and the unit tests need no HAProxy and no cluster.

TCP passthrough: replicas serve HTTPS themselves, and HAProxy forwards the
encrypted bytes without terminating TLS. Clients therefore see a replica's
own certificate (which must name the load balancer: `--tls-name` on each
replica), the cluster CA stays the one trust anchor, and HAProxy holds no
key. HAProxy still checks each replica's `/_ping` over TLS, verifying its
certificate against the cluster CA, so a replica leaves the pool within a
second of failing. What passthrough gives up is per-request balancing: a
client's keep-alive connection stays with one replica, and a request cut by
a replica's death is retried by the client, not by HAProxy.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

# A replica's health endpoint (api/app.py): 200 while it can serve, 503 with a
# reason when it cannot (etcd unreachable, no quorum).
HEALTH_PATH = "/_ping"
# Answers 200 while a replica can serve reads at all, quorum or not.
READS_HEALTH_PATH = "/_ping?reads=1"
DEFAULT_BIND = "*:5000"
# What goes into the file comes over the network: only plain names and addresses
# get in, so no status can smuggle a directive into the configuration.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_HOST = re.compile(r"^[A-Za-z0-9.\-:]+$")
_BIND = re.compile(r"^(\*|[A-Za-z0-9.\-]*|\[[0-9A-Fa-f:.]+\]|[0-9A-Fa-f:]+:):(\d{1,5})$")


class ConfigError(ValueError):
    """Input the configuration cannot be made from; the message is one sentence for the user."""


@dataclass(frozen=True, order=True)
class Backend:
    """One replica as HAProxy sees it: a name for its logs and stats, and where it listens."""

    replica_id: str
    url: str


@dataclass(frozen=True)
class Options:
    bind: str = DEFAULT_BIND
    # Given for `--watch`: lets the command (and an operator with socat) ask
    # the running HAProxy which servers are up.
    stats_socket: str | None = None
    # For https replicas: the CA file HAProxy checks their certificates with
    # (the cluster CA), or None for the system's trust store (operators' own
    # certificates). An absolute path: HAProxy resolves it, not us.
    ca_file: str | None = None
    verify_tls: bool = True
    # The replicas expect a PROXY protocol v2 header from the load balancer
    # (the cluster setting proxy_protocol.from): client connections and health
    # checks both start with one, so replicas see each client's own address.
    send_proxy: bool = False


def check_bind(bind: str) -> str:
    """HOST:PORT for HAProxy's `bind` line; `*:PORT` or `:PORT` means every address."""
    m = _BIND.fullmatch(bind)
    if m is None or not 0 < int(m.group(2)) < 65536:
        raise ConfigError(f"--bind takes HOST:PORT (e.g. *:5000 or 127.0.0.1:5000), not {bind!r}")
    host, port = m.group(1), m.group(2)
    if host.startswith("["):  # HAProxy writes IPv6 unbracketed: the last colon ends the address
        host = host[1:-1]
    return f"{host}:{port}"


def sends_proxy(status: dict) -> bool:
    """Whether the replicas expect the PROXY protocol from the load balancer (a cluster setting)."""
    return bool(status.get("proxy_protocol_from"))


def backends(status: dict) -> list[Backend]:
    """The replicas of a cluster status (`GET /_admin/cluster/status`) that have an address.

    Unhealthy and dead replicas stay in: HAProxy's own health checks take them
    out within a second and put them back when they recover, which is faster
    and truer than this poll. Only `moorage remove` takes a replica out.
    """
    found = {}
    for row in status.get("replicas", []):
        url, rid = row.get("url"), row.get("id")
        if url and rid and rid != "(joining)":
            found[rid] = Backend(rid, url.rstrip("/"))
    return sorted(found.values())


def _server_line(b: Backend, opts: Options) -> str:
    if not _NAME.fullmatch(b.replica_id):
        raise ConfigError(f"a replica id HAProxy cannot use as a server name: {b.replica_id!r}")
    try:
        parts = urlsplit(b.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        parts, port = None, 0
    if parts is None or parts.scheme not in ("http", "https") or not _HOST.fullmatch(parts.hostname or ""):
        raise ConfigError(f"replica {b.replica_id} has an address HAProxy cannot use: {b.url!r}")
    hostname = parts.hostname or ""
    host = f"[{hostname}]" if ":" in hostname else hostname
    line = f"    server {b.replica_id} {host}:{port}"
    if opts.send_proxy:
        line += " send-proxy-v2 check-send-proxy"
    if parts.scheme == "https":
        # Only the health check speaks TLS here; client traffic passes through untouched.
        if not opts.verify_tls:
            line += " check-ssl verify none"
        else:
            line += f" check-ssl verify required ca-file {opts.ca_file or '@system-ca'}"
            if not _is_ip(hostname):
                # HAProxy checks the certificate's name against the SNI it sent; it cannot
                # match IP addresses, so for those the chain to the cluster CA is the check.
                line += f" check-sni {hostname}"
    return line


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def render(replicas: list[Backend], opts: Options = Options()) -> str:
    """The whole haproxy.cfg for `replicas`, sorted so that order in the status never matters."""
    bind = check_bind(opts.bind)
    servers = "\n".join(_server_line(b, opts) for b in sorted(set(replicas)))
    proxy = ""
    if opts.send_proxy:
        proxy = ("    # Each connection (health checks too) starts with a PROXY protocol v2 header\n"
                 "    # naming the client: the replicas audit, and slow down failed logins of,\n"
                 "    # the client's own address (cluster setting proxy_protocol.from).\n")
    stats = ""
    if opts.stats_socket:
        stats = f"    stats socket {opts.stats_socket} mode 600 level operator\n"
    return f"""\
# Written by `moorage lb haproxy`; it is rewritten when replicas join or leave.
global
    # No `log` line: HAProxy writes server state changes (UP/DOWN) and alerts
    # to its stderr by itself; request logs belong to the replicas.
    maxconn 4096
{stats}\
    # An old worker keeps serving its in-flight transfers after a reload; a
    # stuck client must not keep it alive for ever.
    hard-stop-after 10m

defaults
    # TCP passthrough: the replicas terminate TLS with certificates from the
    # cluster CA, so clients verify the replica they reach, and blob bodies
    # stream through unbuffered in both directions. The replicas' own limits
    # (header timeout, body rate) guard against slow clients.
    mode tcp
    timeout connect 3s
    # Inactivity limits, not transfer limits: a multi-gigabyte layer that keeps
    # moving never hits them, while a client or replica gone silent frees its
    # slot after five minutes.
    timeout client 5m
    timeout server 5m
    timeout client-fin 30s
    timeout server-fin 30s
    timeout queue 30s
    timeout check 2s
    # A refused connection (a replica just killed) is tried again on another
    # replica: every retry is redispatched, not only the last one. Nothing is
    # replayed once bytes flowed: a request cut mid-way is the client's to
    # retry, as docker, podman and skopeo do.
    retries 3
    option redispatch 1

frontend registry
    bind {bind}
    # Without quorum every replica fails /_ping and `replicas` is empty; then
    # `degraded` sends clients to whichever replicas still run: pulls of what
    # they know go on, and writes get the replicas' own 503 naming the cause.
    use_backend degraded if {{ nbsrv(replicas) eq 0 }}
    default_backend replicas

backend replicas
    # leastconn rather than roundrobin: registry transfers range from a
    # manifest HEAD (milliseconds) to a layer upload (minutes), so equal
    # shares of connections are not equal shares of work; counting open
    # connections is. Ties go round-robin.
    balance leastconn
    # The health check is HTTP over TLS (check-ssl on each server), verifying
    # the replica's certificate: an impostor on a replica's address never
    # enters the pool.
    option httpchk
    http-check send meth GET uri {HEALTH_PATH} ver HTTP/1.1 hdr Host moorage-lb
    http-check expect status 200
    # A replica is out after two failed checks half a second apart (about a
    # second after it dies) and back after two good ones. A refused
    # connection from live traffic takes it out at once instead of waiting,
    # and the connections it still holds are cut (a hung replica must not
    # keep its clients waiting for the 5m timeout): the clients reconnect
    # to a healthy one. A name that does not resolve leaves that one
    # replica out, not HAProxy down.
    default-server check inter 500ms fastinter 250ms downinter 1s fall 2 rise 2 observe layer4 error-limit 1 on-error mark-down on-marked-down shutdown-sessions init-addr last,libc,none
{proxy}{servers}

backend degraded
    balance leastconn
    option httpchk
    http-check send meth GET uri {READS_HEALTH_PATH} ver HTTP/1.1 hdr Host moorage-lb
    http-check expect status 200
    default-server check inter 500ms fastinter 250ms downinter 1s fall 2 rise 2 init-addr last,libc,none
{servers}
"""
