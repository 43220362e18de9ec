"""The cluster's certificate authority and each replica's certificates.

The first replica makes a CA; a joining replica receives the CA (certificate
and key) from the cluster, over TLS and after admin authentication, and
issues its own certificates from it. Every replica can therefore sign for the
next one, and no replica ever depends on another being alive to restart.

On disk (per replica):

    DATA_DIR/tls/ca.crt      the CA certificate: the only file there, so the
                             directory works as skopeo's --cert-dir and as
                             docker's certs.d/<host:port>/
    DATA_DIR/pki/ca.key      the CA key                              (0600)
    DATA_DIR/pki/node.crt    etcd peer, server and client certificate
    DATA_DIR/pki/node.key                                            (0600)
    DATA_DIR/pki/api.crt     the HTTPS API's certificate (unless the operator
    DATA_DIR/pki/api.key     brings one with --tls-cert/--tls-key)   (0600)

Replica certificates are reissued at start when they no longer cover the
replica's names or are about to expire, so changing --advertise or adding a
--tls-name needs nothing but a restart.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
LEAF_DAYS = 825  # the longest lifetime browsers and Apple's clients accept
RENEW_BEFORE = dt.timedelta(days=30)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class PkiError(Exception):
    """A certificate or key that cannot be used; the message is one sentence."""


@dataclass(frozen=True)
class Paths:
    """Where one replica keeps its CA, keys and certificates."""

    data_dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.data_dir / "tls" / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.data_dir / "pki" / "ca.key"

    @property
    def node_cert(self) -> Path:
        return self.data_dir / "pki" / "node.crt"

    @property
    def node_key(self) -> Path:
        return self.data_dir / "pki" / "node.key"

    @property
    def api_cert(self) -> Path:
        return self.data_dir / "pki" / "api.crt"

    @property
    def api_key(self) -> Path:
        return self.data_dir / "pki" / "api.key"

    def has_ca(self) -> bool:
        return self.ca_cert.exists() and self.ca_key.exists()


# -- the CA ---------------------------------------------------------------------

def create_ca(paths: Paths, cluster_name: str) -> None:
    """A new cluster CA; only the first replica of a cluster calls this."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Moorage"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"Moorage cluster CA {cluster_name}"[:64])])
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    install_ca(paths, _pem_cert(cert), _pem_key(key))


def install_ca(paths: Paths, cert_pem: bytes, key_pem: bytes) -> None:
    """Write the CA a joining replica received from the cluster, after checking the pair."""
    cert, key = _load_pair(cert_pem, key_pem, "the cluster CA")
    if not _is_ca(cert):
        raise PkiError("the certificate offered as the cluster CA is not a CA certificate")
    _write(paths.ca_cert, cert_pem, private=False)
    _write(paths.ca_key, key_pem, private=True)


def ca_pem(paths: Paths) -> tuple[bytes, bytes]:
    """The CA certificate and key, as handed to a joining replica."""
    return paths.ca_cert.read_bytes(), paths.ca_key.read_bytes()


def not_after(cert_file: Path) -> float | None:
    """When the (first) certificate in a PEM file expires, as epoch seconds; None without one."""
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError):
        return None
    return cert.not_valid_after_utc.timestamp()


def fingerprint(cert_pem: bytes) -> str:
    """`sha256:<hex>` of the certificate's DER, what `--ca-fingerprint` checks."""
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


# -- replica certificates ----------------------------------------------------------

def replica_names(*hosts: str | None, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Every name a replica may be reached by: its hosts, this machine's name, loopback."""
    names: list[str] = []
    for host in (*hosts, *extra, socket.gethostname(), *LOOPBACK_NAMES):
        if host and host not in ("0.0.0.0", "::") and host not in names:
            names.append(host)
    return tuple(names)


def ensure_node_cert(paths: Paths, names: tuple[str, ...]) -> None:
    """The etcd certificate: server for clients and peers, client towards other members."""
    _ensure_leaf(paths, paths.node_cert, paths.node_key, names, server=True, client=True)


def ensure_api_cert(paths: Paths, names: tuple[str, ...]) -> None:
    _ensure_leaf(paths, paths.api_cert, paths.api_key, names, server=True, client=False)


def _ensure_leaf(paths: Paths, cert_path: Path, key_path: Path, names: tuple[str, ...],
                 server: bool, client: bool) -> None:
    if cert_path.exists() and key_path.exists() and _still_good(paths, cert_path, names):
        return
    ca_cert, ca_key = _load_pair(paths.ca_cert.read_bytes(), paths.ca_key.read_bytes(), "the cluster CA")
    key = ec.generate_private_key(ec.SECP256R1())
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + \
             ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Moorage"),
                                     x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(min(now + dt.timedelta(days=LEAF_DAYS), ca_cert.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                         content_commitment=False, data_encipherment=False,
                                         key_agreement=True, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write(key_path, _pem_key(key), private=True)
    _write(cert_path, _pem_cert(cert), private=False)


def _still_good(paths: Paths, cert_path: Path, names: tuple[str, ...]) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        covered = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except (ValueError, x509.ExtensionNotFound):
        return False
    return (cert.issuer == ca.subject
            and cert.not_valid_after_utc - _now() > RENEW_BEFORE
            and all(_general_name(n) in covered for n in names))


# -- TLS contexts ----------------------------------------------------------------

def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The HTTPS API's context: TLS 1.2 and later, HTTP/1.1 (what registries speak)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise PkiError(f"cannot use the TLS certificate {cert} with key {key}: {e}") from None
    return ctx


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """Trust the cluster CA only; with a certificate, also prove we are a replica (mTLS)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    if cert is not None and key is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


# -- helpers -----------------------------------------------------------------------

def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _load_pair(cert_pem: bytes, key_pem: bytes, what: str):
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise PkiError(f"{what} is not a PEM certificate and unencrypted key: {e}") from None
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise PkiError(f"{what}'s key does not belong to its certificate")
    return cert, key


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool) -> None:
    """Atomically, and for keys never readable by others, not even for an instant."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if private:
        os.chmod(path.parent, 0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
