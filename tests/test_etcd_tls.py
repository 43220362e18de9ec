"""A replica's etcd ports refuse anyone without a certificate from the cluster CA.

The metadata (users' password hashes, grants, manifests, the token signing
secret) lives in etcd, so etcd's client and peer ports are as sensitive as
the admin password. Each test connects to a real replica's etcd from this
machine the way an attacker on it could, and is refused; the same call with
the replica's node certificate succeeds, so a refusal is never an accident of
the test.
"""

from __future__ import annotations

import os
import ssl
import subprocess
from pathlib import Path

import grpc
import httpx
import pytest
from aetcd import rpc

from conftest import Registry, moorage
from moorage.cluster import pki
from moorage.cluster.etcd_member import node_tls

pytestmark = pytest.mark.security

PREFIX = b"/moorage/"
PROBE_KEY = b"/moorage/probe-from-outside"


def _range(channel: grpc.Channel) -> list[bytes]:
    """Every key under /moorage/ (the admin user at least), through `channel`."""
    resp = rpc.KVStub(channel).Range(rpc.RangeRequest(key=PREFIX, range_end=b"/moorage0", keys_only=True),
                                     timeout=5)
    return [kv.key for kv in resp.kvs]


def _put(channel: grpc.Channel) -> None:
    rpc.KVStub(channel).Put(rpc.PutRequest(key=PROBE_KEY, value=b"x"), timeout=5)


def _node_credentials(data_dir: Path) -> grpc.ChannelCredentials:
    tls = node_tls(data_dir)
    return grpc.ssl_channel_credentials(tls.ca.read_bytes(), tls.key.read_bytes(), tls.cert.read_bytes())


def _refused(call, channel: grpc.Channel) -> str:
    """The call fails at the transport (no TLS session, so no answer at all)."""
    with pytest.raises(grpc.RpcError) as info:
        call(channel)
    channel.close()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
    return info.value.details() or ""


def _plain_http_gets_nothing(method: str, url: str, secret: str = "kvs", **kw) -> None:
    """Plain HTTP to a TLS port: a 400 ("HTTP request to an HTTPS server") or a closed connection."""
    try:
        r = httpx.request(method, url, timeout=5, **kw)
    except httpx.HTTPError:
        return
    assert r.status_code == 400 and secret not in r.text, r.text


@pytest.fixture
def etcd(fresh_registry):
    """(registry, client endpoint, peer URL base) of a running replica's etcd member."""
    return fresh_registry, f"127.0.0.1:{fresh_registry.etcd_client_port}", \
        f"127.0.0.1:{fresh_registry.etcd_peer_port}"


def test_client_port_serves_only_cluster_certificates(etcd, tmp_path):
    reg, endpoint, _ = etcd
    ca = reg.ca.read_bytes()

    # Positive control: the replica's own node certificate reads the metadata.
    with grpc.secure_channel(endpoint, _node_credentials(reg.data_dir)) as ok:
        keys = _range(ok)
    assert any(k.startswith(b"/moorage/user/") for k in keys), keys

    # TLS that trusts the cluster CA but presents no certificate: refused, for reads and writes.
    _refused(_range, grpc.secure_channel(endpoint, grpc.ssl_channel_credentials(root_certificates=ca)))
    _refused(_put, grpc.secure_channel(endpoint, grpc.ssl_channel_credentials(root_certificates=ca)))
    # Plaintext gRPC, as a default etcd client speaks it: refused.
    _refused(_range, grpc.insecure_channel(endpoint))
    _refused(_put, grpc.insecure_channel(endpoint))

    # A certificate with the right names and usages, signed by another CA: refused.
    other = pki.Paths(tmp_path / "other")
    pki.create_ca(other, "impostor")
    pki.ensure_node_cert(other, pki.replica_names("127.0.0.1"))
    impostor = grpc.ssl_channel_credentials(root_certificates=ca,  # we trust the server; it must not trust us
                                            private_key=other.node_key.read_bytes(),
                                            certificate_chain=other.node_cert.read_bytes())
    _refused(_range, grpc.secure_channel(endpoint, impostor))
    _refused(_put, grpc.secure_channel(endpoint, impostor))

    # None of the writes happened.
    with grpc.secure_channel(endpoint, _node_credentials(reg.data_dir)) as ok:
        assert PROBE_KEY not in _range(ok)


def test_client_port_http_gateway_refuses_without_a_certificate(etcd):
    """etcd also serves JSON (/v3/kv/range, /health) on the client port: same rule."""
    reg, endpoint, _ = etcd
    body = {"key": "L21vb3JhZ2Uv", "range_end": "L21vb3JhZ2Uw"}  # base64 of /moorage/ and /moorage0
    node = node_tls(reg.data_dir)
    with_cert = pki.client_context(node.ca, node.cert, node.key)
    r = httpx.post(f"https://{endpoint}/v3/kv/range", json=body, verify=with_cert, timeout=5)
    assert r.status_code == 200 and r.json().get("kvs"), r.text  # positive control
    for verify in (ssl.create_default_context(cafile=str(reg.ca)), False):
        with pytest.raises(httpx.HTTPError):  # the handshake fails: no certificate, no session
            httpx.post(f"https://{endpoint}/v3/kv/range", json=body, verify=verify, timeout=5)
    _plain_http_gets_nothing("POST", f"http://{endpoint}/v3/kv/range", json=body)


