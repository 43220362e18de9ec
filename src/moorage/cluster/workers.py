"""A replica's worker processes: the replica's process accepts, N workers serve HTTP.

The parent binds the API's listening socket and accepts on it in a thread of
its own; each connection goes, as a file descriptor over a socketpair
(SCM_RIGHTS), to the worker with the fewest open connections. Measured on
2 cores (the plan has the tables): SO_REUSEPORT hashes connections without
regard to load, so a client with three keep-alive connections lands on one
worker a quarter of the time, and a worker's death resets the connections
queued on its socket; the hand-off is even every time and loses nothing, for
~100 µs of parent CPU per new connection and nothing per request.

Shared between the processes, in one memfd mapping made by the parent
(`Shared`): the quorum probe's last success, whether this replica's etcd
member is alone, the revision of the last write each process had
acknowledged (read-your-writes across workers, see meta/index.py), each
worker's open-connection counters, each worker's row of the per-client
connection table, and each process's row of upload-session changes (what
keeps the session cache of registry/sessions.py valid across workers). Every
field has one writer, so no locks.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import hashlib
import logging
import mmap
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

log = logging.getLogger(__name__)

MAX_WORKERS = 64
DEFAULT_CAP = 8
# Buckets of the per-client connection table: an address's count is its
# bucket summed over the workers' rows; two addresses in one bucket share a cap.
CLIENT_BUCKETS = 1 << 16
# Buckets of the session-change table: a change to one upload's session
# invalidates what every process cached of the uploads in its bucket.
SESSION_BUCKETS = 1 << 12

_PR_SET_PDEATHSIG = 1


def default_workers() -> int:
    """The machine's cores, at most DEFAULT_CAP: each worker holds its own index and etcd watch."""
    return max(1, min(os.cpu_count() or 1, DEFAULT_CAP))


