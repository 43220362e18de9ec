"""The API over HTTPS: the cluster CA, the replica's certificate, operators' own, plain HTTP.

Real replicas, real TLS handshakes with Python's ssl module; the operator's
certificate comes from a CA this test makes with `cryptography` itself, not
from Moorage's code.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import re
import socket
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import ENV, MOORAGE, Registry, free_port, moorage

pytestmark = pytest.mark.security

FINGERPRINT_LINE = re.compile(r"moorage: cluster CA fingerprint (sha256:[0-9a-f]{64}) \((.+)\)")


def der_fingerprint(pem: bytes) -> str:
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def handshake(port: int, ca: Path, server_name: str, connect_to: str = "127.0.0.1") -> x509.Certificate:
    """A TLS handshake that checks the chain to `ca` and that the certificate covers `server_name`."""
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection((connect_to, port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def san(cert: x509.Certificate) -> set[str]:
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(n.value) for n in names}


def serve_fails(tmp_path: Path, *flags: str, listen: str | None = None) -> str:
    """Run `moorage serve` expecting a refusal; return its stderr (one sentence)."""
    cmd = MOORAGE + ["serve", "--data-dir", str(tmp_path / "refused"),
                     "--listen", listen or f"127.0.0.1:{free_port()}",
                     "--etcd-client-port", str(free_port()), "--etcd-peer-port", str(free_port()), *flags]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=ENV, stdin=subprocess.DEVNULL)
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("moorage: ")]
    assert len(lines) == 1, out.stderr
    return lines[0]


def make_operator_pki(root: Path) -> tuple[Path, Path, Path]:
    """A CA of the operator's own and a server certificate from it for 127.0.0.1 and localhost."""
    root.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Operator test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "registry.operator.test")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("registry.operator.test"), x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = root / "ca.crt", root / "server.crt", root / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


# -- the cluster CA ------------------------------------------------------------------

def test_first_start_prints_the_ca_fingerprint_once_and_serves_the_ca(fresh_registry):
    reg = fresh_registry
    printed = FINGERPRINT_LINE.findall(reg.log())
    assert printed == [(der_fingerprint(reg.ca.read_bytes()), str(reg.ca))], reg.log()
    # /ca needs no credentials (it is how a client bootstraps trust) and is the very file.
    r = httpx.get(reg.url + "/ca", verify=reg.ssl_context())
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/x-pem-file")
    assert r.content == reg.ca.read_bytes()
    assert der_fingerprint(r.content) == printed[0][0]
    # DATA_DIR/tls holds the CA alone, so it works as a --cert-dir; the keys are private.
    assert sorted(p.name for p in reg.cert_dir.iterdir()) == ["ca.crt"]
    pki_dir = reg.data_dir / "pki"
    assert pki_dir.stat().st_mode & 0o077 == 0
    for key in ("ca.key", "api.key"):
        assert (pki_dir / key).stat().st_mode & 0o077 == 0, key

    reg.restart()
    assert len(FINGERPRINT_LINE.findall(reg.log())) == 1, "the fingerprint is printed on the first start only"
    assert httpx.get(reg.url + "/ca", verify=reg.ssl_context()).content == r.content


def test_api_certificate_covers_loopback_names_and_tls_names(tmp_path):
    reg = Registry(tmp_path / "data", extra_args=["--tls-name", "registry.example.test"]).start()
    try:
        for name in ("127.0.0.1", "localhost", "registry.example.test"):
            cert = handshake(reg.port, reg.ca, name)
        assert {"127.0.0.1", "localhost", "registry.example.test"} <= san(cert)
        with socket.create_connection(("localhost", reg.port), timeout=10):
            pass  # localhost resolves to where we listen
        assert httpx.get(f"https://localhost:{reg.port}/ca", verify=reg.ssl_context()).status_code == 200
        with pytest.raises(ssl.SSLCertVerificationError):
            handshake(reg.port, reg.ca, "not-covered.example.test")
        # A client trusting only the system's store does not trust the cluster CA.
        with pytest.raises(httpx.ConnectError):
            httpx.get(reg.url + "/ca")

        # A restart keeps the CA; a new --tls-name reissues the API certificate.
        ca_before, api_before = reg.ca.read_bytes(), (reg.data_dir / "pki" / "api.crt").read_bytes()
        reg.restart()
        assert (reg.data_dir / "pki" / "api.crt").read_bytes() == api_before, "reissued for nothing"
        reg.stop()
        reg.extra_args = ["--tls-name", "lb.example.test"]
        reg.start()
        assert reg.ca.read_bytes() == ca_before
        assert (reg.data_dir / "pki" / "api.crt").read_bytes() != api_before
        assert "lb.example.test" in san(handshake(reg.port, reg.ca, "lb.example.test"))
    finally:
        reg.stop()


