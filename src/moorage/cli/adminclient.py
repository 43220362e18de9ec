"""Talking to a running cluster from the command line: which replica, TLS trust, admin credentials.

Which replica, most explicit first: --existing URL, else $MOORAGE_URL (for
scripts), else the replica of this node: the URL it recorded in
DATA_DIR/api.json (--data-dir, default ./moorage-data, like `serve`), so
`moorage status` on a replica's node needs no flag at all.

Trust, most explicit first: --insecure-tls (none), --ca-fingerprint (fetch
the CA from the replica's /ca, check it against the fingerprint the first
start printed, then trust exactly that CA), --ca-cert FILE or
$MOORAGE_CA_CERT (the cluster CA, e.g. a copy of DATA_DIR/tls/ca.crt); on a
replica's node, the CA file that replica recorded; otherwise the system's
trust store, for operators with their own certificates.

Credentials come from --username / --password-stdin, else MOORAGE_USERNAME /
MOORAGE_PASSWORD, else a prompt when a terminal is attached; without one, a
missing value is a one-sentence error naming the flag and variable, never a hang.
"""

from __future__ import annotations

import argparse
import getpass
import hmac
import os
import ssl
import sys
from pathlib import Path
from typing import Any

import httpx

from moorage.cli.errors import CliError
from moorage.cluster import endpoint, pki

TIMEOUT = httpx.Timeout(30.0, connect=5.0)
DEFAULT_DATA_DIR = Path("./moorage-data")


def add_cluster_options(p: argparse.ArgumentParser, joining: bool = False) -> None:
    """`joining`: `join`, whose --data-dir is the new replica's, must name the cluster it joins."""
    if joining:
        p.add_argument("--existing", required=True, metavar="URL",
                       help="URL of any healthy replica, e.g. https://registry-1:5000")
    else:
        p.add_argument("--existing", metavar="URL",
                       help="URL of any healthy replica, e.g. https://registry-1:5000 (default: $MOORAGE_URL, "
                            "else the replica of this node, found in --data-dir)")
        p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                       help="on a replica's node: its data directory, where it records its URL and CA "
                            "(default: ./moorage-data)")
    trust = p.add_mutually_exclusive_group()
    trust.add_argument("--ca-cert", metavar="FILE", default=os.environ.get("MOORAGE_CA_CERT") or None,
                       help="trust replicas whose certificates this CA signed, e.g. a copy of a replica's "
                            "DATA_DIR/tls/ca.crt (default: $MOORAGE_CA_CERT, else this node's replica's CA)")
    trust.add_argument("--ca-fingerprint", metavar="sha256:HEX",
                       help="fetch the cluster CA from the replica and trust it if its fingerprint is this "
                            "one (the first start printed it; `moorage status` shows it)")
    trust.add_argument("--insecure-tls", action="store_true",
                       help="trust the replica's TLS certificate without checking it")
    p.add_argument("--username", help="admin user (default: $MOORAGE_USERNAME, else asked at a terminal)")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the admin password from stdin (default: $MOORAGE_PASSWORD, else asked at a terminal)")


def target(args: argparse.Namespace) -> tuple[str, str | None]:
    """The replica to talk to, and the CA file this node's replica recorded (None: none here).

    Every replica of a cluster has a certificate from the same CA, so the node's
    own CA also verifies the others that --existing or $MOORAGE_URL may name.
    """
    data_dir = getattr(args, "data_dir", None) or DEFAULT_DATA_DIR
    local = endpoint.load(data_dir)
    url = args.existing or os.environ.get("MOORAGE_URL") or ""
    if not url:
        if local is None:
            raise CliError(f"which replica? pass --existing URL (any replica) or set $MOORAGE_URL; on a "
                           f"replica's node, --data-dir names its data directory ({data_dir} holds no "
                           "replica that has served)")
        url = local.url
    local_ca = local.ca_cert if local is not None else None
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        url = "https://" + url
    return url, local_ca


def ask(given: str | None, prompt: str, missing: str) -> str:
    """A value from its flag, else asked for at a terminal, else the error `missing`."""
    return _value(given, None, prompt, False, missing)


def _value(given: str | None, env: str | None, prompt: str, secret: bool, missing: str) -> str:
    if given:
        return given
    if env and os.environ.get(env):
        return os.environ[env]
    if sys.stdin.isatty():
        try:
            value = getpass.getpass(prompt) if secret else input(prompt)
        except EOFError:
            value = ""
        if value:
            return value
    raise CliError(missing)


