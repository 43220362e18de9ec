"""A replica's HTTPS: its options, the cluster CA on the first start, the API's TLS context.

The API is HTTPS by default, with a certificate from the cluster CA that is
reissued whenever it stops covering the replica's names. An operator who
wants clients to trust the registry without adding our CA brings their own
certificate (`--tls-cert/--tls-key`). Plain HTTP is refused unless asked
for, and even then only on loopback, where no network can see the traffic.
Every refusal is a PkiError of one sentence.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moorage.cluster import pki
from moorage.cluster.pki import PkiError


@dataclass(frozen=True)
class HttpsOptions:
    cert: Path | None = None        # --tls-cert: the operator's own certificate...
    key: Path | None = None         # ...and its key
    names: tuple[str, ...] = ()     # --tls-name: more names our certificate must cover
    insecure_http: bool = False     # --insecure-http: plain HTTP, on loopback only


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_options(options: HttpsOptions, listen_host: str) -> None:
    """Refuse inconsistent TLS options before anything starts."""
    if (options.cert is None) != (options.key is None):
        raise PkiError("--tls-cert and --tls-key go together: pass both, or neither to use a "
                       "certificate from the cluster CA")
    if options.insecure_http:
        if options.cert is not None:
            raise PkiError("--insecure-http serves plain HTTP, so it cannot be combined with --tls-cert")
        if not is_loopback(listen_host):
            raise PkiError(f"--insecure-http is only allowed on a loopback address (127.0.0.1, ::1 or "
                           f"localhost), not on {listen_host}; remove it to serve HTTPS")
    if options.cert is not None:
        _operator_context(options)  # a bad pair is refused before anything is created


def _operator_context(options: HttpsOptions) -> ssl.SSLContext:
    assert options.cert is not None and options.key is not None
    for flag, path in (("--tls-cert", options.cert), ("--tls-key", options.key)):
        if not path.is_file():
            raise PkiError(f"{flag} {path} is not a readable file")
    try:
        return pki.server_context(options.cert, options.key)
    except PkiError as e:
        if "KEY_VALUES_MISMATCH" in str(e):
            raise PkiError(f"--tls-key {options.key} is not the key of --tls-cert {options.cert}") from None
        raise


def ensure_ca(paths: pki.Paths, cluster_name: str, joining: bool, announce: Callable[[str], None]) -> None:
    """The first replica of a cluster makes the CA (and announces its fingerprint); a joining one
    must have received it."""
    if paths.ca_cert.exists():
        if not paths.ca_key.exists():
            raise PkiError(f"{paths.ca_cert} exists but the CA key {paths.ca_key} is missing; "
                           "restore it from a backup of this data directory")
        return
    if joining:
        raise PkiError("this replica was not given the cluster CA while joining; remove its data "
                       "directory and join again")
    pki.create_ca(paths, cluster_name)
    announce(f"cluster CA fingerprint {pki.fingerprint(paths.ca_cert.read_bytes())} ({paths.ca_cert})")


def api_context(options: HttpsOptions, paths: pki.Paths, names: tuple[str, ...]) -> ssl.SSLContext | None:
    """The HTTPS API's context (None for --insecure-http), issuing our certificate if needed."""
    if options.insecure_http:
        return None
    if options.cert is not None:
        return _operator_context(options)
    pki.ensure_api_cert(paths, names)
    return pki.server_context(paths.api_cert, paths.api_key)