def test_plain_http_to_the_tls_port_fails(registry):
    with pytest.raises(httpx.HTTPError):
        r = httpx.get(f"http://{registry.host}/v2/", timeout=5)
        raise AssertionError(f"plain HTTP got an answer: {r.status_code}")


# -- the operator's own certificate ---------------------------------------------------

def test_operator_certificate_is_served_instead(tmp_path):
    op_ca, cert, key = make_operator_pki(tmp_path / "operator")
    reg = Registry(tmp_path / "data", extra_args=["--tls-cert", str(cert), "--tls-key", str(key)],
                   trust=op_ca).start()
    try:
        served = handshake(reg.port, op_ca, "registry.operator.test")
        assert served.subject.rfc4514_string() == "CN=registry.operator.test"
        with reg.client() as c:  # trusts the operator's CA only
            assert c.get("/v2/").status_code in (200, 401)
            assert c.get("/ca").content == reg.ca.read_bytes()  # the cluster CA still exists (etcd)
        with pytest.raises(ssl.SSLCertVerificationError):
            handshake(reg.port, reg.ca, "127.0.0.1")
        assert not (reg.data_dir / "pki" / "api.crt").exists()
    finally:
        reg.stop()


def test_operator_certificate_flags_are_checked(tmp_path):
    _, cert, key = make_operator_pki(tmp_path / "operator")
    _, other_cert, _ = make_operator_pki(tmp_path / "other")
    assert "--tls-cert and --tls-key go together" in serve_fails(tmp_path, "--tls-cert", str(cert))
    assert "--tls-cert and --tls-key go together" in serve_fails(tmp_path, "--tls-key", str(key))
    assert "not a readable file" in serve_fails(tmp_path, "--tls-cert", str(tmp_path / "nope.crt"),
                                                "--tls-key", str(key))
    mismatch = serve_fails(tmp_path, "--tls-cert", str(other_cert), "--tls-key", str(key))
    assert "is not the key of --tls-cert" in mismatch, mismatch


# -- plain HTTP ---------------------------------------------------------------------

def test_insecure_http_only_on_loopback(tmp_path):
    reg = Registry(tmp_path / "data", extra_args=["--insecure-http"]).start()
    try:
        assert reg.url.startswith("http://")
        assert httpx.get(reg.url + "/v2/", timeout=5).status_code in (200, 401)
        assert httpx.get(reg.url + "/ca", timeout=5).content == reg.ca.read_bytes()
        status = json.loads(moorage("status", "--existing", reg.url, "--json").stdout)
        assert status["replicas"][0]["url"] == reg.url and status["healthy"] == 1, status
    finally:
        reg.stop()
    refused = serve_fails(tmp_path, "--insecure-http", listen=f"0.0.0.0:{free_port()}")
    assert "--insecure-http is only allowed on a loopback address" in refused, refused
    assert not (tmp_path / "refused" / "replica.json").exists(), "refused before creating anything"


# -- the CLI's trust -----------------------------------------------------------------

def test_cli_trusts_by_ca_file_or_fingerprint_and_refuses_otherwise(registry):
    fp = der_fingerprint(registry.ca.read_bytes())
    untrusted = {"MOORAGE_CA_CERT": ""}  # no CA from the environment

    out = moorage("status", "--existing", registry.url, check=False, env=untrusted)
    assert out.returncode == 1 and "is not trusted" in out.stderr and "--ca-cert" in out.stderr, out.stderr
    assert "--ca-fingerprint" in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr

    wrong = "sha256:" + "0" * 64
    out = moorage("status", "--existing", registry.url, "--ca-fingerprint", wrong, check=False, env=untrusted)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert f"has the fingerprint {fp}, not the {wrong}" in out.stderr, out.stderr
    out = moorage("status", "--existing", registry.url, "--ca-fingerprint", "sha256:xyz", check=False,
                  env=untrusted)
    assert out.returncode == 1 and "64 hex digits" in out.stderr, out.stderr

    table = moorage("status", "--existing", registry.url, "--ca-fingerprint", fp, env=untrusted).stdout
    assert f"cluster CA {fp}" in table, table
    assert moorage("status", "--existing", registry.url, "--ca-cert", str(registry.ca),
                   env=untrusted).returncode == 0
    assert moorage("status", "--existing", registry.url, "--insecure-tls", env=untrusted).returncode == 0
    status = json.loads(moorage("status", "--existing", registry.url, "--json").stdout)  # $MOORAGE_CA_CERT
    assert status["ca_fingerprint"] == fp and status["replicas"][0]["url"] == registry.url
    assert status["healthy"] == 1, status  # the replica's own ping verifies over TLS too
