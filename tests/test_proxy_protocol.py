"""The PROXY protocol v2 between HAProxy and the replicas: the audit and the login slowdown see clients.

A real HAProxy (`moorage lb haproxy --watch`) in front of a real replica; the
clients connect to it from 127.0.0.2 and 127.0.0.3 while HAProxy reaches the
replica from 127.0.0.1, the address the cluster setting proxy_protocol.from
trusts. Loopback has all of 127.0.0.0/8, so the three are distinct addresses
on one machine.
"""

from __future__ import annotations

import json
import socket
import ssl
from pathlib import Path

import httpx
import pytest

from auth import BearerAuth
from conftest import ADMIN_PASSWORD, Registry, moorage, wait_for
from moorage.api.proxy_protocol import LOCAL_HEADER, SIGNATURE, ProxyError, header, parse
from moorage.cluster import haproxy
from oci import new_repo, push_image
from test_lb import LoadBalancer

pytestmark = pytest.mark.lb

LB_SOURCE = "127.0.0.1"  # where HAProxy (and `moorage lb haproxy`) connect to the replica from


# -- the header itself ------------------------------------------------------------------


def test_headers_parse_and_bad_ones_are_refused():
    assert parse(*_split(header(("203.0.113.7", 40000), ("10.0.0.5", 5000)))) == ("203.0.113.7", 40000)
    assert parse(*_split(header(("2001:db8::7", 41000), ("2001:db8::5", 5000)))) == ("2001:db8::7", 41000)
    assert parse(*_split(LOCAL_HEADER)) is None  # a health check: the connection's own address stands
    v2 = header(("203.0.113.7", 40000), ("10.0.0.5", 5000))
    for bad in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
                v2[:12] + b"\x11" + v2[13:],           # version 1 in a v2 header
                v2[:12] + b"\x23" + v2[13:],           # unknown command
                v2[:13] + b"\x12" + v2[14:],           # UDP
                v2[:14] + b"\x00\x04" + v2[16:20]):    # too short for its addresses
        with pytest.raises(ProxyError):
            parse(*_split(bad))


def _split(data: bytes) -> tuple[bytes, bytes]:
    return data[:16], data[16:]


def test_haproxy_config_sends_the_header_when_the_setting_is_set():
    replicas = [haproxy.Backend("aa01", "https://10.0.0.11:5000"), haproxy.Backend("aa02", "https://10.0.0.12:5000")]
    plain = haproxy.render(replicas, haproxy.Options(ca_file="/ca.crt"))
    assert "send-proxy" not in plain
    text = haproxy.render(replicas, haproxy.Options(ca_file="/ca.crt", send_proxy=True))
    servers = [line for line in text.splitlines() if line.strip().startswith("server ")]
    assert len(servers) == 4 and all("send-proxy-v2 check-send-proxy" in line for line in servers), servers
    assert haproxy.sends_proxy({"proxy_protocol_from": "10.0.0.5/32"}) and not haproxy.sends_proxy({})


# -- through a real HAProxy ------------------------------------------------------------


def client_from(address: str, lb: LoadBalancer, user: str = "admin", password: str = ADMIN_PASSWORD) -> httpx.Client:
    transport = httpx.HTTPTransport(local_address=address, verify=lb.registry.ssl_context())
    return httpx.Client(base_url=lb.url, transport=transport, timeout=30, auth=BearerAuth(user, password))


