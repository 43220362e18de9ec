"""An HAProxy configuration for a Moorage cluster: replicas in, configuration text out.

Pure on purpose: the same input always gives the same text, byte for byte, so
`moorage lb haproxy --watch` can tell a membership change from a no-op by
comparing texts, and the unit tests need no HAProxy and no cluster.
"""

from __future__ import annotations

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
    # For https replicas: the CA that signed their certificates, or None to
    # check them against the system's trust store.
    ca_file: str | None = None
    verify_tls: bool = True


def check_bind(bind: str) -> str:
    """HOST:PORT for HAProxy's `bind` line; `*:PORT` or `:PORT` means every address."""
    m = _BIND.fullmatch(bind)
    if m is None or not 0 < int(m.group(2)) < 65536:
        raise ConfigError(f"--bind takes HOST:PORT (e.g. *:5000 or 127.0.0.1:5000), not {bind!r}")
    host, port = m.group(1), m.group(2)
    if host.startswith("["):  # HAProxy writes IPv6 unbracketed: the last colon ends the address
        host = host[1:-1]
    return f"{host}:{port}"


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
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    line = f"    server {b.replica_id} {host}:{port}"
    if parts.scheme == "https":
        if not opts.verify_tls:
            line += " ssl verify none"
        else:
            line += f" ssl verify required ca-file {opts.ca_file or '@system-ca'} sni str({parts.hostname})"
    return line


def render(replicas: list[Backend], opts: Options = Options()) -> str:
    """The whole haproxy.cfg for `replicas`, sorted so that order in the status never matters."""
    bind = check_bind(opts.bind)
    servers = "\n".join(_server_line(b, opts) for b in sorted(set(replicas)))
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
    mode http
    # Blob bodies stream through as they arrive, in both directions: no
    # `option http-buffer-request`, and HAProxy sets no body size limit.
    no option http-buffer-request
    option forwardfor
    timeout connect 3s
    # Inactivity limits, not transfer limits: a multi-gigabyte layer that keeps
    # moving never hits them, while a client or replica gone silent frees its
    # slot after five minutes.
    timeout client 5m
    timeout server 5m
    # Headers must arrive promptly (slow-loris), bodies need not.
    timeout http-request 30s
    timeout http-keep-alive 30s
    timeout queue 30s
    timeout check 2s
    # A refused or reset connection (a replica just killed) is tried again on
    # another replica: every retry is redispatched, not only the last one.
    # `empty-response` also covers a replica that died after reading a request
    # but before answering; HAProxy only retries a request whose body it still
    # holds whole (small ones: manifests, monolithic small blobs), so a large
    # upload is never replayed half. A replay is harmless or refused, never
    # doubled: blobs and manifests are content-addressed, and a chunk's
    # Content-Range offset no longer matches once the first try committed it.
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response

frontend registry
    bind {bind}
    # Without quorum every replica fails /_ping and `replicas` is empty; then
    # `degraded` sends clients to whichever replicas still run: pulls of what
    # they know go on, and writes get the replicas' own 503 naming the cause.
    use_backend degraded if {{ nbsrv(replicas) eq 0 }}
    default_backend replicas

backend replicas
    # leastconn rather than roundrobin: registry requests range from a
    # manifest HEAD (milliseconds) to a layer upload (minutes), so equal
    # shares of requests are not equal shares of work; counting open
    # connections is. Ties go round-robin.
    balance leastconn
    option httpchk
    http-check send meth GET uri {HEALTH_PATH} ver HTTP/1.1 hdr Host moorage-lb
    http-check expect status 200
    # A replica is out after two failed checks half a second apart (about a
    # second after it dies) and back after two good ones. A refused
    # connection from live traffic takes it out at once instead of waiting.
    # A name that does not resolve leaves that one replica out, not HAProxy down.
    default-server check inter 500ms fastinter 250ms downinter 1s fall 2 rise 2 observe layer4 error-limit 1 on-error mark-down init-addr last,libc,none
{servers}

backend degraded
    balance leastconn
    option httpchk
    http-check send meth GET uri {READS_HEALTH_PATH} ver HTTP/1.1 hdr Host moorage-lb
    http-check expect status 200
    default-server check inter 500ms fastinter 250ms downinter 1s fall 2 rise 2 init-addr last,libc,none
{servers}
"""
