"""`moorage audit`: who wrote what, and who was refused, across the whole cluster."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from datetime import datetime, timezone
from urllib.parse import urlencode

from moorage.cli.adminclient import AdminClient, add_cluster_options
from moorage.cli.errors import CliError
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
    p.add_argument("--kind", choices=KINDS,
                   help="only events of this kind (default: all but challenged, the requests without "
                        "credentials that every client starts with, which are counted instead)")
    p.add_argument("--limit", type=int, default=100,
                   help="at most this many events (default 100); fetched in pages, so any number works")
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
    if args.limit < 1:
        raise CliError("--limit takes a positive number")
    params: dict[str, str] = {}
    for name in ("since", "until"):
        value = getattr(args, name)
        if value:
            params[name] = repr(parse_when(value))
    for name in ("user", "repo", "kind"):
        value = getattr(args, name)
        if value:
            params[name] = value
    admin = AdminClient(args)
    out = _JsonOut() if args.json else _TableOut()
    try:
        more = False
        for events, more, challenged in pages(admin, params, args.limit):
            out.page(events, challenged)
    finally:
        admin.close()
    out.finish(more, args.kind is None)
    return 0


def pages(admin: AdminClient, params: dict[str, str], limit: int):
    """(events, more, challenged) a page (at most MAX_LIMIT events) at a time, newest first.

    Each page asks for events up to the time of the last one shown (`until`
    is inclusive) and skips those at exactly that time it has shown already:
    the log's order is stable, so they come first again.
    """
    left, until, skip = limit, params.get("until"), 0
    while left > 0:
        if skip >= MAX_LIMIT:
            raise CliError(f"more than {MAX_LIMIT} events share one instant; narrow the query")
        query = {**params, "limit": str(min(left + skip, MAX_LIMIT))}
        if until is not None:
            query["until"] = until
        result = admin.call("GET", "/_admin/audit?" + urlencode(query))
        found, more = result["events"], bool(result.get("truncated"))
        events = found[skip:]
        left -= len(events)
        yield events, more and bool(events), result.get("challenged", 0)
        if not more or not events:
            return
        last = events[-1]["time"]
        until, skip = repr(last), sum(1 for e in found if e["time"] == last)


class _JsonOut:
    """One JSON document, written as the pages come: memory stays one page, whatever --limit says."""

    def __init__(self) -> None:
        self.count = 0
        self.challenged = 0
        self.started = False

    def _start(self) -> None:
        if not self.started:  # not before the first answer: a refusal leaves stdout empty
            sys.stdout.write('{"events": [')
            self.started = True

    def page(self, events: list[dict], challenged: int) -> None:
        self._start()
        for e in events:
            sys.stdout.write(("," if self.count else "") + "\n  " + json.dumps(e))
            self.count += 1
        self.challenged += challenged
        sys.stdout.flush()

    def finish(self, more: bool, default_kinds: bool) -> None:
        self._start()
        sys.stdout.write(f"\n], \"count\": {self.count}, \"truncated\": {json.dumps(more)}, "
                         f"\"challenged\": {self.challenged}}}\n")


class _TableOut:
    """A table whose column widths the first page sets; later pages follow them."""

    HEADER = ["TIME (UTC)", "REPLICA", "KIND", "USER", "FROM", "REQUEST", "STATUS", "DETAIL"]

    def __init__(self) -> None:
        self.widths: list[int] | None = None
        self.count = 0
        self.challenged = 0

    def page(self, events: list[dict], challenged: int) -> None:
        rows = [_row(e) for e in events]
        self.challenged += challenged
        if not rows:
            return
        if self.widths is None:
            self.widths = [max(len(x) for x in col) for col in zip(self.HEADER, *rows)]
            self._print(self.HEADER)
        for row in rows:
            self._print(row)
        self.count += len(rows)

    def _print(self, row: list[str]) -> None:
        assert self.widths is not None
        print("  ".join(x.ljust(w) for x, w in zip(row, self.widths)).rstrip())

    def finish(self, more: bool, default_kinds: bool) -> None:
        if not self.count:
            print("no matching events")
        elif more:
            print(f"\nshowing the newest {self.count}; narrow the query or raise --limit for more")
        if default_kinds and self.challenged:
            n = self.challenged
            print(f"\n{n} request{'s' * (n != 1)} without credentials "
                  f"in this period {'are' if n != 1 else 'is'} not listed: each client's first request, answered "
                  "with a token challenge (`--kind challenged` lists them)")


def _row(e: dict) -> list[str]:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["time"]))
    user = e.get("user") or (f"{e['claimed']} (refused)" if e.get("claimed") else "anonymous")
    remote = e.get("remote") or "-"
    if e.get("via"):
        remote += f" (via {e['via']})"
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