def die_with_parent() -> None:
    """In a child before exec: be killed when the parent dies, even by SIGKILL.

    The signal fires when the *thread* that forked exits: fork only from the
    main thread. A parent that died before this ran leaves us re-parented, so
    the child checks getppid() itself once it runs (`check_parent`).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def check_parent(expected: int) -> None:
    if os.getppid() != expected:
        os._exit(1)


# -- shared memory ---------------------------------------------------------------

# Header: magic, quorum_ok_at (CLOCK_MONOTONIC seconds), solo (0/1), not_solo_until,
# solo_epoch (counts the times solo began).
_HEADER = struct.Struct("<Qdqdq")
_MAGIC = 0x6D6F6F7261676531  # "moorage1"
_SLOT = struct.Struct("<q")


@dataclass
class Layout:
    workers: int

    @property
    def revisions(self) -> int:   # one slot per worker, and the parent's at index `workers`
        return 64

    @property
    def counters(self) -> int:    # per worker: connections handed (parent writes), closed (worker writes)
        return self.revisions + 8 * (self.workers + 1)

    @property
    def clients(self) -> int:
        return self.counters + 16 * self.workers

    @property
    def sessions(self) -> int:    # per process (the workers, then the parent): changes per bucket
        return self.clients + 4 * CLIENT_BUCKETS * self.workers

    @property
    def size(self) -> int:
        raw = self.sessions + 8 * SESSION_BUCKETS * (self.workers + 1)
        return -(-raw // mmap.PAGESIZE) * mmap.PAGESIZE


class Shared:
    """The replica's shared state; `slot` is this process's index (the parent's is `workers`)."""

    def __init__(self, fd: int, workers: int, slot: int, create: bool = False):
        self.fd, self.workers, self.slot = fd, workers, slot
        self.layout = Layout(workers)
        if create:
            os.ftruncate(fd, self.layout.size)
        self.map = mmap.mmap(fd, self.layout.size)
        if create:
            _HEADER.pack_into(self.map, 0, _MAGIC, 0.0, 0, 0.0, 0)
        elif _HEADER.unpack_from(self.map, 0)[0] != _MAGIC:
            raise RuntimeError("shared state of another version")
        self._clients = memoryview(self.map)[self.layout.clients:self.layout.sessions].cast("i")
        self._sessions = memoryview(self.map)[self.layout.sessions:].cast("q")
        self._counters = memoryview(self.map)[self.layout.counters:self.layout.clients].cast("q")

    @classmethod
    def create(cls, workers: int) -> "Shared":
        return cls(os.memfd_create("moorage-shared", 0), workers, workers, create=True)

    # quorum: written by the parent's probe, read by every writer's `writable()`
    @property
    def quorum_ok_at(self) -> float:
        return struct.unpack_from("<d", self.map, 8)[0]

    @quorum_ok_at.setter
    def quorum_ok_at(self, value: float) -> None:
        struct.pack_into("<d", self.map, 8, value)

    # solo: the parent's membership poll sets it; any process clears it before adding a member
    def solo(self) -> bool:
        return struct.unpack_from("<q", self.map, 16)[0] == 1

    def set_solo(self, value: bool) -> None:
        if value and time.monotonic() < struct.unpack_from("<d", self.map, 24)[0]:
            return
        if value and not self.solo():
            # A new epoch each time solo begins: what a process cached in an earlier solo
            # period may have been changed by another member in between.
            struct.pack_into("<q", self.map, 32, struct.unpack_from("<q", self.map, 32)[0] + 1)
        struct.pack_into("<q", self.map, 16, 1 if value else 0)

    def leave_solo(self, hold_seconds: float = 30.0) -> None:
        struct.pack_into("<d", self.map, 24, time.monotonic() + hold_seconds)
        struct.pack_into("<q", self.map, 16, 0)

    # revisions: every process publishes the revision of each write etcd acknowledged to it
    def wrote(self, revision: int) -> None:
        off = self.layout.revisions + 8 * self.slot
        if revision > _SLOT.unpack_from(self.map, off)[0]:
            _SLOT.pack_into(self.map, off, revision)

    def newest_write(self) -> int:
        return max(_SLOT.unpack_from(self.map, self.layout.revisions + 8 * i)[0]
                   for i in range(self.workers + 1))

    # upload sessions: a process counts its own changes to each bucket, and a cached session
    # stays valid while the member is alone, in the same solo epoch, and its bucket's sum unchanged
    def session_stamp(self, upload_id: str) -> tuple[int, int] | None:
        """What a session cached now is valid under, or None when nothing may be cached."""
        if not self.solo():
            return None
        b = _session_bucket(upload_id)
        changes = sum(self._sessions[r * SESSION_BUCKETS + b] for r in range(self.workers + 1))
        return struct.unpack_from("<q", self.map, 32)[0], changes

    def session_changed(self, upload_id: str, before: tuple[int, int] | None) -> tuple[int, int] | None:
        """Count this process's change; the stamp of the new state: `before` plus this change."""
        self._sessions[self.slot * SESSION_BUCKETS + _session_bucket(upload_id)] += 1
        return None if before is None else (before[0], before[1] + 1)

    # connections handed to worker k (the parent counts) and closed by it (the worker counts)
    def handed(self, k: int) -> int:
        return self._counters[2 * k]

    def add_handed(self, k: int) -> None:
        self._counters[2 * k] += 1

    def closed(self, k: int) -> int:
        return self._counters[2 * k + 1]

    def add_closed(self) -> None:
        self._counters[2 * self.slot + 1] += 1

    def open_connections(self, k: int) -> int:
        return self.handed(k) - self.closed(k)

    # per-client connections: own row written, every row read
    def client_connections(self, address: str) -> int:
        b = _bucket(address)
        return sum(self._clients[w * CLIENT_BUCKETS + b] for w in range(self.workers))

    def client_opened(self, address: str) -> None:
        self._clients[self.slot * CLIENT_BUCKETS + _bucket(address)] += 1

    def client_closed(self, address: str) -> None:
        self._clients[self.slot * CLIENT_BUCKETS + _bucket(address)] -= 1

    def reset_worker(self, k: int) -> None:
        """A dead worker's counts go with it (called by the parent before restarting slot k)."""
        start = k * CLIENT_BUCKETS
        self._clients[start:start + CLIENT_BUCKETS] = memoryview(bytes(4 * CLIENT_BUCKETS)).cast("i")
        self._counters[2 * k] = 0
        self._counters[2 * k + 1] = 0
        # It may have died between a session's write to etcd and counting it: every process's
        # cached sessions go (a new epoch) rather than one of them trusting a stale offset.
        struct.pack_into("<q", self.map, 32, struct.unpack_from("<q", self.map, 32)[0] + 1)


def _bucket(address: str) -> int:
    # Python's str hash is salted per process: the workers must agree, so FNV-1a.
    h = 0xCBF29CE484222325
    for b in address.encode():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h & (CLIENT_BUCKETS - 1)


def _session_bucket(upload_id: str) -> int:
    # Upload ids are random hex (storage/base.py): their last digits are an even spread.
    return int(upload_id[-3:], 16) & (SESSION_BUCKETS - 1)


class WriterLocks:
    """One writer per upload across a replica's processes: a POSIX record lock on one byte of a
    lock file, at an offset hashed from the upload's id. Taken without waiting (2.6 µs here);
    the kernel drops a killed worker's locks, so a dead writer never wedges an upload.

    POSIX locks belong to the process and vanish when it closes *any* descriptor of the file,
    so each process opens it once and never closes it; within a process the caller's own set
    keeps two requests apart (the lock would let the same process in twice).
    """

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    @staticmethod
    def _offset(name: str) -> int:
        return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=6).digest(), "big")

    def acquire(self, name: str) -> bool:
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, self._offset(name))
            return True
        except OSError:
            return False

    def release(self, name: str) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, self._offset(name))


