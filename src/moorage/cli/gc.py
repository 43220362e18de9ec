"""`moorage gc`: collect garbage on a running cluster, or show past runs."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone

from moorage.cli.adminclient import AdminClient, add_cluster_options
from moorage.cli.errors import CliError
from moorage.cli.tables import print_table
from moorage.units import human_bytes

POLL_SECONDS = 0.5


def register(commands) -> None:
    p = commands.add_parser(
        "gc", help="free the storage of deleted images (garbage collection), online",
        description="Start a garbage collection on the cluster and follow it until it is done: unreferenced "
                    "blobs, untagged manifests (when gc.untagged_after_seconds is set), abandoned uploads "
                    "and leftover files are deleted while pushes and pulls go on. One run at a time per "
                    "cluster. Settings: gc.schedule, gc.grace_seconds, gc.untagged_after_seconds, "
                    "gc.upload_max_age_seconds (`moorage config list`).")
    p.add_argument("--dry-run", action="store_true", help="count what would be freed; delete nothing")
    p.add_argument("--history", action="store_true", help="list every kept run's summary instead")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_cluster_options(p)
    p.set_defaults(run=run_gc)


def run_gc(args: argparse.Namespace) -> int:
    admin = AdminClient(args)
    try:
        if args.history:
            return _history(admin, args.json)
        run = admin.call("POST", "/_admin/gc", {"dry_run": args.dry_run})
        shown = ""
        while run["state"] == "running":
            line = _progress(run)
            if line != shown and not args.json:
                print(line, file=sys.stderr, flush=True)
                shown = line
            time.sleep(POLL_SECONDS)
            run = admin.call("GET", f"/_admin/gc/{run['id']}")
    finally:
        admin.close()
    if args.json:
        print(json.dumps(run, indent=2))
    else:
        print(_summary(run))
    if run["state"] != "done":
        raise CliError(f"garbage collection run {run['id']} {run['state']}: {run.get('error') or 'no reason given'}")
    return 0


def _progress(run: dict) -> str:
    return (f"{run['phase']}: kept {run['manifests_kept']} manifests, {run['blobs_kept']} blobs; swept "
            f"{run['manifests_swept']} manifests, {run['blobs_swept']} blobs; {human_bytes(run['bytes_freed'])} freed")


def _summary(run: dict, now: float | None = None) -> str:
    would = "would free" if run["dry_run"] else "freed"
    took = (run["finished"] or time.time()) - run["started"]
    line = (f"run {run['id']} {run['state']} in {took:.1f}s{' (dry run: nothing deleted)' * run['dry_run']}: "
            f"{would} {human_bytes(run['bytes_freed'])} — {run['blobs_swept']} blobs, {run['manifests_swept']} "
            f"manifests, {run['links_swept']} repository links, {run['uploads_swept']} uploads, "
            f"{run['orphans_swept'] + run['tmp_swept']} leftover files; kept {run['blobs_kept']} blobs in use and "
            f"{run['manifests_kept']} manifests; {run['conflicts']} items kept because a push or delete raced")
    young = run.get("blobs_young") or 0
    if young:
        first, last = run["young_collectable_from"], run["young_collectable_until"]
        when = f"from {_at(first, now)}" + (f" (all by {_at(last, now)})" if last - first >= 60 else "")
        line += (f"\n{young} unused blob{'s' * (young != 1)} ({human_bytes(run['bytes_young'])}) "
                 f"{'are' if young != 1 else 'is'} kept only for {'their' if young != 1 else 'its'} age "
                 f"(younger than gc.grace_seconds): collectable {when}; run `moorage gc` again then, "
                 "or let gc.schedule do it")
    return line


def _at(ts: float, now: float | None = None) -> str:
    """A time to come, for people: the UTC clock time and how far off it is."""
    left = max(ts - (time.time() if now is None else now), 0)
    if left < 90:
        off = f"{left:.0f}s"
    elif left < 5400:
        off = f"{left / 60:.0f}m"
    else:
        off = f"{left / 3600:.1f}h"
    return f"{datetime.fromtimestamp(ts, timezone.utc).strftime('%Y-%m-%d %H:%M:%S')} UTC, in {off}"


def _history(admin: AdminClient, as_json: bool) -> int:
    runs = admin.call("GET", "/_admin/gc")["runs"]
    if as_json:
        print(json.dumps(runs, indent=2))
        return 0
    if not runs:
        print("no garbage collection has run yet")
        return 0
    rows = [[r["id"], datetime.fromtimestamp(r["started"], timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
             r["replica"][:12], r["trigger"] + (" dry-run" if r["dry_run"] else ""), r["state"],
             f"{(r['finished'] or time.time()) - r['started']:.1f}s", str(r["blobs_swept"]),
             str(r["manifests_swept"]), human_bytes(r["bytes_freed"]), str(r["conflicts"])]
            for r in runs]
    print_table(["RUN", "STARTED (UTC)", "REPLICA", "TRIGGER", "STATE", "TOOK", "BLOBS", "MANIFESTS",
                 "FREED", "RACES"], rows)
    return 0