def credentials(args: argparse.Namespace) -> tuple[str, str]:
    username = _value(args.username, "MOORAGE_USERNAME", "Username: ", False,
                      "no admin username: pass --username NAME or set $MOORAGE_USERNAME (at a terminal, "
                      "moorage asks)")
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
        if not password:
            raise CliError("--password-stdin was given but stdin had no password")
    else:
        password = _value(None, "MOORAGE_PASSWORD", "Password: ", True,
                          "no admin password: set $MOORAGE_PASSWORD or pipe it in with --password-stdin "
                          "(at a terminal, moorage asks)")
    return username, password


class AdminClient:
    def __init__(self, args: argparse.Namespace):
        url, local_ca = target(args)
        self.url = url
        # The CA file trusted, when one is (`lb haproxy` hands the same file to HAProxy).
        self.ca_file: str | None = getattr(args, "ca_cert", None) or (
            local_ca if not getattr(args, "ca_fingerprint", None) and not getattr(args, "insecure_tls", False)
            else None)
        verify, self.ca_pem = trust(args, url, self.ca_file)
        self.http = httpx.Client(base_url=url, auth=credentials(args), verify=verify, timeout=TIMEOUT)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            r = self.http.request(method, path, json=body)
        except httpx.ConnectError as e:
            if _cert_failed(e):
                raise CliError(untrusted(self.url, e)) from None
            raise CliError(f"cannot reach {self.url}: {e}") from None
        except httpx.TimeoutException:
            raise CliError(f"{self.url} did not answer in time") from None
        except httpx.HTTPError as e:
            raise CliError(f"talking to {self.url} failed: {e}") from None
        try:
            data = r.json()
        except ValueError:
            data = None
        if r.status_code == 401:
            raise CliError(f"{self.url} refused the admin credentials")
        if r.status_code >= 400:
            message = data.get("error") if isinstance(data, dict) else None
            raise CliError(message or f"{self.url} answered {r.status_code} to {method} {path}")
        return data

    def close(self) -> None:
        self.http.close()


# -- TLS trust -------------------------------------------------------------------

def trust(args: argparse.Namespace, url: str, ca_file: str | None) -> tuple[ssl.SSLContext | bool, bytes | None]:
    """What to verify replicas' certificates with, and the cluster CA's PEM when we know it."""
    if getattr(args, "insecure_tls", False):
        return False, None
    if getattr(args, "ca_fingerprint", None):
        pem = _fetch_ca(url, args.ca_fingerprint)
        return _context(pem), pem
    if ca_file:
        try:
            pem = open(ca_file, "rb").read()
            return _context(pem), pem
        except OSError as e:
            raise CliError(f"cannot read the CA certificate {ca_file}: {e.strerror}") from None
        except ssl.SSLError:
            raise CliError(f"{ca_file} is not a PEM certificate") from None
    return True, None


def untrusted(url: str, error: Exception) -> str:
    """The one sentence for a certificate that failed verification, naming the fix."""
    reason = getattr(_cert_error(error), "verify_message", None) or "verification failed"
    return (f"the TLS certificate of {url} is not trusted ({reason}): pass the cluster CA with "
            "--ca-cert FILE (a copy of a replica's DATA_DIR/tls/ca.crt, or set $MOORAGE_CA_CERT) or "
            "check it with --ca-fingerprint sha256:HEX (as the first start printed it)")


def _context(pem: bytes) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=pem.decode("ascii", "replace"))


def _normal_fingerprint(value: str) -> str:
    hexpart = value.strip().lower().removeprefix("sha256:").replace(":", "")
    if len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise CliError(f"--ca-fingerprint takes sha256: and 64 hex digits, not {value!r}")
    return "sha256:" + hexpart


def _fetch_ca(url: str, expected: str) -> bytes:
    """The replica's CA, unverified (that is what the fingerprint is for), checked by its fingerprint."""
    want = _normal_fingerprint(expected)
    try:
        with httpx.Client(verify=False, timeout=TIMEOUT) as http:
            r = http.get(url + "/ca")
    except httpx.HTTPError as e:
        raise CliError(f"cannot fetch the cluster CA from {url}/ca: {e}") from None
    if r.status_code != 200:
        raise CliError(f"{url}/ca answered {r.status_code}, not the cluster CA")
    try:
        got = pki.fingerprint(r.content)
    except ValueError:
        raise CliError(f"{url}/ca did not return a PEM certificate") from None
    if not hmac.compare_digest(got, want):
        raise CliError(f"the CA served by {url} has the fingerprint {got}, not the {want} given with "
                       "--ca-fingerprint: refusing to trust it")
    return r.content


def _cert_error(error: BaseException) -> ssl.SSLCertVerificationError | None:
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _cert_failed(error: BaseException) -> bool:
    return _cert_error(error) is not None or "CERTIFICATE_VERIFY_FAILED" in str(error)