# -- the parent's accept thread ---------------------------------------------------

@dataclass
class WorkerLink:
    slot: int
    sock: socket.socket | None = None   # the parent's end of the connection socketpair
    pid: int = 0
    alive: bool = False


class Handout(threading.Thread):
    """Accepts on the listening socket; sends each connection to the least-loaded live worker.

    A thread, not the event loop: the parent's loop also runs scans (GC) that
    must never delay an accept; accept() and sendmsg() drop the GIL.
    """

    def __init__(self, listener: socket.socket, links: list[WorkerLink], shared: Shared, lock: threading.Lock):
        super().__init__(name="moorage-accept", daemon=True)
        self.listener, self.links, self.shared, self.lock = listener, links, shared, lock
        self.stopping = False
        self.turn = 0

    def run(self) -> None:
        self.listener.setblocking(True)
        while not self.stopping:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                if self.stopping:
                    return
                time.sleep(0.05)  # EMFILE and friends: a later accept may do
                continue
            try:
                self._hand(conn)
            finally:
                conn.close()   # the worker holds its own descriptor now

    def _hand(self, conn: socket.socket) -> None:
        for _ in range(len(self.links)):
            with self.lock:
                live = [ln for ln in self.links if ln.alive and ln.sock is not None]
                if not live:
                    return  # no worker: the client sees the connection close
                # Fewest open connections; among equals, the next after the last one chosen,
                # so that short connections one after another go round the workers.
                self.turn += 1
                n = len(live)
                link = min((live[(self.turn + i) % n] for i in range(n)),
                           key=lambda ln: self.shared.open_connections(ln.slot))
                sock = link.sock
            try:
                socket.send_fds(sock, [b"c"], [conn.fileno()])
            except OSError:
                with self.lock:
                    link.alive = False  # the supervisor restarts it
                continue
            self.shared.add_handed(link.slot)
            return

    def stop(self) -> None:
        self.stopping = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self.listener.close()


def receive_connections(sock: socket.socket, on_connection) -> None:
    """Worker side, on the event loop: call `on_connection(conn, peer)` for each handed socket.

    `sock` must be non-blocking: Python 3.11's socket.recv_fds ignores its flags argument.
    """
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 64, 32)
        except BlockingIOError:
            return
        if not msg and not fds:
            raise ConnectionError("the parent closed the connection channel")
        for fd in fds:
            conn = socket.socket(fileno=fd)
            conn.setblocking(False)
            try:
                peer = conn.getpeername()
            except OSError:  # already gone
                conn.close()
                continue
            on_connection(conn, peer)