def raw_tls(reg: Registry, source: str, prefix: bytes = b"") -> bytes:
    """A request straight to the replica from `source`, after `prefix` bytes; its answer's first line,
    or b"" when the connection was closed."""
    with socket.create_connection(("127.0.0.1", reg.port), timeout=10, source_address=(source, 0)) as s:
        s.sendall(prefix)
        try:
            with reg.ssl_context().wrap_socket(s, server_hostname="127.0.0.1") as t:
                t.sendall(b"GET /_ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                return t.recv(4096).split(b"\r\n")[0]
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            return b""


def audited(reg: Registry, repo: str) -> list[dict]:
    # From 127.0.0.1, a trusted address: a connection without a header is the load balancer host's own.
    out = moorage("audit", "--repo", repo, "--json", "--existing", reg.url)
    return json.loads(out.stdout)["events"]


def _seen_from(reg: Registry, lb: LoadBalancer, address: str) -> bool:
    """Whether a request through the load balancer from `address` reaches the replica under it."""
    with httpx.Client(base_url=lb.url, timeout=10, verify=reg.ssl_context(),
                      transport=httpx.HTTPTransport(local_address=address, verify=reg.ssl_context())) as c:
        assert c.get("/v2/probe/tags/list").status_code == 401  # no credentials: audited as challenged
    out = moorage("audit", "--kind", "challenged", "--since", "5m", "--json", "--existing", reg.url)
    return any(e["remote"] == address for e in json.loads(out.stdout)["events"])


@pytest.fixture
def proxied(tmp_path: Path):
    reg = Registry(tmp_path / "data").start()
    lb = LoadBalancer(tmp_path, reg)
    try:
        yield reg, lb
    finally:
        lb.stop()
        reg.kill9()


def test_the_audit_and_the_login_slowdown_see_the_client_through_haproxy(proxied):
    reg, lb = proxied
    before = new_repo("pp")
    with client_from("127.0.0.2", lb) as c:
        push_image(c, before, "v1")
    assert {e["remote"] for e in audited(reg, before)} == {LB_SOURCE}  # without: the load balancer

    moorage("config", "set", "proxy_protocol.from", f"{LB_SOURCE}/32", "--existing", reg.url)
    # The watching lb learns it from the status it polls (from a trusted address, with LOCAL headers)
    # and reloads HAProxy with send-proxy-v2; until then HAProxy's checks fail, as they should.
    wait_for(lambda: "send-proxy-v2" in lb.config.read_text(), 15, "lb haproxy --watch to send the PROXY header")
    wait_for(lambda: lb.up() == {reg.replica_id}, 15, f"HAProxy's checks to pass:\n{lb.log()}")
    # The replica serves header-less connections from the load balancer too, so HAProxy's
    # workers from before the reload still get through: wait until the reloaded one carries us.
    wait_for(lambda: _seen_from(reg, lb, "127.0.0.2"), 30, f"HAProxy to reload with send-proxy-v2:\n{lb.log()}")

    repo = new_repo("pp")
    with client_from("127.0.0.2", lb) as c:
        push_image(c, repo, "v1")
        assert c.get(f"/v2/{repo}/tags/list").json()["tags"] == ["v1"]
    events = audited(reg, repo)
    assert events and {(e["remote"], e["via"]) for e in events} == {("127.0.0.2", LB_SOURCE)}, events

    # Failed logins slow down per client address: 127.0.0.2's do not lock out 127.0.0.3.
    with httpx.Client(base_url=lb.url, timeout=30, verify=lb.registry.ssl_context(),
                      transport=httpx.HTTPTransport(local_address="127.0.0.2", verify=lb.registry.ssl_context())) as c:
        statuses = [c.get("/token", params={"service": "moorage"}, auth=("admin", "wrong")).status_code
                    for _ in range(7)]
    assert statuses[:5] == [401] * 5 and statuses[-1] == 429, statuses
    with client_from("127.0.0.3", lb) as c:
        assert c.get("/v2/").status_code == 200
    denied = [e for e in json.loads(moorage("audit", "--kind", "login-failed", "--user", "admin", "--since", "5m",
                                            "--json", "--existing", reg.url).stdout)["events"]]
    assert {e["remote"] for e in denied} == {"127.0.0.2"}, denied

    # Straight to the replica: from the trusted address without a header, the load balancer host's
    # own connection, served; a broken header there closes it; a header from elsewhere is never read
    # (it breaks the TLS handshake); from elsewhere without one, served.
    assert raw_tls(reg, LB_SOURCE) == b"HTTP/1.1 200 OK"
    v2 = header(("203.0.113.7", 4000), ("127.0.0.1", reg.port))
    for broken in (v2[:12] + b"\x11" + v2[13:], SIGNATURE[:5], v2[:14] + b"\x10\x00" + v2[16:]):
        assert raw_tls(reg, LB_SOURCE, broken) == b"", broken
    assert raw_tls(reg, "127.0.0.2", v2) == b""
    assert raw_tls(reg, "127.0.0.2") == b"HTTP/1.1 200 OK"
    # A well-formed header from the trusted address names the client, whoever sends it.
    assert raw_tls(reg, LB_SOURCE, header(("198.51.100.20", 4000), ("127.0.0.1", reg.port))) == b"HTTP/1.1 200 OK"
    assert raw_tls(reg, LB_SOURCE, LOCAL_HEADER) == b"HTTP/1.1 200 OK"
    assert raw_tls(reg, LB_SOURCE, SIGNATURE + b"\x21\x11\xff\xff") == b""  # 64 KiB of header: refused unread

    # Off again: straight connections from the load balancer's address are plain ones once more.
    moorage("config", "unset", "proxy_protocol.from", "--existing", reg.url)
    wait_for(lambda: raw_tls(reg, LB_SOURCE) == b"HTTP/1.1 200 OK", 10, "the setting to be unset")
    wait_for(lambda: "send-proxy" not in lb.config.read_text(), 15, "lb haproxy --watch to stop sending it")
