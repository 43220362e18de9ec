"""`moorage audit`: who wrote what, and who was refused, across the whole cluster."""

from __future__ import annotations

import argparse
import json
import re
import time
from datetime import datetime, timezone
from urllib.parse import urlencode

from moorage.cli.adminclient import AdminClient, add_cluster_options
from moorage.cli.cluster import print_table
from moorage.cli.main import CliError
from moorage.registry.audit import KINDS, MAX_LIMIT

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_PATH_WIDTH = 72


def register(commands) -> None:
    p = commands.add_parser(
        "audit", help="the audit log: every write and every refused request",
        description="Show the cluster's audit log, newest first: every write and every request refused "
                    "for credentials or permission, with who, when, from where and on which replica.")
    p.add_argument("--since", metavar="WHEN",
                   help="only events after WHEN: a duration back from now (30m, 12h, 7d) or an ISO 8601 time")
    p.add_argument("--until", metavar="WHEN", help="only events before WHEN (same forms as --since)")
    p.add_argument("--user", help="only events of this user (or that claimed to be this user)")
    p.add_argument("--repo", help="only events on this repository")
    p.add_argument("--kind", choices=KINDS, help="only events of this kind")
    p.add_argument("--limit", type=int, default=100,
                   help=f"at most this many events (default 100, at most {MAX_LIMIT})")
    add_cluster_options(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run_audit)


def parse_when(value: str, now: float | None = None) -> float:
    """A duration back from now, or an ISO 8601 time (UTC unless it says otherwise), as epoch seconds."""
    m = _DURATION.match(value.strip())
    if m:
        return (time.time() if now is None else now) - float(m.group(1)) * _UNIT[m.group(2)]
    try:
        dt = datetime.fromisoformat(value.strip())
    except ValueError:
        raise CliError(f"{value!r} is neither a duration (30m, 12h, 7d) nor an ISO 8601 time") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def run_audit(args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= MAX_LIMIT:
        raise CliError(f"--limit takes a number from 1 to {MAX_LIMIT}")
    params = {"limit": str(args.limit)}
    for name in ("since", "until"):
        value = getattr(args, name)
        if value:
            params[name] = repr(parse_when(value))
    for name in ("user", "repo", "kind"):
        value = getattr(args, name)
        if value:
            params[name] = value
    admin = AdminClient(args)
    try:
        result = admin.call("GET", "/_admin/audit?" + urlencode(params))
    finally:
        admin.close()
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    events = result["events"]
    if not events:
        print("no matching events")
        return 0
    print_table(["TIME (UTC)", "REPLICA", "KIND", "USER", "FROM", "REQUEST", "STATUS", "DETAIL"],
                [_row(e) for e in events])
    if result.get("truncated"):
        print(f"\nshowing the newest {len(events)}; narrow the query or raise --limit for more")
    return 0


def _row(e: dict) -> list[str]:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["time"]))
    user = e.get("user") or (f"{e['claimed']} (refused)" if e.get("claimed") else "anonymous")
    remote = e.get("remote") or "-"
    if e.get("forwarded"):
        remote += f" (for {e['forwarded']})"
    request = f"{e['method']} {e['path']}"
    if len(request) > _PATH_WIDTH:
        request = request[:_PATH_WIDTH - 1] + "…"
    return [_printable(x) for x in
            (when, e["replica"], e["kind"], user, remote, request, str(e["status"]), e.get("detail") or "")]


def _printable(text: str) -> str:
    """Client-supplied text (a claimed user name, X-Forwarded-For) must not drive the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
