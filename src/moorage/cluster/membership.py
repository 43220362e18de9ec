"""Watching the etcd membership: who else may write to the metadata."""

from __future__ import annotations

import asyncio
import logging

from moorage.meta.etcd import EtcdClient, EtcdUnavailable
from moorage.meta.index import Index

log = logging.getLogger(__name__)

POLL_SECONDS = 2.0


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
