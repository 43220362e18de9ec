"""Big request bodies straight from the socket into the upload's buffers (draft for api/).

aiohttp hands a body over as bytes objects: over TLS the SSL layer decrypts
into a new bytes, the HTTP parser copies each piece into another, and the
upload code joined them again for hashlib. Measured on 2 cores, one 256 MiB
PUT over TLS: 3.24 CPU s/GiB that way, 2.43 with the body decrypted (or,
over plain HTTP, received) straight into a preallocated buffer, hashed and
written from it.

So each connection's protocol is a `Tap` in front of aiohttp's
RequestHandler: it passes bytes through untouched until a handler calls
`take_body`, which drains what aiohttp had already buffered and then has the
transport fill the body's own buffers (asyncio's BufferedProtocol: the SSL
layer decrypts into them). aiohttp's parser never sees those bytes and is
left in the middle of the body, so the connection closes after the
response (`Connection: close`): one TLS handshake per big body, ~1 ms
against the tens of milliseconds of a ≥ 1 MiB body.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

from aiohttp import web

SCRATCH = 256 << 10      # what the transport reads into between requests (asyncio's own size)
BUFFER = 4 << 20         # one body buffer: hashed and written in one thread call
BUFFERS = 2              # one filling while the other is hashed and written
MIN_TAPPED = 1 << 20     # smaller bodies are cheaper the ordinary way (no reconnect)
# Set on a request whose body was taken: its response must close the connection
# (the dispatcher calls force_close() on whatever it answers).
TAPPED = "moorage.tapped"


class Tap(asyncio.BufferedProtocol):
    """A connection's protocol: aiohttp's handler behind it, a body's buffers when one is taken."""

    def __init__(self, inner: asyncio.Protocol):
        self.inner = inner
        self._scratch = memoryview(bytearray(SCRATCH))  # a memoryview: sslproto slices it
        self.body: _Body | None = None
        self.transport: asyncio.Transport | None = None
        self.done = False  # a body was taken: nothing after it goes to aiohttp's parser

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.body is not None:
            self.body.fail(exc or ConnectionResetError("the client closed the connection"))
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def eof_received(self) -> bool | None:
        if self.body is not None:
            self.body.fail(ConnectionResetError("the client closed the connection mid-body"))
        return self.inner.eof_received()

    def get_buffer(self, sizehint: int) -> memoryview:
        body = self.body
        if body is not None:
            return body.get_buffer()
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        body = self.body
        if body is not None:
            body.updated(nbytes)
        elif not self.done:
            self.inner.data_received(bytes(self._scratch[:nbytes]))
        # else: bytes after a taken body (a pipelined request): dropped, the connection closes


class _Body:
    """The rest of one request body, in buffers the transport fills directly."""

    def __init__(self, tap: Tap, length: int):
        self.tap, self.left = tap, length
        self.free: deque[bytearray] = deque(bytearray(BUFFER) for _ in range(BUFFERS))
        self.full: deque[memoryview] = deque()
        self.cur: bytearray | None = None
        self.fill = 0
        self.error: BaseException | None = None
        self.waiter: asyncio.Future | None = None
        self.paused = False

    def get_buffer(self) -> memoryview:
        if self.cur is None:
            self.cur = self.free.popleft()
            self.fill = 0
        return memoryview(self.cur)[self.fill:self.fill + min(len(self.cur) - self.fill, self.left)]

    def updated(self, n: int) -> None:
        self.fill += n
        self.left -= n
        if self.fill == len(self.cur) or self.left == 0:  # type: ignore[arg-type]
            self.full.append(memoryview(self.cur)[:self.fill])  # type: ignore[index]
            self.cur = None
            if self.left == 0 or not self.free:
                # No buffer to read into (or the body is complete): the transport waits.
                self.tap.transport.pause_reading()  # type: ignore[union-attr]
                self.paused = True
            self._wake()

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def release(self, view: memoryview) -> None:
        """The consumer is done with `view`: its buffer may be filled again."""
        self.free.append(view.obj)  # type: ignore[arg-type]
        if self.paused and self.left > 0:
            self.paused = False
            self.tap.transport.resume_reading()  # type: ignore[union-attr]

    async def next(self) -> memoryview | None:
        while not self.full:
            if self.error is not None:
                raise self.error
            if self.left == 0 and self.cur is None:
                return None
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return self.full.popleft()


def tap_of(request: web.BaseRequest) -> Tap | None:
    """The request's connection's Tap (the transport's protocol, TLS or not)."""
    transport = request.transport
    protocol = transport.get_protocol() if transport is not None else None
    return protocol if isinstance(protocol, Tap) else None


def tappable(request: web.BaseRequest) -> bool:
    """A body declared big by its Content-Length.

    Not a chunked body (docker's and skopeo's layer PATCHes): by the time the
    handler runs, aiohttp's parser may be inside a chunk or its size line, and
    where is its own secret; those keep aiohttp's path.
    """
    length = request.content_length
    return (length is not None and length >= MIN_TAPPED and tap_of(request) is not None
            and request.headers.get("Transfer-Encoding", "").lower() != "chunked")


async def take_body(request: web.BaseRequest) -> AsyncIterator[memoryview]:
    """The body of `request`, in views of buffers that stay valid until the next one is asked for.

    The consumer must be done with a view (written, hashed) before it asks
    for the next: the buffer is then filled again. Only for `tappable` requests.
    """
    tap = tap_of(request)
    assert tap is not None and request.content_length is not None
    content = request.content
    # What aiohttp has already parsed into its StreamReader, taken at once with no await
    # in between, so that from the next read on every byte comes to the tap: draining it
    # piece by piece while the consumer hashes would let a fast client keep it full.
    early = []
    while (chunk := content.read_nowait()):
        early.append(chunk)
    left = request.content_length - sum(map(len, early))
    body = None
    if left > 0:
        # From here on aiohttp's parser sees nothing of this connection: it closes after the response.
        tap.done = True
        request[TAPPED] = True
        body = tap.body = _Body(tap, left)
        if tap.transport is not None and request.protocol._reading_paused:  # type: ignore[attr-defined]
            tap.transport.resume_reading()
    for chunk in early:
        yield memoryview(chunk)
    if body is None:
        return
    previous = None
    try:
        while True:
            if previous is not None:
                body.release(previous)
                previous = None
            view = await body.next()
            if view is None:
                break
            previous = view
            yield view
    finally:
        tap.body = None
        content.feed_eof()  # aiohttp must not linger reading a body it will never get
