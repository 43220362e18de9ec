"""Emergency repair: turn a stopped replica back into a cluster of one after a majority is lost.

When most replicas are gone for good, the survivors' etcd members can never
reach quorum again, so no write (not even `moorage remove`) can succeed. etcd's
documented way out is `etcd --force-new-cluster` on a surviving member's data
directory: etcd replays its own snapshot and WAL, then rewrites the membership
to that one member, keeping every key, the revision numbers and the cluster id.

Why --force-new-cluster and not `etcdctl snapshot save` + `snapshot restore`:

- it replays the WAL, so every entry this member had committed survives; a
  restore from a copy of `member/snap/db` keeps only what the backend had
  flushed, and needs `--skip-hash-check` for a db not taken by `snapshot save`
  (which itself needs the quorum we no longer have);
- the data directory stays where the replica expects it; a restore writes a
  new one that must be swapped in, with the old one to clean up;
- revisions stay as they were (the replica's index and watches start from
  them) and it needs only the etcd binary, not etcdctl.

Measured on etcd 3.4.23 (tests/test_repair.py): after a `kill -9` of two of
three members, one start with the flag leaves one voting member holding every
key, and a later plain start keeps that membership; two new replicas then join
with `moorage join` as usual.

The flag must be used for one start only (etcd's docs: a member left running
with it would rewrite the membership on every restart), so repair starts etcd
with it, makes the metadata agree (the lost replicas' records go), and stops
it; the replica itself then starts with plain `moorage serve`.

The repair is two starts of the member: first a plain one that only reads
(the membership from the peer port, whether a quorum still answers) so the
admin sees what will be discarded before anything is; then the forced one.

Both starts are the member exactly as `moorage serve` runs it, mutual TLS
included: the peer ports (ours and the other members') are read over TLS
with the replica's node certificate, as etcd accepts no one without one.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from moorage.cluster import pki, replicas
from moorage.cluster.etcd_member import EtcdError, EtcdMember, node_tls
from moorage.cluster.identity import Identity
from moorage.meta import keys
from moorage.meta.etcd import EtcdClient, EtcdUnavailable, endpoint_of, op_delete

# A member that (re)joins a cluster with quorum serves clients once it has
# published itself through Raft, within a second or two; without quorum it
# never does. So not serving after this long is the first sign of a lost quorum.
QUORUM_PROBE_SECONDS = 6.0
# After the forced start, the lone member elects itself within an election timeout.
LEADER_SECONDS = 20.0
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=2.0)


class RepairRefused(Exception):
    """The repair cannot or must not run; the message says why in one sentence."""


@dataclass(frozen=True)
class Lost:
    """Another etcd member (named by its replica id) that the repair drops from the cluster."""

    name: str            # replica id, or the member id in hex for a learner that never started
    member_id: int
    peer_url: str
    learner: bool
    answers: bool        # its peer port answered just now: it is not gone yet


@dataclass(frozen=True)
class Plan:
    replica_id: str
    member_id: int
    lost: list[Lost]


@dataclass(frozen=True)
class Result:
    revision: int                   # the revision the cluster of one starts from
    dropped_records: list[str]      # replica records deleted (ids), the lost ones and any half-joined
    last_heard: float | None        # newest heartbeat in the data: about when a majority was last heard


def etcd_data_dir(data_dir: Path) -> Path:
    return data_dir / "etcd"


def etcd_data_in_use(data_dir: Path) -> bool:
    """Whether a running etcd holds this data directory.

    etcd's backend (bbolt) holds an exclusive flock on member/snap/db for as
    long as the process lives, so a failed non-blocking flock means "running".
    The lock is let go at once: etcd must be able to take it when we start it.
    """
    db = etcd_data_dir(data_dir) / "member" / "snap" / "db"
    try:
        fd = open(db, "rb")
    except FileNotFoundError:
        return False
    with fd:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                return True
            raise
        fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def member(data_dir: Path, identity: Identity, extra_flags: list[str] | None = None) -> EtcdMember:
    """The replica's etcd member exactly as `moorage serve` starts it (same name, data, URLs)."""
    return EtcdMember(
        name=identity.replica_id, data_dir=etcd_data_dir(data_dir), tls=node_tls(data_dir),
        host=identity.advertise,
        client_port=identity.etcd_client_port, peer_port=identity.etcd_peer_port,
        cluster_token=identity.cluster_token, log_path=data_dir / "etcd.log",
        initial_cluster=identity.initial_cluster, member_id=identity.member_id,
        extra_flags=extra_flags or [])


