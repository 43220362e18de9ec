"""The control channel between a replica's process and each of its workers.

Length-prefixed msgpack frames over a socketpair: messages one way (a
worker's audit events, the parent's news of the object store), calls with
replies the other (the login slowdown, the audit's flush, a barrier). Both
ends are the same class; what the messages mean is the service's
(api/server.py), not this module's.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

log = logging.getLogger(__name__)

_LEN = struct.Struct("<I")
# Above etcd's request size (--max-request-bytes, cluster/etcd_member.py): a relayed index
# batch (cluster/index_relay.py) carries at least one whole event.
MAX_FRAME = 16 << 20
_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()


class Channel:
    """Both ends of the control channel: messages one way, calls with replies the other."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self._calls: dict[int, asyncio.Future] = {}
        self._next = 0

    @classmethod
    async def open(cls, sock: socket.socket) -> "Channel":
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_FRAME)
        return cls(reader, writer)

    def send(self, msg: dict) -> None:
        data = _enc.encode(msg)
        self.writer.write(_LEN.pack(len(data)) + data)

    async def call(self, op: str, *args: Any, timeout: float = 10.0) -> Any:
        self._next += 1
        call_id = self._next
        fut = asyncio.get_running_loop().create_future()
        self._calls[call_id] = fut
        self.send({"t": "call", "id": call_id, "op": op, "args": list(args)})
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._calls.pop(call_id, None)

    async def serve(self, handle: Callable[[dict], Awaitable[Any]]) -> None:
        """Read frames until EOF. A reply completes its call; a call is answered in a task of its
        own (an answer may itself need a call the other way); any other message is handled
        before the next frame is read, so what one side sent is handled in the order it sent it."""
        calls: set[asyncio.Task] = set()
        while True:
            try:
                head = await self.reader.readexactly(_LEN.size)
                (n,) = _LEN.unpack(head)
                if n > MAX_FRAME:
                    raise ConnectionError(f"control frame of {n} bytes")
                msg = _dec.decode(await self.reader.readexactly(n))
            except (asyncio.IncompleteReadError, ConnectionError):
                for fut in self._calls.values():
                    if not fut.done():
                        fut.set_exception(ConnectionError("the other process is gone"))
                return
            kind = msg.get("t")
            if kind == "reply":
                fut = self._calls.get(msg["id"])
                if fut is not None and not fut.done():
                    fut.set_result(msg.get("value"))
            elif kind == "call":
                task = asyncio.create_task(self._answer(handle, msg))
                calls.add(task)
                task.add_done_callback(calls.discard)
            else:
                try:
                    await handle(msg)
                except Exception:  # a bad message must not end the channel
                    log.exception("control message failed", extra={"kind": kind})

    async def _answer(self, handle: Callable[[dict], Awaitable[Any]], msg: dict) -> None:
        try:
            value = await handle(msg)
        except Exception:
            log.exception("control call failed", extra={"op": msg.get("op")})
            value = None
        try:
            self.send({"t": "reply", "id": msg["id"], "value": value})
        except (ConnectionError, RuntimeError):
            pass
