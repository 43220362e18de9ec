"""Talking to a running cluster from the command line: --existing, TLS trust, admin credentials.

Credentials come from --username / --password-stdin, else MOORAGE_USERNAME /
MOORAGE_PASSWORD, else a prompt when a terminal is attached; without one, a
missing value is an error, never a hang.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from typing import Any

import httpx

from moorage.cli.main import CliError

TIMEOUT = httpx.Timeout(30.0, connect=5.0)


def add_cluster_options(p: argparse.ArgumentParser, existing_required: bool = True) -> None:
    p.add_argument("--existing", required=existing_required, metavar="URL",
                   help="URL of any healthy replica, e.g. https://registry-1:5000")
    p.add_argument("--insecure-tls", action="store_true",
                   help="trust the replica's TLS certificate without checking it")
    p.add_argument("--ca-cert", metavar="FILE", help="trust replicas whose certificates this CA signed")
    p.add_argument("--username", help="admin user (default: $MOORAGE_USERNAME, else asked)")
    p.add_argument("--password-stdin", action="store_true", help="read the admin password from stdin")


def ask(given: str | None, prompt: str) -> str:
    """A value from its flag, else asked for at a terminal, else an error."""
    return _value(given, None, prompt, secret=False)


def _value(given: str | None, env: str | None, prompt: str, secret: bool) -> str:
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
    hint = f", or set ${env}" if env else ""
    raise CliError(f"{prompt.rstrip(': ').lower()} is required: pass it as described in --help{hint}")


def credentials(args: argparse.Namespace) -> tuple[str, str]:
    username = _value(args.username, "MOORAGE_USERNAME", "Username: ", secret=False)
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
        if not password:
            raise CliError("--password-stdin was given but stdin had no password")
    else:
        password = _value(None, "MOORAGE_PASSWORD", "Password: ", secret=True)
    return username, password


class AdminClient:
    def __init__(self, args: argparse.Namespace):
        url = args.existing.rstrip("/")
        if not url.startswith(("http://", "https://")):
            url = "https://" + url
        verify: Any = True
        if args.insecure_tls:
            verify = False
        elif args.ca_cert:
            verify = args.ca_cert
        self.url = url
        self.http = httpx.Client(base_url=url, auth=credentials(args), verify=verify, timeout=TIMEOUT)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            r = self.http.request(method, path, json=body)
        except httpx.ConnectError as e:
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