async def read_plan(data_dir: Path, identity: Identity) -> Plan:
    """Start the member plainly, read the membership it knows, and stop it again.

    Without quorum an etcd 3.4 member never serves its client port (it waits
    to publish itself through Raft), but its peer port answers `/members`
    from the local data at once: that is where the plan comes from. Keys
    (replica records) are out of reach until the forced start.

    Refuses when a quorum still answers: then the cluster is not lost, and
    forcing a new one would split it in two (`moorage remove` is the tool).
    """
    etcd = member(data_dir, identity)
    quorum = True
    try:
        try:
            await etcd.start(timeout=QUORUM_PROBE_SECONDS)
        except EtcdError:
            if etcd.proc is None or etcd.proc.returncode is not None:
                raise  # it did not even run: the message says why
            quorum = False
        async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT,
                                         connector=aiohttp.TCPConnector(ssl=peer_tls(data_dir))) as http:
            members = await _peer_members(http, etcd.peer_url)
            ours = next((m for m in members if m["name"] == identity.replica_id), None)
            if ours is None:
                raise RepairRefused(f"this replica's etcd data does not list replica {identity.replica_id} "
                                    "as a member, so it cannot carry the cluster")
            if ours.get("isLearner"):
                raise RepairRefused(f"replica {identity.replica_id} is an etcd learner that never caught "
                                    "up with the cluster, so its data cannot carry one; repair a replica "
                                    "that had been serving")
            others = [m for m in members if m["id"] != ours["id"]]
            answers = await asyncio.gather(*(_answers(http, m) for m in others))
            if others and (quorum or await _quorum_elsewhere(etcd, others)):
                raise RepairRefused("the cluster still has quorum (a majority of its replicas answers), so "
                                    "it is not lost; take dead replicas out with `moorage remove` instead")
    finally:
        await etcd.stop()
    lost = [Lost(m["name"] or f"{m['id']:x}", m["id"], (m.get("peerURLs") or [""])[0],
                 bool(m.get("isLearner")), up) for m, up in zip(others, answers)]
    return Plan(identity.replica_id, ours["id"], lost)


def peer_tls(data_dir: Path) -> ssl.SSLContext:
    """TLS towards etcd peer ports: trust the cluster CA, present the node certificate."""
    paths = pki.Paths(data_dir)
    try:
        return pki.client_context(paths.ca_cert, paths.node_cert, paths.node_key)
    except (OSError, ssl.SSLError) as e:
        raise RepairRefused(f"this replica's TLS files in {data_dir} cannot be used ({e}), so its etcd "
                            "member cannot be reached") from None


async def _peer_members(http: aiohttp.ClientSession, peer_url: str) -> list[dict]:
    try:
        async with http.get(peer_url + "/members") as r:
            r.raise_for_status()
            return await r.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        raise RepairRefused(f"this replica's etcd member did not list its cluster ({type(e).__name__}); "
                            "see DATA_DIR/etcd.log") from None


async def _answers(http: aiohttp.ClientSession, m: dict) -> bool:
    """Whether another member's peer port answers (a minority survivor does, a lost one does not)."""
    for url in m.get("peerURLs") or []:
        try:
            async with http.get(url + "/version") as r:
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            pass
    return False


async def _quorum_elsewhere(etcd: EtcdMember, others: list[dict]) -> bool:
    """Whether another member sees a leader: a second guard, for a member too far behind to serve in time."""
    async def sees_leader(m: dict) -> bool:
        for url in m.get("clientURLs") or []:
            other = EtcdClient(endpoint_of(url), etcd.tls, timeout=1.0)
            try:
                if (await other.status()).leader:
                    return True
            except EtcdUnavailable:
                pass
            finally:
                await other.close()
        return False

    return any(await asyncio.gather(*(sees_leader(m) for m in others)))


async def force_new_cluster(data_dir: Path, identity: Identity, plan: Plan) -> Result:
    """Start the member once with --force-new-cluster, drop the other replicas' records, stop it.

    Every record but this replica's goes: the lost replicas' and any left by
    a join that never finished, so `status` shows the cluster of one as it is.
    """
    etcd = member(data_dir, identity, ["--force-new-cluster"])
    await etcd.start()
    client = EtcdClient(etcd.endpoint, etcd.tls)
    try:
        deadline = time.monotonic() + LEADER_SECONDS
        while True:  # the first linearizable call succeeds once the lone member has elected itself
            try:
                records = await replicas.all_records(client)
                others = sorted(set(records) - {identity.replica_id})
                revision = (await client.txn([], [op_delete(keys.replica(r)) for r in others])).revision
                break
            except EtcdUnavailable as e:
                if time.monotonic() > deadline:
                    raise RepairRefused(f"etcd started with --force-new-cluster but accepted no write "
                                        f"within {LEADER_SECONDS:.0f}s ({e}); see {etcd.log_path}") from None
                await asyncio.sleep(0.2)
        members = await client.members()
        if [(m.ID, m.isLearner) for m in members] != [(plan.member_id, False)]:
            raise RepairRefused(f"etcd still lists {len(members)} members after --force-new-cluster; "
                                f"see {etcd.log_path}")
    finally:
        await client.close()
        await etcd.stop()
    if identity.initial_cluster is not None or identity.member_id is not None:
        identity.initial_cluster = identity.member_id = None  # from now on, plain restarts
        identity.save(data_dir)
    last_heard = max((r.seen for r in records.values()), default=None)
    return Result(revision, others, last_heard)