# -- the control channel: length-prefixed msgpack frames over a socketpair ---------



_LEN = struct.Struct("<I")
MAX_FRAME = 4 << 20
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


# -- the parent's supervisor ------------------------------------------------------------

RESTART_MIN_SECONDS = 0.1
RESTART_MAX_SECONDS = 5.0
QUICK_DEATH_SECONDS = 30.0
READY_SECONDS = 120.0


@dataclass
class Worker:
    link: WorkerLink
    proc: Any = None                    # a multiprocessing Process (forkserver context)
    channel: Channel | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    started_at: float = 0.0
    quick_deaths: int = 0
    task: asyncio.Task | None = None


class PassedFd:
    """A file descriptor that crosses to the worker when the fork server pickles its arguments
    (as multiprocessing passes sockets); it arrives as a plain int."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        from multiprocessing import reduction
        return (_passed_fd, (reduction.DupFd(self.fd),))


def _passed_fd(dup: Any) -> int:
    return dup.detach()


@dataclass
class WorkerStart:
    """What a worker gets: its slot, its ends of the two channels, the shared block, the replica's options."""
    slot: int
    workers: int
    conn: socket.socket
    ctl: socket.socket
    shared: Any                          # the shared block's memfd: a PassedFd here, an int in the worker
    parent: int
    options: Any


def forkserver(preload: list[str]):
    """Workers are forked by multiprocessing's fork server, not by the replica's process.

    The replica's process has an etcd client (gRPC threads) and an event
    loop by the time workers start, and forking that is unsafe; a fresh
    interpreter per worker would import everything again (1-3 s here). The
    fork server is a fresh interpreter that imports `preload` once and forks
    each worker from that clean state: a worker (or its replacement) starts
    in milliseconds and shares the imported pages. It exits when the
    replica's process dies (its pipe closes), and each worker has
    PDEATHSIG against it: a `kill -9` of the replica leaves nothing behind.
    """
    import multiprocessing
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(preload)
    return ctx


