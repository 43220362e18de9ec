"""The cluster commands: join, remove, status, config."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import signal
import sys
import time
from pathlib import Path

from moorage import logs
from moorage.cli.adminclient import AdminClient, add_cluster_options, ask
from moorage.cli.errors import CliError
from moorage.cli.lb import write_atomically
from moorage.cli.serve import add_replica_options, https_options, replica_config, run_replica
from moorage.cli.tables import print_table
from moorage.cluster import https, pki
from moorage.cluster.addresses import advertised, check_ports_free, parse_listen, url_host
from moorage.cluster.blob_storage import S3_CA_FILE
from moorage.cluster.identity import Identity
from moorage.cluster.membership import tolerates
from moorage.cluster.operations import proof_name
from moorage.storage.drivers import describe, is_object_store, storage_at
from moorage.storage.errors import StorageError
from moorage.units import human_bytes

_REPLICA_ID = re.compile(r"^[0-9a-f]{1,64}$")
# --prometheus-targets --watch asks the cluster this often (Prometheus re-reads the file on change).
TARGETS_POLL_SECONDS = 5.0


def advice(replicas: int) -> list[str]:
    """The rules of thumb, as warnings for a cluster of `replicas`."""
    if replicas == 1:
        return ["a single replica tolerates no failure; join two more for high availability"]
    if replicas == 2:
        return ["a cluster of two replicas tolerates no failure (and a second one to agree with costs "
                "speed); join a third"]
    notes = []
    if replicas % 2 == 0:
        notes.append(f"{replicas} replicas tolerate no more failures than {replicas - 1}; "
                     "an odd count is the better size")
    if replicas > 7:
        notes.append(f"past seven replicas writes slow down: each waits for {replicas // 2 + 1} of them")
    return notes


def _tolerance_line(replicas: int) -> str:
    n = tolerates(replicas)
    return f"the cluster has {replicas} replica{'s' * (replicas != 1)} and tolerates {n} " \
           f"failure{'s' * (n != 1)}"


def register(commands) -> None:
    p = commands.add_parser("join", help="add this node to a cluster as a new replica, then serve",
                            description="Join an existing cluster as a new replica and serve in the "
                                        "foreground. Later restarts are plain `moorage serve --data-dir DIR`.")
    add_replica_options(p)
    add_cluster_options(p, joining=True)
    p.add_argument("--replica-id", help="the new replica's id (default: a new one)")
    p.set_defaults(run=run_join)

    p = commands.add_parser("remove", help="remove a replica, healthy or dead",
                            description="Remove a replica from the cluster. It may be dead; a live one "
                                        "shuts itself down.")
    add_cluster_options(p)
    p.add_argument("--existing-replica-id", help="id of the replica at --existing (checked if given)")
    p.add_argument("--replica-id", help="id of the replica to remove (asked if not given)")
    p.add_argument("--force", action="store_true", help="remove even if the rest would lose quorum")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run_remove)

    p = commands.add_parser("status", help="every replica and how many failures the cluster tolerates")
    add_cluster_options(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--prometheus-targets", type=Path, default=None, metavar="FILE",
                   help="write every replica's address to FILE as a Prometheus file-based service discovery "
                        "list (file_sd_configs), only when it changed; docs/monitoring.md")
    p.add_argument("--cluster-label", default=None, metavar="NAME",
                   help="with --prometheus-targets: give the targets the label cluster=NAME")
    p.add_argument("--watch", action="store_true",
                   help="with --prometheus-targets: keep the file current as replicas join and leave, "
                        "until stopped (SIGTERM, Ctrl-C)")
    p.set_defaults(run=run_status)

    p = commands.add_parser("config", help="cluster-wide settings (get, set, unset, list)")
    p.add_argument("action", choices=["get", "set", "unset", "list"])
    p.add_argument("key", nargs="?")
    p.add_argument("value", nargs="?")
    p.add_argument("--from-file", type=Path, default=None, metavar="FILE",
                   help="set the value from FILE ('-': standard input), e.g. a token that must not "
                        "show in the shell's history or the process list")
    add_cluster_options(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run_config)


# -- join ----------------------------------------------------------------------

def run_join(args: argparse.Namespace) -> int:
    logs.setup(args.log_level)
    data_dir = args.data_dir.resolve()
    found = Identity.load(data_dir)
    if found is not None:
        raise CliError(f"{data_dir} already holds replica {found.replica_id}; "
                       f"start it with `moorage serve --data-dir {args.data_dir}`")
    replica_id = args.replica_id or Identity.new_id()
    if not _REPLICA_ID.match(replica_id):
        raise CliError("--replica-id takes lowercase hex digits")
    host, port = parse_listen(args.listen)
    https.check_options(https_options(args), host)
    advertise = advertised(host, args.advertise).host
    client_port, peer_port = args.etcd_client_port or 2379, args.etcd_peer_port or 2380
    check_ports_free([(host, port, "the listen address"), (advertise, client_port, "the etcd client port"),
                      (advertise, peer_port, "the etcd peer port")])
    if args.insecure_tls:
        # The answer carries the cluster CA's key: it must come from the cluster, not whoever answers.
        raise CliError("join receives the cluster's CA key, so it refuses --insecure-tls: trust the "
                       "existing replica with --ca-cert FILE or --ca-fingerprint sha256:HEX")
    admin = AdminClient(args)
    plan = admin.call("POST", "/_admin/cluster/join",
                      {"replica_id": replica_id, "peer_url": f"https://{url_host(advertise)}:{peer_port}"})
    served = False
    ours = [d for d in ("tls", "pki") if not (data_dir / d).exists()]  # what a failed join removes

    async def promote(member_id: int) -> bool:
        result = await asyncio.to_thread(admin.call, "POST", "/_admin/cluster/promote",
                                         {"member_id": member_id})
        return bool(result and result.get("promoted"))

    async def on_serving(identity: Identity) -> None:
        nonlocal served
        served = True
        status = await asyncio.to_thread(admin.call, "GET", "/_admin/cluster/status")
        voters = status["voters"]
        print(f"moorage: joined as replica {identity.replica_id}; {_tolerance_line(voters)}",
              file=sys.stderr, flush=True)
        for note in advice(voters):
            print(f"moorage: warning: {note}", file=sys.stderr, flush=True)

    try:
        location, options = _storage(plan, args, data_dir)
        _check_storage(plan, location, options, replica_id)
        _install_ca(plan, data_dir)
        Identity(replica_id=replica_id, cluster_token=plan["cluster_token"], created=time.time(),
                 storage_dir=location, etcd_client_port=client_port, etcd_peer_port=peer_port,
                 advertise=advertise, initial_cluster=plan["initial_cluster"],
                 member_id=plan["member_id"], s3=options).save(data_dir)
        return run_replica(replica_config(args), promote=promote, on_serving=on_serving)
    except BaseException:
        if not served:  # leave neither a half member in the cluster nor a half replica here
            try:
                admin.call("POST", "/_admin/cluster/abandon", {"member_id": plan["member_id"]})
            except CliError:
                pass
            (data_dir / "replica.json").unlink(missing_ok=True)
            (data_dir / S3_CA_FILE).unlink(missing_ok=True)
            for made in ("etcd", *ours):
                shutil.rmtree(data_dir / made, ignore_errors=True)
        raise
    finally:
        admin.close()


def _install_ca(plan: dict, data_dir: Path) -> None:
    """The cluster CA, handed over after admin authentication: the replica issues its
    etcd and API certificates from it, so the other members accept it as one of them."""
    cert, key = plan.get("ca_cert"), plan.get("ca_key")
    if not isinstance(cert, str) or not isinstance(key, str):
        raise CliError("the existing replica did not hand over the cluster CA; upgrade it to this "
                       "version of moorage first")
    pki.install_ca(pki.Paths(data_dir), cert.encode(), key.encode())


def _storage(plan: dict, args: argparse.Namespace, data_dir: Path) -> tuple[str, dict | None]:
    """Where the new replica keeps its blobs: the cluster's object store as the answer names it
    (its CA kept in DATA_DIR), else the shared directory this node mounts."""
    spec = plan.get("storage")
    if not spec:
        if args.storage is not None and args.storage.startswith("s3://"):
            raise CliError("the cluster keeps its blobs in a shared directory, not an object store: "
                           "drop --storage and give the directory with --storage-dir")
        return str(Path(args.storage or args.storage_dir or data_dir / "blobs").resolve()), None
    location, options = spec["location"], dict(spec.get("options") or {})
    if args.storage_dir is not None or (args.storage is not None and args.storage != location):
        raise CliError(f"the cluster keeps its blobs in {describe(location, options)}; a joining replica "
                       "learns it from the cluster: drop --storage/--storage-dir")
    if spec.get("ca_pem"):
        data_dir.mkdir(parents=True, exist_ok=True)
        (data_dir / S3_CA_FILE).write_text(spec["ca_pem"])
        options["ca_cert"] = str(data_dir / S3_CA_FILE)
    return location, options


def _check_storage(plan: dict, location: str, options: dict | None, replica_id: str) -> None:
    """The new replica must see the very storage the cluster writes to: an object store is
    probed (write, read back, delete) with this node's credentials first."""
    proof = plan["storage_proof"]
    try:
        seen = asyncio.run(_read_proof(location, options, proof_name(replica_id)))
    except StorageError as e:
        raise CliError(f"this node cannot use the cluster's blob storage {describe(location, options)}: "
                       f"{e}") from None
    if seen is None or seen.decode(errors="replace").strip() != proof["nonce"]:
        if is_object_store(location):
            raise CliError(f"this node does not see the cluster's objects in {describe(location, options)} "
                           f"(the object {proof['file']} the cluster just wrote is missing or different); "
                           "check that the endpoint's address reaches the same store from this node")
        raise CliError(f"this node does not see the cluster's blob storage at {location} (the file "
                       f"{proof['file']} the cluster just wrote there is missing or different); mount the "
                       "shared storage and pass its path with --storage-dir")


