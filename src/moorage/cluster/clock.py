"""The cluster's time as this replica can vouch for it, whatever the replicas' clocks say.

Records carry their writer's wall-clock time (a blob's `created`, an upload's
`updated`, a heartbeat's `seen`) and other replicas compare them with their
own clocks: garbage collection to judge what is older than its grace period,
`status` to say when a replica was last seen. Clocks that disagree by minutes
(no NTP, a paused VM) would make a replica whose clock runs ahead collect a
blob pushed a moment ago through another, or show a healthy replica as
last seen minutes ago.

So each replica estimates every other's clock offset from the heartbeats it
watches: a record written with `seen = their clock` arriving now says their
clock minus ours is at most `seen - now` (the delivery delay only makes the
estimate lower, never higher). `now()` is then the slowest clock in the
cluster, projected onto ours: ages measured with it are never longer than
they really are, on any replica. Only heartbeats seen changing count: a
record read at start-up may be a dead replica's, minutes old.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec

from moorage.cluster.replicas import HEARTBEAT_SECONDS, ReplicaRecord
from moorage.meta import keys
from moorage.meta.etcd import Event

_decode = msgspec.json.Decoder(ReplicaRecord).decode
# After this long watching, a replica whose heartbeat never changed is not running.
SETTLE_SECONDS = 2.5 * HEARTBEAT_SECONDS


class ClusterClock:
    def __init__(self, replica_id: str, clock: Callable[[], float] = time.time):
        self.replica_id = replica_id
        self._clock = clock
        self._seen: dict[str, float] = {}      # replica id -> the last `seen` its record had
        self._offsets: dict[str, float] = {}   # replica id -> its clock minus ours, estimated
        self._since = time.monotonic()

    def observe(self, event: Event) -> None:
        """An index subscriber for keys.REPLICA."""
        rid = event.kv.key[len(keys.REPLICA):].decode(errors="replace")
        if event.deleted:
            self._seen.pop(rid, None)
            self._offsets.pop(rid, None)
            return
        try:
            record = _decode(event.kv.value)
        except msgspec.DecodeError:
            return
        if record.id == self.replica_id:
            return
        before = self._seen.get(rid)
        self._seen[rid] = record.seen
        if before is not None and record.seen != before:
            self._offsets[rid] = record.seen - self._clock()

    def offset(self, replica_id: str) -> float | None:
        """That replica's clock minus ours (0 for ours), None while unknown."""
        return 0.0 if replica_id == self.replica_id else self._offsets.get(replica_id)

    def now(self) -> float:
        """The slowest known clock of the cluster, now, on this replica's scale."""
        return self._clock() + min([0.0, *self._offsets.values()])

    def settled(self) -> bool:
        """Whether every replica whose heartbeat runs has had one seen changing."""
        return (all(rid in self._offsets for rid in self._seen)
                or time.monotonic() - self._since > SETTLE_SECONDS)

    async def settle(self) -> None:
        """Wait (at most SETTLE_SECONDS after start-up) until `now()` accounts for every running replica."""
        while not self.settled():
            await asyncio.sleep(0.2)
