"""The PROXY protocol (version 2) between the load balancer and the replicas.

HAProxy passes TLS through (`mode tcp`), so a replica's TCP peer is the load
balancer and every client would look like it: one address in the audit log,
one failed-login slowdown shared by everybody. With `send-proxy-v2` HAProxy
starts each connection with a binary header naming the real client, before
the first byte of TLS. A replica reads it when, and only when, the connection
comes from an address of the cluster setting `proxy_protocol.from`:

- from such an address the header is read when the connection starts with
  one: its first byte (a header begins with "\\r", a TLS handshake with
  0x16, an HTTP request with a letter) is peeked at, never consumed. A
  header that starts but is malformed, late or oversized closes the
  connection. A connection without one is the load balancer host's own
  (HAProxy's health checks, `moorage` commands or skopeo run there) and is
  served under that address: requiring the header would break every tool
  on that host that does not speak the protocol;
- from any other address nothing is read: a header there is bytes that fail
  the TLS handshake (or the HTTP parse), so nobody else can claim an address.

The header is read with exact-length reads on the raw socket, so not a byte
of the TLS handshake behind it is consumed, within HEADER_SECONDS and at most
MAX_HEADER bytes; then the socket goes to asyncio's TLS and the HTTP server,
which knows the client's address from then on. A LOCAL header (what HAProxy's
`check-send-proxy` health checks send) means the connection is the proxy's
own: its address stands.

The listener accepts connections itself (asyncio's create_server would read
the header's bytes together with the TLS handshake's) and is the one
listener of the API, whether the setting is set or not, so the setting
applies to the next connection without a restart.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

from moorage.cluster.addresses import listen_socket
from moorage.cluster.settings import Network
from moorage.cluster.handout import receive_connections

log = logging.getLogger(__name__)

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# Version 2, command LOCAL, family UNSPEC, no addresses: "this connection is the proxy's own".
LOCAL_HEADER = SIGNATURE + b"\x20\x00\x00\x00"
HEADER_SECONDS = 5.0
# HAProxy's header is 16 bytes plus 12 (IPv4) or 36 (IPv6) of addresses and a
# few TLVs; far more than that is not a load balancer talking.
MAX_HEADER = 16 + 2048
WARN_SECONDS = 60.0


class ProxyError(ValueError):
    """A connection from a trusted address whose PROXY header is malformed, cut short or too long."""


class _NoHeader(Exception):
    """A connection from a trusted address that does not start with a PROXY header."""


def header(client: tuple[str, int], proxy: tuple[str, int]) -> bytes:
    """A PROXY v2 header for a TCP connection from `client` to `proxy`, as HAProxy sends it (for tests)."""
    src, dst = ipaddress.ip_address(client[0]), ipaddress.ip_address(proxy[0])
    family = b"\x11" if src.version == 4 else b"\x21"
    body = src.packed + dst.packed + client[1].to_bytes(2, "big") + proxy[1].to_bytes(2, "big")
    return SIGNATURE + b"\x21" + family + len(body).to_bytes(2, "big") + body


def parse(head: bytes, body: bytes) -> tuple[str, int] | None:
    """The client's (address, port) from a v2 header's 16 fixed bytes and the rest; None for the
    connection's own (LOCAL, or a family without addresses)."""
    if head[:12] != SIGNATURE:
        raise ProxyError("no PROXY protocol v2 header")
    version, command = head[12] >> 4, head[12] & 0x0F
    if version != 2:
        raise ProxyError(f"PROXY protocol version {version}, not 2")
    if command == 0:  # LOCAL: the proxy's own connection (a health check)
        return None
    if command != 1:
        raise ProxyError(f"unknown PROXY command {command}")
    family, transport = head[13] >> 4, head[13] & 0x0F
    if family == 0 or family == 3:  # UNSPEC, UNIX: nothing to use, the connection's address stands
        return None
    if transport != 1:
        raise ProxyError("the PROXY header is not for a stream (TCP) connection")
    if family == 1 and len(body) >= 12:
        return str(ipaddress.IPv4Address(body[0:4])), int.from_bytes(body[8:10], "big")
    if family == 2 and len(body) >= 36:
        return str(ipaddress.IPv6Address(body[0:16])), int.from_bytes(body[32:34], "big")
    raise ProxyError("a PROXY header too short for its addresses")


