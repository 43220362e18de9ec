"""A replica's HTTPS: its flags, the cluster CA on the first start, the API's TLS context.

The API is HTTPS by default, with a certificate from the cluster CA that is
reissued whenever it stops covering the replica's names. An operator who
wants clients to trust the registry without adding our CA brings their own
certificate (`--tls-cert/--tls-key`). Plain HTTP is refused unless asked
for, and even then only on loopback, where no network can see the traffic.
"""

from __future__ import annotations

import argparse
import ipaddress
import ssl
import sys
from pathlib import Path

from moorage.cli.main import CliError
from moorage.cluster import pki


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", type=Path, default=None, metavar="FILE",
                   help="serve the API with this certificate (PEM, may include the chain) instead of "
                        "one from the cluster CA; needs --tls-key")
    p.add_argument("--tls-key", type=Path, default=None, metavar="FILE",
                   help="the private key of --tls-cert (PEM, unencrypted)")
    p.add_argument("--tls-name", action="append", default=[], metavar="NAME",
                   help="another name (DNS name or IP) the API certificate must cover, e.g. the load "
                        "balancer's; repeatable")
    p.add_argument("--insecure-http", action="store_true",
                   help="serve plain HTTP instead of HTTPS; only allowed when --listen is a loopback address")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_options(args: argparse.Namespace, listen_host: str) -> None:
    """Refuse inconsistent TLS flags before anything starts."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise CliError("--tls-cert and --tls-key go together: pass both, or neither to use a "
                       "certificate from the cluster CA")
    if args.insecure_http:
        if args.tls_cert is not None:
            raise CliError("--insecure-http serves plain HTTP, so it cannot be combined with --tls-cert")
        if not is_loopback(listen_host):
            raise CliError(f"--insecure-http is only allowed on a loopback address (127.0.0.1, ::1 or "
                           f"localhost), not on {listen_host}; remove it to serve HTTPS")
    if args.tls_cert is not None:
        _operator_context(args)  # a bad pair is refused before anything is created


def _operator_context(args: argparse.Namespace) -> ssl.SSLContext:
    for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if not path.is_file():
            raise CliError(f"{flag} {path} is not a readable file")
    try:
        return pki.server_context(args.tls_cert, args.tls_key)
    except pki.PkiError as e:
        if "KEY_VALUES_MISMATCH" in str(e):
            raise CliError(f"--tls-key {args.tls_key} is not the key of --tls-cert {args.tls_cert}") from None
        raise CliError(str(e)) from None


def ensure_ca(paths: pki.Paths, cluster_name: str, joining: bool) -> None:
    """The first replica of a cluster makes the CA; a joining one must have received it."""
    if paths.ca_cert.exists():
        if not paths.ca_key.exists():
            raise CliError(f"{paths.ca_cert} exists but the CA key {paths.ca_key} is missing; "
                           "restore it from a backup of this data directory")
        return
    if joining:
        raise CliError("this replica was not given the cluster CA while joining; remove its data "
                       "directory and join again")
    pki.create_ca(paths, cluster_name)
    fp = pki.fingerprint(paths.ca_cert.read_bytes())
    print(f"moorage: cluster CA fingerprint {fp} ({paths.ca_cert})", file=sys.stderr, flush=True)


def api_context(args: argparse.Namespace, paths: pki.Paths, names: tuple[str, ...]) -> ssl.SSLContext | None:
    """The HTTPS API's context (None for --insecure-http), issuing our certificate if needed."""
    if args.insecure_http:
        return None
    if args.tls_cert is not None:
        return _operator_context(args)
    try:
        pki.ensure_api_cert(paths, names)
        return pki.server_context(paths.api_cert, paths.api_key)
    except pki.PkiError as e:
        raise CliError(str(e)) from None
