"""Connection limits the HTTP server enforces before any handler runs.

aiohttp's low-level server bounds the size of a request's head (line, field
and count limits) and closes idle keep-alive connections, but it has no
deadline for a request's head to arrive: a client that trickles one header
byte every few seconds (slowloris) holds its connection until the keep-alive
timer fires. Asyncio has no worker pool to exhaust, so what such clients
really take is file descriptors and memory; two limits bound that:

- a head deadline: once the first byte of a request arrives, its whole head
  must follow within HEADER_SECONDS, else the connection is closed;
- a cap on the connections one client address may hold at once.

Bodies have their own idle and rate limits where they are read (bodies.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Protocol

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger(__name__)

# A real client sends its request head in one write; ten seconds is many
# round trips on the worst link, and what Go servers commonly use
# (ReadHeaderTimeout). HAProxy in front has its own, looser 30 s.
HEADER_SECONDS = 10.0
# Far above what one client needs (docker pushes three layers at a time,
# skopeo a few more) and above what one HAProxy opens to one replica (its
# maxconn is 4096 over at least three replicas), yet a single address can
# no longer take every file descriptor of the process.
MAX_CONNECTIONS_PER_CLIENT = 1536


class ClientCounts(Protocol):
    """Open connections per client address, for the whole replica (its workers' summed)."""

    def client_connections(self, client: str) -> int: ...

    def client_opened(self, client: str) -> None: ...

    def client_closed(self, client: str) -> None: ...


class LocalClientCounts:
    """A replica that is one process counts in memory (with workers: cluster/shared.py's Shared)."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()

    def client_connections(self, client: str) -> int:
        return self._counts[client]

    def client_opened(self, client: str) -> None:
        self._counts[client] += 1

    def client_closed(self, client: str) -> None:
        self._counts[client] -= 1
        if self._counts[client] <= 0:
            del self._counts[client]


class GuardedServer(web.Server):
    """web.Server whose connections obey the head deadline and the per-client cap."""

    def __init__(self, handler, *, header_seconds: float = HEADER_SECONDS,
                 max_per_client: int = MAX_CONNECTIONS_PER_CLIENT, client_counts: ClientCounts | None = None,
                 **kwargs):
        super().__init__(handler, **kwargs)
        self.header_seconds = header_seconds
        self.max_per_client = max_per_client
        self.per_client: ClientCounts = client_counts or LocalClientCounts()
        self.refused = 0
        self.timed_out_heads = 0

    def __call__(self) -> RequestHandler:
        return GuardedHandler(self, loop=self._loop, **self._kwargs)


class GuardedHandler(RequestHandler):
    """RequestHandler with a deadline on each request head and a per-address count."""

    # The client a load balancer named in a PROXY protocol header (proxy_protocol.py), set
    # before the connection is made; it stands for the TCP peer everywhere (request.remote).
    client: tuple[str, int] | None = None
    # Called when the connection ends (the listener counts a worker's open connections).
    closed_hook = None

    def __init__(self, manager: GuardedServer, **kwargs):
        super().__init__(manager, **kwargs)
        self._guard = manager
        self._client: str | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_count = 0

    @property
    def peername(self):  # type: ignore[override]
        return self.client if self.client is not None else super().peername

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = self.client or transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        super().connection_made(transport)
        if self._guard.per_client.client_connections(client) >= self._guard.max_per_client:
            self._guard.refused += 1
            if self._guard.refused % 1000 == 1:  # one line per thousand, not a flood
                log.warning("refusing connections: too many from one client",
                            extra={"client": client, "limit": self._guard.max_per_client,
                                   "refused": self._guard.refused})
            self.force_close()
            return
        self._client = client
        self._guard.per_client.client_opened(client)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.closed_hook is not None:
            self.closed_hook()
        self._cancel_head_timer()
        if self._client is not None:
            self._guard.per_client.client_closed(self._client)
            self._client = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_timer is not None and self._request_count != self._head_count:
            self._cancel_head_timer()  # the head it was timing has arrived whole
        if (self._head_timer is None and data and self.transport is not None
                and not self._request_in_progress and not self._messages
                and not self._force_close):
            # Bytes of a request whose head is not complete yet.
            self._head_count = self._request_count
            self._head_timer = self._loop.call_later(self._guard.header_seconds, self._head_expired)

    def _head_expired(self) -> None:
        self._head_timer = None
        if (self.transport is not None and self._request_count == self._head_count
                and not self._request_in_progress and not self._messages):
            self._guard.timed_out_heads += 1
            self.force_close()

    async def finish_response(self, request: web.BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        result = await super().finish_response(request, resp, start_time)
        if resp.status == 408:
            # A body that stalled or trickled (bodies.py): close now rather than
            # linger up to 10 s reading the rest of it, as aiohttp otherwise would.
            self.force_close()
        return result

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None, message: str | None = None) -> web.StreamResponse:
        """A request aiohttp could not parse gets an OCI error body, not aiohttp's text.

        Malformed and oversized heads are what hostile clients send all day:
        logged in one line, not with a traceback each.
        """
        if isinstance(exc, ConnectionResetError):
            # The client went away mid-request (a body cut short): nobody to
            # answer, and nothing worth a traceback in the log.
            log.debug("client went away mid-request", extra={"client": self._client})
            response = web.Response(status=400)
            response.force_close()
            return response
        if not isinstance(exc, HttpProcessingError) or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        too_big = isinstance(exc, LineTooLong) or "Too many headers" in str(exc)
        status = 431 if too_big else 400
        reason = "request head over the server's limits" if too_big else "malformed HTTP request"
        log.info("refused a request aiohttp could not parse",
                 extra={"client": self._client, "status": status, "reason": str(exc)[:200]})
        body = {"errors": [{"code": "UNSUPPORTED", "message": f"{reason}: {str(exc)[:200]}"}]}
        response = web.Response(status=status, body=msgspec.json.encode(body),
                                content_type="application/json")
        response.force_close()
        return response

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