def address_of(peer: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(peer[0])
    except (TypeError, ValueError, IndexError):
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:  # a dual-stack listener's IPv4 peer
        return ip.ipv4_mapped
    return ip


class _Listener:
    """What BaseSite.stop() closes: the listening socket and its accept loop."""

    def __init__(self, sock: socket.socket, task: asyncio.Task):
        self.sock, self.task = sock, task

    def close(self) -> None:
        self.task.cancel()
        self.sock.close()


class _Handed:
    """What BaseSite.stop() closes for a worker: the channel its parent hands connections on."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())


class ApiSite(web.BaseSite):
    """The API's listener: TCPSite's job, plus the PROXY header from the addresses `trusted()` names."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, trusted: Callable[[], Sequence[Network]],
                 ssl_context: ssl.SSLContext | None = None, backlog: int = 1024,
                 handed: socket.socket | None = None, on_closed: Callable[[], None] | None = None):
        """`handed`: in a worker (cluster/handout.py), the channel its parent sends accepted
        connections on, instead of a socket of our own; `on_closed` is called once per such
        connection when it ends (the parent hands the next one to the least busy worker)."""
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self.host, self.port = host, port
        self.trusted = trusted
        self.handed, self.on_closed = handed, on_closed
        self.refused = 0              # connections from trusted addresses with a broken header
        self._warned_at = 0.0
        self._tasks: set[asyncio.Task] = set()

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{f'[{self.host}]' if ':' in self.host else self.host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        if self.handed is not None:
            self._receive_from(self.handed)
            return
        sock = listen_socket(self.host, self.port, self._backlog)
        self._server = _Listener(sock, asyncio.create_task(self._accept(sock)))  # type: ignore[assignment]

    def _receive_from(self, channel: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        channel.setblocking(False)

        def readable() -> None:
            try:
                receive_connections(channel, self._start_connection)
            except (ConnectionError, OSError):  # the parent is gone: our link says so too
                loop.remove_reader(channel.fileno())
        loop.add_reader(channel.fileno(), readable)
        self._server = _Handed(channel)  # type: ignore[assignment]

    def _start_connection(self, conn: socket.socket, peer: Any) -> None:
        task = asyncio.get_running_loop().create_task(self._connection(conn, peer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        failed_at = 0.0
        while True:
            try:
                conn, peer = await loop.sock_accept(sock)
            except OSError as e:  # out of file descriptors, say: a later accept may do
                if time.monotonic() - failed_at >= WARN_SECONDS:
                    failed_at = time.monotonic()
                    log.warning("accepting connections fails", extra={"error": str(e)})
                await asyncio.sleep(0.1)
                continue
            self._start_connection(conn, peer)

    async def _connection(self, conn: socket.socket, peer: Any) -> None:
        loop = asyncio.get_running_loop()
        client = None
        closed = _once(self.on_closed)
        try:
            trusted = self.trusted()
            ip = address_of(peer) if trusted else None
            if ip is not None and any(ip in net for net in trusted):
                try:
                    client = await asyncio.wait_for(self._header(loop, conn), HEADER_SECONDS)
                except _NoHeader:
                    pass  # the load balancer host's own connection: served under its address
                except (ProxyError, asyncio.TimeoutError, OSError) as e:
                    self._refuse(peer, e)
                    conn.close()
                    closed()
                    return
            await loop.connect_accepted_socket(lambda: self._protocol(client, closed), conn,
                                               ssl=self._ssl_context)
        except asyncio.CancelledError:
            conn.close()
            closed()
            raise
        except (OSError, asyncio.TimeoutError) as e:  # a failed TLS handshake (ssl.SSLError): the client's
            log.debug("connection failed before its first request", extra={"peer": str(peer), "error": str(e)})
            conn.close()
            closed()
        except Exception:
            log.exception("handing a connection to the HTTP server failed", extra={"peer": str(peer)})
            conn.close()
            closed()

    def _protocol(self, client: tuple[str, int] | None, closed: Callable[[], None]) -> asyncio.Protocol:
        server = self._runner.server
        assert server is not None
        handler = server()
        if client is not None:
            handler.client = client  # type: ignore[attr-defined]  # GuardedHandler (connections.py)
        handler.closed_hook = closed  # type: ignore[attr-defined]
        return handler

    @staticmethod
    async def _header(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> tuple[str, int] | None:
        if await _peek_byte(loop, conn) != SIGNATURE[:1]:
            raise _NoHeader
        head = await _read_exact(loop, conn, 16)
        if head[:12] != SIGNATURE:
            raise ProxyError("no PROXY protocol v2 header")
        length = int.from_bytes(head[14:16], "big")
        if 16 + length > MAX_HEADER:
            raise ProxyError(f"a PROXY header of {16 + length} bytes, over {MAX_HEADER}")
        return parse(head, await _read_exact(loop, conn, length))

    def _refuse(self, peer: Any, error: BaseException) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._warned_at >= WARN_SECONDS:  # one line a minute, not one per connection
            self._warned_at = now
            reason = "no whole header within 5 seconds" if isinstance(error, asyncio.TimeoutError) else str(error)
            log.warning("closed a connection from a proxy_protocol.from address with a broken PROXY v2 header",
                        extra={"peer": str(peer[0]) if peer else "?", "reason": reason, "refused": self.refused})


async def _peek_byte(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> bytes:
    """The connection's first byte, left in the socket for whoever reads next (b"" at end of stream)."""
    while True:
        try:
            return conn.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            pass
        readable = loop.create_future()
        loop.add_reader(conn.fileno(), lambda: readable.done() or readable.set_result(None))
        try:
            await readable
        finally:
            loop.remove_reader(conn.fileno())


async def _read_exact(loop: asyncio.AbstractEventLoop, conn: socket.socket, n: int) -> bytes:
    """Exactly `n` bytes: never one more, which would belong to the TLS handshake."""
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(conn, n - len(buf))
        if not chunk:
            raise ProxyError("the connection closed before its PROXY header was whole")
        buf += chunk
    return bytes(buf)


def _once(callback: Callable[[], None] | None) -> Callable[[], None]:
    """`callback`, called at most once however many of a connection's ends report."""
    done = False

    def call() -> None:
        nonlocal done
        if not done and callback is not None:
            done = True
            callback()
    return call