async def _read_proof(location: str, options: dict | None, name: str) -> bytes | None:
    storage = storage_at(location, options)
    try:
        await storage.open()
        await storage.probe()
        return await storage.read_proof(name)
    finally:
        await storage.close()


# -- remove ----------------------------------------------------------------------

def run_remove(args: argparse.Namespace) -> int:
    replica_id = ask(args.replica_id, "Replica id to remove: ",
                     "which replica? pass --replica-id ID (`moorage status` lists them)")
    if not _REPLICA_ID.match(replica_id):
        raise CliError("the replica id takes lowercase hex digits")
    admin = AdminClient(args)
    try:
        if args.existing_replica_id:
            health = admin.call("GET", "/health")
            if health.get("replica_id") != args.existing_replica_id:
                raise CliError(f"{admin.url} is replica {health.get('replica_id')}, not "
                               f"{args.existing_replica_id}")
        force = "?force=true" if args.force else ""
        result = admin.call("DELETE", f"/_admin/cluster/replicas/{replica_id}{force}")
    finally:
        admin.close()
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"removed replica {replica_id}; {_tolerance_line(result['replicas'])}")
    for note in advice(result["replicas"]):
        print(f"warning: {note}")
    print("if a load balancer sends clients to it, take it out of the pool "
          "(`moorage lb haproxy --watch` does so by itself)")
    return 0


