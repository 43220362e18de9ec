"""Whether the object store answers, as this replica last saw it: for /health and `moorage status`.

A push finds a store that is down by failing (503 naming it); an operator
should not have to wait for one. So the replica's process asks the store a
cheap signed question (the bucket's HEAD, which `clock_offset` makes) every
few seconds, once per replica (the parent's task; its workers are told the
answer), bounded by the driver's own timeouts and retries and a deadline of
its own. The answer is only reported: `/_ping` stays 200 while only the store
is down, since every replica shares it and a load balancer that drained them
all would help no one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import msgspec

from moorage.storage.base import BlobDriver

log = logging.getLogger(__name__)

PROBE_SECONDS = 5.0        # between probes while the store answers
FAILING_PROBE_SECONDS = 2.0  # while it does not: its return shows soon
PROBE_DEADLINE = 30.0      # beyond the driver's own retries (about 10 s when nothing answers)


class StoreState(msgspec.Struct, frozen=True):
    """What /health shows as `object_store` (epoch seconds)."""

    where: str                   # "bucket B at E"
    reachable: bool
    since: float                 # when it became reachable or unreachable
    checked: float               # when the last probe ended
    error: str | None = None     # the last failure's sentence, while unreachable


async def probe_store(storage: BlobDriver, state: StoreState, publish: Callable[[StoreState], None]) -> None:
    """Probe forever from `state` (the one the start-up probe left), publishing each result."""
    while True:
        await asyncio.sleep(PROBE_SECONDS if state.reachable else FAILING_PROBE_SECONDS)
        error = None
        try:
            await asyncio.wait_for(storage.clock_offset(), PROBE_DEADLINE)
        except asyncio.TimeoutError:
            error = f"{state.where} did not answer within {PROBE_DEADLINE:.0f} s"
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure is the store's state to report
            error = str(e) or type(e).__name__
        now = time.time()
        if (error is None) != state.reachable:
            if error is None:
                log.info("the object store answers again", extra={"store": state.where,
                                                                  "down_seconds": round(now - state.since, 1)})
            else:
                log.warning("the object store does not answer", extra={"store": state.where, "error": error})
            state = StoreState(state.where, error is None, now, now, error)
        else:
            state = msgspec.structs.replace(state, checked=now, error=error)
        publish(state)