class Supervisor:
    """Starts N workers, hands them connections, restarts the dead, stops them all.

    `main(start)` runs in each worker (a module-level function: it is pickled
    to the fork server); `handle(slot, msg)` answers the workers' messages
    (audit batches, calls such as the login slowdown).
    """

    def __init__(self, count: int, shared: Shared, main: Callable[[WorkerStart], None],
                 handle: Callable[[int, dict], Awaitable[Any]], ctx: Any, options: Any = None,
                 on_exit: Callable[[int, int], None] | None = None):
        self.count, self.shared, self.main, self.handle = count, shared, main, handle
        self.ctx, self.options, self.on_exit = ctx, options, on_exit
        self.workers = [Worker(WorkerLink(k)) for k in range(count)]
        self.handout: Handout | None = None
        self.lock = threading.Lock()   # the links change (restarts) on the event loop's thread
        self.stopping = False
        self.restarts = 0

    async def start(self) -> None:
        """Every worker started and ready (its metadata view loaded)."""
        await asyncio.gather(*(self._spawn(w) for w in self.workers))
        deadline = time.monotonic() + READY_SECONDS
        for w in self.workers:
            try:
                await asyncio.wait_for(w.ready.wait(), max(deadline - time.monotonic(), 0.1))
            except asyncio.TimeoutError:
                raise RuntimeError(f"worker {w.link.slot} was not ready within {READY_SECONDS:.0f} s") from None

    def serve(self, listener: socket.socket) -> None:
        """Hand the listener's connections to the workers, from now until stop()."""
        self.handout = Handout(listener, [w.link for w in self.workers], self.shared, self.lock)
        self.handout.start()

    async def barrier(self) -> None:
        """Every message each live worker sent before now, handled (the audit's flush waits on it)."""
        channels = [w.channel for w in self.workers if w.channel is not None and w.ready.is_set()]
        await asyncio.gather(*(c.call("barrier") for c in channels), return_exceptions=True)

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers if w.proc is not None and w.proc.exitcode is None]

    async def _spawn(self, w: Worker) -> None:
        parent_conn, child_conn = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent_ctl, child_ctl = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # The fork server's own pid: it is the worker's parent.
        start = WorkerStart(w.link.slot, self.count, child_conn, child_ctl, PassedFd(self.shared.fd),
                            0, self.options)
        proc = self.ctx.Process(target=_with_forkserver_parent, args=(start, self.main), daemon=False,
                                name=f"moorage-worker-{w.link.slot}")
        try:
            await asyncio.get_running_loop().run_in_executor(None, proc.start)
        finally:
            child_conn.close()
            child_ctl.close()
        w.proc = proc
        w.started_at = time.monotonic()
        w.ready = asyncio.Event()
        w.channel = await Channel.open(parent_ctl)
        with self.lock:
            w.link.sock, w.link.pid, w.link.alive = parent_conn, proc.pid, False
        w.task = asyncio.create_task(self._run(w, proc, w.channel))

    async def _run(self, w: Worker, proc: Any, channel: Channel) -> None:
        async def handle(msg: dict) -> Any:
            if msg.get("t") == "ready":
                with self.lock:
                    w.link.alive = True
                w.ready.set()
                return None
            return await self.handle(w.link.slot, msg)
        await channel.serve(handle)  # until the worker's end closes: it exited
        await asyncio.get_running_loop().run_in_executor(None, proc.join)
        with self.lock:
            w.link.alive = False
            if w.link.sock is not None:
                w.link.sock.close()
                w.link.sock = None
        channel.writer.close()
        if self.on_exit is not None:
            self.on_exit(w.link.slot, proc.pid)
        if self.stopping:
            return
        # A worker that keeps dying young (a bad setting, a broken disk) is restarted ever more
        # slowly, so the parent does not spin; one that ran a while comes back at once.
        w.quick_deaths = w.quick_deaths + 1 if time.monotonic() - w.started_at < QUICK_DEATH_SECONDS else 0
        delay = min(RESTART_MAX_SECONDS, RESTART_MIN_SECONDS * 2 ** w.quick_deaths)
        log.warning("worker exited; starting another", extra={
            "worker": w.link.slot, "pid": proc.pid, "status": proc.exitcode, "restart_in_seconds": delay})
        self.shared.reset_worker(w.link.slot)
        self.restarts += 1
        await asyncio.sleep(delay)
        if not self.stopping:
            await self._spawn(w)

    async def stop(self, drain_seconds: float) -> None:
        """Stop accepting, let every worker drain (SIGTERM), then kill what is left."""
        self.stopping = True
        if self.handout is not None:
            self.handout.stop()
        procs = [w.proc for w in self.workers if w.proc is not None and w.proc.exitcode is None]
        for p in procs:
            p.terminate()  # SIGTERM
        deadline = time.monotonic() + drain_seconds + 5.0
        loop = asyncio.get_running_loop()
        for p in procs:
            await loop.run_in_executor(None, p.join, max(deadline - time.monotonic(), 0.1))
            if p.exitcode is None:
                log.warning("worker did not drain in time; killing it", extra={"pid": p.pid})
                p.kill()
                await loop.run_in_executor(None, p.join)
        for w in self.workers:
            if w.task is not None:
                w.task.cancel()


def _with_forkserver_parent(start: WorkerStart, main: Callable[[WorkerStart], None]) -> None:
    # multiprocessing gives every child of the fork server the write end of the pipe whose EOF
    # tells the fork server that the replica's process is gone (so that children may start
    # processes of their own): a worker holding it would keep the fork server, and so itself,
    # alive after a kill -9 of the replica. Workers start no processes: close it.
    from multiprocessing import forkserver as mp_forkserver
    alive = getattr(mp_forkserver._forkserver, "_forkserver_alive_fd", None)
    if alive is not None:
        os.close(alive)
        mp_forkserver._forkserver._forkserver_alive_fd = None
    start.parent = os.getppid()  # the fork server, alive at this instant or we are orphaned already
    die_with_parent()
    check_parent(start.parent)
    main(start)