# -- status ----------------------------------------------------------------------

def _ago(row: dict) -> str:
    # Measured by the replica that answered, corrected for the heartbeat writer's clock
    # (cluster/clock.py); an older replica sends only the writer's timestamp.
    seconds = row.get("seen_seconds_ago")
    if seconds is None:
        if row.get("last_seen") is None:
            return "-"
        seconds = max(time.time() - row["last_seen"], 0)
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def prometheus_targets(status: dict, cluster_label: str | None) -> str:
    """A file_sd list of every replica's API address (each scraped on its own; never the balancer)."""
    targets = sorted({url.split("://", 1)[-1].rstrip("/") for r in status["replicas"] if (url := r.get("url"))})
    group: dict = {"targets": targets}
    if cluster_label:
        group["labels"] = {"cluster": cluster_label}
    return json.dumps([group], indent=2) + "\n"


def write_targets(args: argparse.Namespace, status: dict) -> bool:
    """Write the targets file if it changed; whether it did."""
    text = prometheus_targets(status, args.cluster_label)
    path: Path = args.prometheus_targets
    try:
        if path.read_text() == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    write_atomically(path, text)
    return True


def run_targets(args: argparse.Namespace, admin: AdminClient) -> int:
    status = admin.call("GET", "/_admin/cluster/status")  # the first must work: a mistake, not an outage
    written = write_targets(args, status)
    count = len(json.loads(prometheus_targets(status, None))[0]["targets"])
    print(f"{args.prometheus_targets}: {count} replica{'s' * (count != 1)}"
          f"{'' if written else ' (unchanged)'}", file=sys.stderr, flush=True)
    if not args.watch:
        return 0
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))
    while not stop:
        deadline = time.monotonic() + TARGETS_POLL_SECONDS
        while not stop and time.monotonic() < deadline:
            time.sleep(0.2)
        if stop:
            break
        try:
            status = admin.call("GET", "/_admin/cluster/status")
        except CliError as e:  # a replica down: the file stays as it was, and we ask again
            print(f"moorage: cluster status unavailable ({e}); the targets file is unchanged", file=sys.stderr)
            continue
        if write_targets(args, status):
            print(f"{args.prometheus_targets}: rewritten", file=sys.stderr, flush=True)
    return 0