def test_peer_port_admits_only_cluster_members(etcd):
    reg, _, peer = etcd
    node = node_tls(reg.data_dir)
    with_cert = pki.client_context(node.ca, node.cert, node.key)
    r = httpx.get(f"https://{peer}/members", verify=with_cert, timeout=5)
    assert r.status_code == 200 and reg.replica_id in r.text, r.text  # positive control
    for verify in (ssl.create_default_context(cafile=str(reg.ca)), False):
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"https://{peer}/members", verify=verify, timeout=5)
    _plain_http_gets_nothing("GET", f"http://{peer}/members", secret=reg.replica_id)


def test_etcdctl_needs_the_cluster_certificate(etcd):
    reg, endpoint, _ = etcd
    node = node_tls(reg.data_dir)
    env = {**os.environ, "ETCDCTL_API": "3"}

    def etcdctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["etcdctl", "--dial-timeout", "2s", "--command-timeout", "4s", *args,
                               "get", "--prefix", "--keys-only", "/moorage/"],
                              capture_output=True, text=True, env=env, timeout=30)

    ok = etcdctl("--endpoints", f"https://{endpoint}", "--cacert", str(node.ca), "--cert", str(node.cert),
                 "--key", str(node.key))
    assert ok.returncode == 0 and "/moorage/user/admin" in ok.stdout, ok.stderr  # positive control
    for args in ((f"--endpoints=https://{endpoint}", "--cacert", str(node.ca)),
                 (f"--endpoints=https://{endpoint}", "--insecure-skip-tls-verify"),
                 (f"--endpoints=http://{endpoint}",)):
        out = etcdctl(*args)
        assert out.returncode != 0 and "/moorage/" not in out.stdout, (args, out.stdout, out.stderr)


def test_join_hands_the_ca_only_to_a_verified_admin(cluster, tmp_path):
    """The CA key, which makes etcd certificates, goes only to an admin over a verified connection,
    and a join that fails leaves no key behind."""
    first = cluster.start_first()
    # Without admin credentials the admin API says nothing, let alone a key.
    r = httpx.post(first.url + "/_admin/cluster/join", json={"replica_id": "abc", "peer_url": "https://x:1"},
                   verify=first.ssl_context(), timeout=10)
    assert r.status_code == 401 and "PRIVATE KEY" not in r.text, r.text
    r = httpx.post(first.url + "/_admin/cluster/join", json={"replica_id": "abc", "peer_url": "https://x:1"},
                   verify=first.ssl_context(), auth=("admin", "wrong"), timeout=10)
    assert r.status_code == 401 and "PRIVATE KEY" not in r.text, r.text

    joiner = Registry(tmp_path / "joiner", storage_dir=cluster.storage, join=first.url)
    joiner.data_dir.mkdir(parents=True)
    base = joiner.command()[3:]
    no_ca = {"MOORAGE_CA_CERT": ""}
    # Unverified TLS is refused before anything is sent.
    out = moorage(*base, "--insecure-tls", check=False, env=no_ca)
    assert out.returncode == 1 and "--insecure-tls" in out.stderr and "Traceback" not in out.stderr, out.stderr
    # A fingerprint that is not the cluster CA's: refused, before the credentials go out.
    out = moorage(*base, "--ca-fingerprint", "sha256:" + "0" * 64, check=False, env=no_ca)
    assert out.returncode == 1 and "fingerprint" in out.stderr, out.stderr
    # A join that fails after receiving the CA (no shared storage) removes it again.
    stranger = Registry(tmp_path / "stranger", storage_dir=tmp_path / "other-blobs", join=first.url)
    stranger.data_dir.mkdir(parents=True)
    out = moorage(*stranger.command()[3:], "--ca-fingerprint", pki.fingerprint(first.ca.read_bytes()),
                  check=False, env=no_ca, timeout=90)
    assert out.returncode == 1 and "blob storage" in out.stderr, out.stderr
    for d in (joiner.data_dir, stranger.data_dir):
        assert sorted(p.name for p in d.iterdir()) == [], list(d.rglob("*"))
    assert len(cluster.status(first)["replicas"]) == 1

    # A proper join: the new replica's etcd certificate comes from the same CA, and its member
    # and the first one's accept each other's node certificates (they replicate).
    second = cluster.join(first)
    assert second.ca.read_bytes() == first.ca.read_bytes()
    assert (second.data_dir / "pki" / "ca.key").stat().st_mode & 0o077 == 0
    with grpc.secure_channel(f"127.0.0.1:{second.etcd_client_port}", _node_credentials(first.data_dir)) as ch:
        assert any(k.startswith(b"/moorage/replica/") for k in _range(ch))
    status = cluster.status(first)
    assert all(r["healthy"] for r in status["replicas"]) and status["voters"] == 2, status
