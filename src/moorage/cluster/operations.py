"""Cluster operations a replica performs for an admin: join, promote, remove, status, settings.

The HTTP side (authentication, JSON) is the api layer's; this module decides
what is allowed and does it through etcd.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
import time
from collections.abc import Callable
from functools import cached_property
from typing import Any

import aiohttp
import msgspec

from moorage import __version__
from moorage.backoff import Backoff
from moorage.cluster import membership, pki, replicas, settings
from moorage.cluster.backup import snapshot as backups
from moorage.cluster.clock import ClusterClock
from moorage.cluster.settings import ClusterSettings, SettingError
from moorage.meta.etcd import EtcdClient, EtcdUnavailable
from moorage.meta.index import Index
from moorage.storage.base import BlobDriver
from moorage.storage.drivers import describe

PING_TIMEOUT = 1.5
RECONFIGURE_SECONDS = 30.0


class ClusterError(Exception):
    """A refused or failed cluster operation; `kind` is refused, unknown, unavailable or invalid."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


def proof_name(replica_id: str) -> str:
    return f"join-{replica_id}"


class ClusterOperations:
    def __init__(self, client: EtcdClient, index: Index, cluster_settings: ClusterSettings,
                 storage: BlobDriver, replica_id: str, cluster_token: str,
                 pki_paths: pki.Paths | None = None, clock: ClusterClock | None = None,
                 storage_spec: dict | None = None, store_state: Callable[[], Any] = lambda: None):
        self.client = client
        self.index = index
        self.settings = cluster_settings
        self.storage = storage
        self.replica_id = replica_id
        self.cluster_token = cluster_token
        self.pki_paths = pki_paths
        self.clock = clock or ClusterClock(replica_id)
        self.storage_spec = storage_spec
        # Whether the object store answers, as this replica's probe last saw it (a StoreState, or None).
        self.store_state = store_state

    async def _etcd(self, operation):
        try:
            return await operation
        except EtcdUnavailable as e:
            raise ClusterError("unavailable", f"the cluster's metadata store cannot be reached: {e}") from None

    # -- join ----------------------------------------------------------------

    async def join(self, replica_id: str, peer_url: str) -> dict[str, Any]:
        """Add a learner member for a new replica and tell it how to start.

        The answer carries the cluster CA, key included: the new replica
        issues its own etcd and API certificates from it, which is what lets
        its member into a cluster that accepts only certificates from that CA.
        Only the admin API (admin credentials, over TLS) calls this.
        """
        if not peer_url.startswith("https://"):
            raise ClusterError("invalid", f"the peer URL must be https:// (etcd peers use mutual TLS), "
                                          f"not {peer_url!r}")
        if self.pki_paths is None or not self.pki_paths.has_ca():
            raise ClusterError("unavailable", "this replica does not hold the cluster CA, so it cannot "
                                              "admit a new replica; join through another one")
        ca_cert, ca_key = await asyncio.to_thread(pki.ca_pem, self.pki_paths)
        members = await self._etcd(self.client.members())
        if any(m.name == replica_id for m in members):
            raise ClusterError("refused", f"replica {replica_id} is already a member")
        if any(peer_url in m.peerURLs for m in members):
            raise ClusterError("refused", f"peer address {peer_url} is already used by a member")
        # From now on other processes will write metadata: reads must check.
        self.index.leave_solo()
        nonce = secrets.token_hex(16)
        await self.storage.write_proof(proof_name(replica_id), nonce.encode())
        member_id, members = await self._add_learner(peer_url)
        initial = ",".join(f"{m.name or replica_id}={m.peerURLs[0]}" for m in members if m.peerURLs)
        return {"member_id": member_id, "initial_cluster": initial, "cluster_token": self.cluster_token,
                "storage_proof": {"file": f"cluster/{proof_name(replica_id)}", "nonce": nonce},
                # An object store: the joining replica keeps its blobs there too, and proves it can.
                "storage": self.storage_spec,
                "ca_cert": ca_cert.decode("ascii"), "ca_key": ca_key.decode("ascii")}

    async def _add_learner(self, peer_url: str) -> tuple[int, list]:
        return await _reconfigure(lambda: membership.add_learner(self.client, peer_url), "add a member")

    async def promote(self, member_id: int) -> bool:
        return await self._etcd(membership.promote(self.client, member_id))

    async def abandon_join(self, member_id: int) -> None:
        """Undo a join that could not complete (the new replica refused to serve)."""
        members = await self._etcd(self.client.members())
        if any(m.ID == member_id and m.isLearner for m in members):
            await self._etcd(membership.remove(self.client, member_id))

    # -- remove --------------------------------------------------------------

    async def remove(self, replica_id: str, force: bool) -> dict[str, Any]:
        states = await self._etcd(membership.states(self.client))
        # A member is named by its replica id, or (a learner whose join died
        # before it started) by its etcd member id, as `status --json` shows.
        target = next((s for s in states if s.name == replica_id or f"{s.id:x}" == replica_id), None)
        records = await self._etcd(replicas.all_records(self.client))
        if target is None and replica_id not in records:
            raise ClusterError("unknown", f"no replica {replica_id} in this cluster")
        voters = [s for s in states if not s.learner]
        if target is not None and len(states) == 1:
            raise ClusterError("refused", "this is the last replica; removing it would end the cluster")
        if target is not None and not target.learner:
            remaining = [s for s in voters if s.id != target.id]
            healthy = sum(1 for s in remaining if s.reachable)
            if healthy < membership.quorum(len(remaining)) and not force:
                raise ClusterError(
                    "refused", f"after removing {replica_id}, {healthy} of {len(remaining)} remaining "
                    f"replicas are healthy and {membership.quorum(len(remaining))} are needed for quorum; "
                    "bring replicas back first, or use --force")
        if target is not None:
            await _reconfigure(lambda: membership.remove(self.client, target.id), "remove a member")
        await self._etcd(replicas.forget(self.client, replica_id))
        left = len(voters) - (1 if target is not None and not target.learner else 0)
        return {"removed": replica_id, "replicas": left, "tolerates": membership.tolerates(left)}

    # -- status --------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        await self.index.sync()  # the storage figures below come from the index
        states = await self._etcd(membership.states(self.client))
        records = await self._etcd(replicas.all_records(self.client))
        pings = await _ping_all([r.url for r in records.values()], self._ping_tls)
        leader_index = max((s.raft_index for s in states if s.leader), default=0)
        rows = []
        names = {s.name for s in states}
        now = time.time()

        def seen_ago(record: replicas.ReplicaRecord) -> float:
            # On this replica's clock scale: the heartbeat was stamped with the writer's.
            return max(now - (record.seen - (self.clock.offset(record.id) or 0.0)), 0.0)

        for s in states:
            record = records.get(s.name)
            api = pings.get(record.url) if record else None
            rows.append({
                "id": s.name or "(joining)", "url": record.url if record else None,
                "healthy": bool(api and api[0] and s.reachable), "api": api[1] if api else "unknown",
                "role": "learner" if s.learner else "leader" if s.leader else "follower",
                "etcd_reachable": s.reachable, "lag": max(leader_index - s.raft_index, 0) if s.reachable else None,
                "version": record.version if record else None,
                "last_seen": record.seen if record else None,
                "seen_seconds_ago": seen_ago(record) if record else None,
                # Its clock minus the answering replica's, from its heartbeats (None: not known yet).
                "clock_offset_seconds": self.clock.offset(s.name),
                "member_id": f"{s.id:x}",
            })
        for rid, record in records.items():  # a record without a member: being removed or joining
            if rid not in names:
                api = pings.get(record.url)
                rows.append({"id": rid, "url": record.url, "healthy": False,
                             "api": api[1] if api else "unknown", "role": "none", "etcd_reachable": False,
                             "lag": None, "version": record.version, "last_seen": record.seen,
                             "seen_seconds_ago": seen_ago(record),
                             "clock_offset_seconds": self.clock.offset(rid), "member_id": None})
        voters = [s for s in states if not s.learner]
        healthy_voters = sum(1 for r, s in zip(rows, states) if not s.learner and r["healthy"])
        return {"replicas": rows, "voters": len(voters),
                "healthy": sum(1 for r in rows if r["healthy"]),
                "tolerates": membership.tolerates(len(voters), healthy_voters),
                "tolerates_when_healthy": membership.tolerates(len(voters)),
                "quorum": healthy_voters >= membership.quorum(len(voters)),
                "ca_fingerprint": self._ca_fingerprint,
                # `moorage lb haproxy` sends the PROXY protocol when this is set.
                "proxy_protocol_from": self.settings["proxy_protocol.from"],
                # What blob storage holds by the records (what GC frees shows here).
                "storage": {"blobs": len(self.index.blobs),
                            "bytes": sum(b.size for b in self.index.blobs.values()),
                            # The object store every replica uses (a directory is each replica's own path).
                            "where": describe(self.storage_spec["location"], self.storage_spec["options"])
                            if self.storage_spec else None,
                            "object_store": msgspec.to_builtins(state) if (state := self.store_state()) else None},
                "time": time.time()}

    # The CA is installed before the replica starts and never changes while it
    # runs: status (polled every second by `lb haproxy --watch`) reads, hashes
    # and loads it, with the system trust store, once.
    @cached_property
    def _ca_fingerprint(self) -> str | None:
        if self.pki_paths is None or not self.pki_paths.ca_cert.exists():
            return None
        return pki.fingerprint(self.pki_paths.ca_cert.read_bytes())

    @cached_property
    def _ping_tls(self) -> ssl.SSLContext:
        """Replicas' API certificates come from the cluster CA, or are an operator's
        that the system's trust store knows."""
        ctx = ssl.create_default_context()
        if self.pki_paths is not None and self.pki_paths.ca_cert.exists():
            ctx.load_verify_locations(cafile=str(self.pki_paths.ca_cert))
        return ctx

    # -- backup (api/backup.py streams what these return) --------------------------

    async def snapshot(self) -> backups.Snapshot:
        """A consistent etcd snapshot, spooled in the data directory (it holds every secret)."""
        if self.pki_paths is None:
            raise ClusterError("unavailable", "this replica has no data directory to spool a snapshot in")
        return await self._etcd(backups.take_snapshot(self.client, self.pki_paths.data_dir / "tmp"))

    async def backup_info(self, revision: int, through: int) -> dict[str, Any]:
        """Who took the backup, the cluster CA, and the blobs a snapshot taken between the two revisions knows."""
        if revision < 0 or through < 0:
            raise ClusterError("invalid", "revision and through take whole numbers (0: the current one)")
        current = await self._etcd(self.client.revision())
        if max(revision, through) > current:
            raise ClusterError("invalid", f"revision {max(revision, through)} is in the future: "
                                          f"the cluster is at {current}")
        if self.pki_paths is None or not self.pki_paths.has_ca():
            raise ClusterError("unavailable", "this replica does not hold the cluster CA; back up through "
                                              "another one")
        ca_cert, ca_key = pki.ca_pem(self.pki_paths)
        try:
            blobs = await backups.blobs_between(self.client, revision, through)
        except backups.Compacted:
            raise ClusterError("refused", f"revision {revision} is compacted away (the backup took too long "
                                          "between its snapshot and its blob list); run it again") from None
        except EtcdUnavailable as e:
            raise ClusterError("unavailable", f"the cluster's metadata store cannot be reached: {e}") from None
        return {"replica": self.replica_id, "cluster_token": self.cluster_token, "moorage_version": __version__,
                "ca_cert": ca_cert.decode("ascii"), "ca_key": ca_key.decode("ascii"), "blobs": blobs}

    # -- settings ------------------------------------------------------------

    def settings_view(self) -> dict[str, Any]:
        shown = self.settings.shown()
        return {"settings": {k: {"value": shown[k], "help": s.help}
                             for k, s in settings.SETTINGS.items()},
                "revision": self.settings.revision}

    async def set_setting(self, key: str, raw: Any) -> dict[str, Any]:
        try:
            value, revision = await self._etcd(settings.set_value(self.client, key, raw))
        except SettingError as e:
            raise ClusterError("invalid", str(e)) from None
        await self.index.wait_applied(revision)
        if settings.SETTINGS[key].secret:
            value = settings.SHOWN_SECRET
        return {"key": key, "value": value, "revision": revision}

    async def unset_setting(self, key: str) -> dict[str, Any]:
        try:
            revision = await self._etcd(settings.unset_value(self.client, key))
        except SettingError as e:
            raise ClusterError("invalid", str(e)) from None
        await self.index.wait_applied(revision)
        return {"key": key, "value": settings.SETTINGS[key].default, "revision": revision}