def run_status(args: argparse.Namespace) -> int:
    if args.prometheus_targets is None and (args.watch or args.cluster_label):
        raise CliError("--watch and --cluster-label go with --prometheus-targets FILE")
    admin = AdminClient(args)
    try:
        if args.prometheus_targets is not None:
            return run_targets(args, admin)
        status = admin.call("GET", "/_admin/cluster/status")
    finally:
        admin.close()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    header = ["REPLICA", "URL", "API", "ETCD", "LAG", "VERSION", "LAST SEEN"]
    rows = [[r["id"], r["url"] or "-", "healthy" if r["healthy"] else (r["api"] or "down"),
             r["role"] + ("" if r["etcd_reachable"] else " (unreachable)"),
             "-" if r["lag"] is None else str(r["lag"]), r["version"] or "-", _ago(r)]
            for r in status["replicas"]]
    print_table(header, rows)
    n, healthy = status["voters"], status["healthy"]
    print(f"\n{n} replica{'s' * (n != 1)}, {healthy} healthy: tolerates {status['tolerates']} more "
          f"failure{'s' * (status['tolerates'] != 1)} ({status['tolerates_when_healthy']} when all are healthy)")
    if not status["quorum"]:
        print("no quorum: writes are refused until a majority of replicas is back")
    if status.get("ca_fingerprint"):
        print(f"cluster CA {status['ca_fingerprint']} (clients: --ca-fingerprint, or GET /ca)")
    if status.get("proxy_protocol_from"):
        print(f"PROXY protocol v2 required from {status['proxy_protocol_from']} (the load balancers)")
    if status.get("storage"):
        used = status["storage"]
        where = f"{used['where']}, " if used.get("where") else ""
        print(f"storage: {where}{used['blobs']} blob{'s' * (used['blobs'] != 1)}, {human_bytes(used['bytes'])} "
              "(deleted images are freed by `moorage gc`)")
        if used.get("object_store"):
            print(_object_store_line(used["object_store"], status.get("time") or time.time()))
    return 0


def _object_store_line(state: dict, now: float) -> str:
    """Whether the store answers, as the answering replica's probe last saw it."""
    if state["reachable"]:
        return f"object store: answering (asked {max(now - state['checked'], 0):.0f}s ago)"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(state["since"]))
    return f"object store: unreachable since {since} ({max(now - state['since'], 0):.0f}s): {state['error']}"


# -- config ----------------------------------------------------------------------

def read_value(path: Path) -> str:
    """A value (a secret, often) from a file or '-' for standard input, without its line end."""
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise CliError(f"{path} is not text") from None
    return text.strip()


def run_config(args: argparse.Namespace) -> int:
    if args.action in ("get", "set", "unset") and not args.key:
        raise CliError(f"config {args.action} needs a KEY")
    if args.from_file is not None:
        if args.action != "set" or args.value is not None:
            raise CliError("--from-file gives the value of `config set KEY`; give it no VALUE")
        args.value = read_value(args.from_file)
    if args.action == "set" and args.value is None:
        raise CliError("config set needs a KEY and a VALUE (or --from-file FILE)")
    admin = AdminClient(args)
    try:
        if args.action == "set":
            result = admin.call("PUT", f"/_admin/config/{args.key}", {"value": args.value})
        elif args.action == "unset":
            result = admin.call("DELETE", f"/_admin/config/{args.key}")
        else:
            result = admin.call("GET", "/_admin/config")
    finally:
        admin.close()
    if args.action == "list":
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print_table(["KEY", "VALUE", "MEANING"],
                        [[k, json.dumps(v["value"]), v["help"]] for k, v in sorted(result["settings"].items())])
        return 0
    if args.action == "get":
        found = result["settings"].get(args.key)
        if found is None:
            raise CliError(f"unknown setting {args.key!r}; `moorage config list` shows them all")
        print(json.dumps({"key": args.key, "value": found["value"]}) if args.json
              else json.dumps(found["value"]))
        return 0
    print(json.dumps(result) if args.json else f"{result['key']} = {json.dumps(result['value'])} "
          f"(revision {result['revision']}; every replica applies it within a second)")
    return 0
