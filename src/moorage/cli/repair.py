"""`moorage emergency-repair`: make a stopped replica a cluster of one when a majority is lost for good.

It discards the lost replicas and possibly the newest writes, so it first
says exactly what goes and asks for "yes" (or takes --yes); every refusal is
one sentence and changes nothing. The etcd side is in cluster/repair.py.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from moorage import logs
from moorage.cli.errors import CliError
from moorage.cluster import pki, repair
from moorage.cluster.addresses import AddressError, check_ports_free
from moorage.cluster.identity import Identity


def register(commands) -> None:
    p = commands.add_parser(
        "emergency-repair", help="make this stopped replica a cluster of one after a majority is lost",
        description="Disaster recovery when a majority of replicas is lost for good: turn this (stopped) "
                    "replica into a cluster of one with all of its data, so new replicas can join it. "
                    "The other replicas are dropped for good.")
    p.add_argument("--data-dir", type=Path, default=Path("./moorage-data"),
                   help="the surviving replica's data directory (default: ./moorage-data)")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    logs.setup(args.log_level)
    data_dir = args.data_dir.resolve()
    identity = Identity.load(data_dir)
    if identity is None:
        raise CliError(f"{data_dir} holds no replica (no replica.json); pass the surviving replica's "
                       "--data-dir")
    if not (repair.etcd_data_dir(data_dir) / "member").is_dir():
        raise CliError(f"{data_dir} holds no etcd data for replica {identity.replica_id}, so there is "
                       "nothing to repair from")
    _refuse_if_running(data_dir, identity)
    if not args.yes and not sys.stdin.isatty():
        raise CliError("emergency-repair discards replicas and asks for confirmation first: run it at a "
                       "terminal, or pass --yes once you are sure the other replicas are lost")
    _node_certificate(data_dir, identity)
    try:
        plan = asyncio.run(repair.read_plan(data_dir, identity))
        if not plan.lost:
            raise CliError(f"replica {identity.replica_id} is already a cluster of one; start it with "
                           f"`moorage serve --data-dir {args.data_dir}`")
        print(describe(plan, data_dir), flush=True)
        if not args.yes:
            _confirm()
        result = asyncio.run(repair.force_new_cluster(data_dir, identity, plan))
    except repair.RepairRefused as e:
        raise CliError(str(e)) from None
    print(summary(plan, result, args.data_dir), flush=True)
    return 0


def _node_certificate(data_dir: Path, identity: Identity) -> None:
    """etcd runs with mutual TLS: the repair needs the replica's node certificate, as `serve` does
    (reissued from the replica's CA if it lapsed while the replica was down)."""
    paths = pki.Paths(data_dir)
    if not paths.has_ca():
        raise CliError(f"{data_dir} holds no cluster CA (tls/ca.crt and pki/ca.key), so its etcd member "
                       "cannot be started with the cluster's TLS; restore them from a backup of this "
                       "data directory")
    pki.ensure_node_cert(paths, pki.replica_names(identity.advertise))


def _refuse_if_running(data_dir: Path, identity: Identity) -> None:
    running = f"replica {identity.replica_id} seems to be running"
    if repair.etcd_data_in_use(data_dir):
        raise CliError(f"{running} (its etcd data is locked by a process); stop it first")
    try:
        check_ports_free([(identity.advertise, identity.etcd_client_port, "its etcd client port"),
                          (identity.advertise, identity.etcd_peer_port, "its etcd peer port")])
    except AddressError as e:
        raise CliError(f"{running}: {e}; stop it first") from None


def _when(ts: float) -> str:
    seconds = max(time.time() - ts, 0)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
    if seconds < 120:
        return f"{when} ({seconds:.0f}s ago)"
    return f"{when} ({seconds / 60:.0f} min ago)" if seconds < 7200 else f"{when} ({seconds / 3600:.0f} h ago)"


def describe(plan: repair.Plan, data_dir: Path) -> str:
    """What the repair will do and discard, in plain words, before anything is changed."""
    n = len(plan.lost)
    lines = [
        f"Emergency repair of replica {plan.replica_id} ({data_dir}).",
        "",
        "This will:",
        "  - start this replica's etcd member once with --force-new-cluster: it keeps all of its data and "
        "becomes the only member of the cluster;",
        f"  - drop {'this replica' if n == 1 else f'these {n} replicas'} from the cluster for good "
        "(as this replica's etcd data lists them):",
    ]
    for x in plan.lost:
        lines.append(f"      {x.name}  etcd member {x.member_id:x}{' (learner)' if x.learner else ''}  "
                     f"peer {x.peer_url or '-'}  {'STILL ANSWERS' if x.answers else 'not answering'}")
    lines += [
        "    their etcd data will no longer be part of the cluster: never start them from it again; to reuse "
        "those machines, wipe their data directories and `moorage join` them as new replicas;",
        "  - anything written after this replica last heard from a majority of the cluster may be missing: "
        "only the lost replicas had it.",
        "Blob files in the shared storage are not touched.",
    ]
    still = [x.name for x in plan.lost if x.answers]
    if still:
        lines += ["", f"Warning: {', '.join(still)} still {'answers' if len(still) == 1 else 'answer'}; stop "
                  f"{'it' if len(still) == 1 else 'them'} for good: "
                  f"{'it is' if len(still) == 1 else 'they are'} no longer part of the cluster after this."]
    return "\n".join(lines)


def summary(plan: repair.Plan, result: repair.Result, data_dir: Path) -> str:
    n = len(plan.lost)
    lines = [
        "",
        f"Done: replica {plan.replica_id} is now a cluster of one, with its metadata up to revision "
        f"{result.revision}; {n} replica{'s' * (n != 1)} dropped.",
    ]
    if result.last_heard is not None:
        lines.append(f"The newest heartbeat in its data is from {_when(result.last_heard)}: anything the "
                     "cluster accepted after about then may be missing.")
    lines += [
        f"Start it with `moorage serve --data-dir {data_dir}`, then join new replicas with "
        "`moorage join --existing <its URL>`.",
        "Never start the dropped replicas from their old data: wipe their data directories first.",
    ]
    return "\n".join(lines)


def _confirm() -> None:
    try:
        answer = input('\nType "yes" to continue: ')
    except EOFError:
        answer = ""
    if answer.strip().lower() != "yes":
        raise CliError("cancelled; nothing was changed")
