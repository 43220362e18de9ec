"""The etcd membership behind the replicas: adding, promoting, removing, judging.

N voting members tolerate floor((N-1)/2) failures. New members join as
learners (non-voting) and are promoted once caught up, so a slow join never
costs quorum. A replica's start brings its own member's entry up to date
here too: a moved address, or a learner's wait to be promoted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aetcd import rpc

from moorage.backoff import Backoff
from moorage.cluster.replica_config import StartError
from moorage.meta.etcd import EtcdClient, EtcdUnavailable
from moorage.meta.index import Index

log = logging.getLogger(__name__)

POLL_SECONDS = 2.0
PROMOTE_SECONDS = 120.0
# A member that just started may be refused a membership change for a few seconds.
MOVE_SECONDS = 30.0


def quorum(voters: int) -> int:
    return voters // 2 + 1


def tolerates(voters: int, healthy: int | None = None) -> int:
    """Failures the cluster can still take: with all voters healthy, or with `healthy` of them."""
    up = voters if healthy is None else healthy
    return max(up - quorum(voters), 0)


@dataclass
class MemberState:
    id: int
    name: str
    peer_url: str
    client_url: str
    learner: bool
    reachable: bool = False
    leader: bool = False
    raft_index: int = 0
    version: str = ""


async def add_learner(client: EtcdClient, peer_url: str) -> tuple[int, list]:
    resp = await client.call_cluster("MemberAdd", rpc.MemberAddRequest(peerURLs=[peer_url], isLearner=True))
    return resp.member.ID, list(resp.members)


async def promote(client: EtcdClient, member_id: int) -> bool:
    """Promote a learner; False while it has not caught up with the leader."""
    try:
        await client.call_cluster("MemberPromote", rpc.MemberPromoteRequest(ID=member_id))
        return True
    except EtcdUnavailable as e:
        if "in sync" in str(e) or "not ready" in str(e):
            return False
        raise


async def move_peer_url(client: EtcdClient, name: str, peer_url: str) -> str | None:
    """Make member `name`'s peer URL `peer_url`; returns the URL it had, None if it had it already.

    etcd ignores --initial-advertise-peer-urls once its data exists, so a
    replica that starts with a new advertised address (or one that an old
    version wrongly advertised on loopback) changes its membership entry
    itself, through its own member; a cluster of one has quorum alone.
    Client URLs need no such call: etcd publishes them at every start.
    """
    members = await client.members()
    ours = next((m for m in members if m.name == name), None)
    if ours is None or list(ours.peerURLs) == [peer_url]:
        return None
    await client.call_cluster("MemberUpdate", rpc.MemberUpdateRequest(ID=ours.ID, peerURLs=[peer_url]))
    return ", ".join(ours.peerURLs) or "(none)"


async def remove(client: EtcdClient, member_id: int) -> None:
    await client.call_cluster("MemberRemove", rpc.MemberRemoveRequest(ID=member_id))


async def states(client: EtcdClient) -> list[MemberState]:
    """Every member with what its own endpoint says (role, raft index), probed in parallel."""
    members = await client.members()
    found = [MemberState(m.ID, m.name, (list(m.peerURLs) or [""])[0], (list(m.clientURLs) or [""])[0],
                         m.isLearner) for m in members]

    async def probe(state: MemberState) -> None:
        if not state.client_url:
            return
        other = client.sibling(state.client_url, timeout=1.0)  # with our node certificate
        try:
            status = await other.status()
            state.reachable = True
            state.leader = status.leader == state.id
            state.raft_index = status.raftIndex
            state.version = status.version
        except EtcdUnavailable:
            pass
        finally:
            await other.close()

    await asyncio.gather(*(probe(s) for s in found))
    return found


async def track_solo(client: EtcdClient, index: Index, member_name: str) -> None:
    """Keep `index.solo` true only while this replica's member is the only one.

    Any doubt (etcd unreachable, an unknown member list) clears it: a reader
    then pays a revision check instead of risking a stale answer.
    """
    while True:
        try:
            members = await client.members()
            solo = len(members) == 1 and members[0].name == member_name
        except EtcdUnavailable:
            solo = False
        if solo != index.solo:
            log.debug("membership changed", extra={"solo": solo})
        index.solo = solo
        await asyncio.sleep(POLL_SECONDS)


async def move_member(client: EtcdClient, name: str, peer_url: str) -> str | None:
    """Bring this replica's etcd member entry to this start's advertised address (a new
    --advertise, or a cluster an old version created advertising loopback); the old one
    when it moved."""
    deadline = time.monotonic() + MOVE_SECONDS
    while True:
        try:
            return await move_peer_url(client, name, peer_url)
        except EtcdUnavailable as e:
            if time.monotonic() > deadline:
                raise StartError(f"this replica's etcd member could not change its peer URL to "
                                 f"{peer_url} ({e}); start it again with the --advertise it had, "
                                 "or see DATA_DIR/etcd.log") from None
            await asyncio.sleep(0.5)


async def await_promotion(client: EtcdClient, promote: Callable[[int], Awaitable[bool]], member_id: int) -> None:
    """As a new learner: ask the cluster to promote us until it has caught us up,
    then wait until our own member knows it votes (it learns a moment later,
    and until then refuses the reads the index needs)."""
    deadline = time.monotonic() + PROMOTE_SECONDS
    backoff = Backoff(0.2, 2.0)
    while not await promote(member_id):
        if time.monotonic() > deadline:
            raise StartError(f"this replica's etcd member did not catch up within {PROMOTE_SECONDS:.0f}s; "
                             "see DATA_DIR/etcd.log")
        await backoff.sleep()
    while True:
        try:
            if not (await client.status()).isLearner:
                return
        except EtcdUnavailable:
            pass
        if time.monotonic() > deadline:
            raise StartError("this replica's etcd member was promoted but still acts as a learner; "
                             "see DATA_DIR/etcd.log")
        await asyncio.sleep(0.1)