async def _reconfigure(operation, what: str):
    """etcd refuses to change its membership for a few seconds after a member
    starts ("unhealthy cluster"): wait that out, within a bound."""
    deadline = time.monotonic() + RECONFIGURE_SECONDS
    backoff = Backoff(0.5, 3.0)
    while True:
        try:
            return await operation()
        except EtcdUnavailable as e:
            if "unhealthy cluster" not in str(e) or time.monotonic() > deadline:
                raise ClusterError("unavailable", f"the cluster cannot {what} now: {e}") from None
        await backoff.sleep()


async def _ping_all(urls: list[str], tls: ssl.SSLContext) -> dict[str, tuple[bool, str]]:
    """GET /_ping on each replica: (ok, reason)."""
    timeout = aiohttp.ClientTimeout(total=PING_TIMEOUT)

    async def ping(session: aiohttp.ClientSession, url: str) -> tuple[str, tuple[bool, str]]:
        try:
            async with session.get(url + "/_ping", ssl=tls) as r:
                body = msgspec.json.decode(await r.read())
                return url, (r.status == 200, body.get("reason", ""))
        except aiohttp.ClientConnectorCertificateError:
            return url, (False, "unreachable: its TLS certificate is not from the cluster CA "
                                "nor trusted by this machine")
        except (aiohttp.ClientError, asyncio.TimeoutError, msgspec.DecodeError, OSError) as e:
            return url, (False, f"unreachable: {type(e).__name__}")

    async with aiohttp.ClientSession(timeout=timeout) as session:
        return dict(await asyncio.gather(*(ping(session, u) for u in urls)))
