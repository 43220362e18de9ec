"""`moorage webhook`: endpoints that hear of pushes, pulls, deletes and garbage collection."""

from __future__ import annotations

import argparse
import json
import re
import time
from datetime import datetime, timezone
from pathlib import Path

from moorage.cli.adminclient import AdminClient, add_cluster_options
from moorage.cli.cluster import read_value
from moorage.cli.errors import CliError
from moorage.cli.tables import print_table

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m)?$")


def register(commands) -> None:
    p = commands.add_parser(
        "webhook", help="send events (push, pull, delete, gc) to HTTP endpoints",
        description="Webhook endpoints get each event as distribution's notification envelope "
                    "(application/vnd.docker.distribution.events.v1+json), at least once and in order, "
                    "from whichever replica is alive. docs/monitoring.md has the details.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    a = actions.add_parser("add", help="add an endpoint")
    a.add_argument("name", help="the endpoint's name (lowercase letters, digits, '.', '_', '-')")
    a.add_argument("--url", required=True, help="http:// or https:// URL events are POSTed to")
    a.add_argument("--events", default="push,delete",
                   help="comma-separated: push, pull, delete, gc (default: push,delete)")
    a.add_argument("--repository", action="append", default=[], metavar="PATTERN",
                   help="only events of these repositories: NAME, NAMESPACE/* or * (repeatable; default *)")
    a.add_argument("--secret-file", type=Path, default=None, metavar="FILE",
                   help="sign each body with HMAC-SHA256 of this secret (the Moorage-Signature header); "
                        "'-' reads it from standard input")
    a.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="send this header with every request, e.g. 'Authorization: Bearer ...' (repeatable)")
    a.add_argument("--endpoint-ca", type=Path, default=None, metavar="FILE",
                   help="trust this CA (PEM) for an https endpoint with its own")
    a.add_argument("--timeout", default="5s", help="time to wait for the endpoint's answer (default: 5s)")
    a.add_argument("--max-pending", type=int, default=10_000,
                   help="events kept waiting at most; newer ones are dropped and counted (default: 10000)")
    a.add_argument("--backoff-max", default="60s",
                   help="longest wait between retries of a failing endpoint (default: 60s)")
    for sub in (a,):
        add_cluster_options(sub)
        sub.add_argument("--json", action="store_true", help="print JSON")

    ls = actions.add_parser("list", help="the endpoints, with their pending events and delivery state")
    rm = actions.add_parser("remove", help="remove an endpoint and the events it has not received")
    rm.add_argument("name")
    t = actions.add_parser("test", help="send one test event to an endpoint now")
    t.add_argument("name")
    for sub in (ls, rm, t):
        add_cluster_options(sub)
        sub.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run_webhook)


def seconds(option: str, text: str) -> float:
    m = _DURATION.match(text.strip())
    if not m:
        raise CliError(f"{option} takes a duration such as 500ms, 5s or 2m, not {text!r}")
    value = float(m.group(1))
    return value / 1000 if m.group(2) == "ms" else value * 60 if m.group(2) == "m" else value


def endpoint_body(args: argparse.Namespace) -> dict:
    headers = {}
    for header in args.header:
        name, sep, value = header.partition(":")
        if not sep or not name.strip():
            raise CliError(f"--header takes 'NAME: VALUE', not {header.split(':')[0][:40]!r}...")
        headers[name.strip()] = value.strip()
    body = {"name": args.name, "url": args.url,
            "events": [e.strip() for e in args.events.split(",") if e.strip()],
            "repositories": args.repository or ["*"], "headers": headers,
            "timeout": seconds("--timeout", args.timeout), "max_pending": args.max_pending,
            "backoff_max": seconds("--backoff-max", args.backoff_max)}
    if args.secret_file is not None:
        secret = read_value(args.secret_file)
        if not secret:
            raise CliError(f"the secret file {args.secret_file} is empty")
        body["secret"] = secret
    if args.endpoint_ca is not None:
        try:
            body["ca_pem"] = args.endpoint_ca.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise CliError(f"cannot read --endpoint-ca {args.endpoint_ca}: {getattr(e, 'strerror', None) or e}") from None
    return body


def run_webhook(args: argparse.Namespace) -> int:
    body = endpoint_body(args) if args.action == "add" else None
    admin = AdminClient(args)
    try:
        if args.action == "add":
            result = admin.call("POST", "/_admin/webhooks", body)
        elif args.action == "remove":
            result = admin.call("DELETE", f"/_admin/webhooks/{args.name}")
        elif args.action == "test":
            result = admin.call("POST", f"/_admin/webhooks/{args.name}/test")
        else:
            result = admin.call("GET", "/_admin/webhooks")
    finally:
        admin.close()
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.action == "add":
        print(f"webhook {result['name']} added: {', '.join(result['events'])} of "
              f"{', '.join(result['repositories'])} to {result['url']}")
    elif args.action == "remove":
        print(f"webhook {result['removed']} removed")
    elif args.action == "test":
        if result["delivered"]:
            print(f"delivered to {result['name']} in {result['milliseconds']} ms")
    else:
        print_table(["NAME", "URL", "EVENTS", "REPOSITORIES", "PENDING", "DELIVERED BY", "STATE"],
                    [[w["name"], w["url"], ",".join(w["events"]), ",".join(w["repositories"]), str(w["pending"]),
                      w["delivering_replica"] or "-", _state(w)] for w in result["webhooks"]])
    if args.action == "test" and not result["delivered"]:
        raise CliError(f"{result['name']} did not take the test event: {result['error']}")
    return 0


def _state(w: dict) -> str:
    if w["failing_since"]:
        return f"failing since {_when(w['failing_since'])}: {w['last_error']}"
    if w["last_success"]:
        return f"delivered {_when(w['last_success'])}"
    return "nothing sent yet"


def _when(t: float) -> str:
    ago = time.time() - t
    if ago < 120:
        return f"{max(ago, 0):.0f}s ago"
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
