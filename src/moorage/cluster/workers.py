"""A replica's worker processes: started from a fork server, restarted when they die, stopped in order.

With `workers` above 1 the replica's process (the parent) runs etcd and the
background tasks and accepts the API's connections (cluster/handout.py);
N workers serve them. This module is the parent's supervision of those
processes and what each one does before the replica's code runs in it; they
share a block of memory (cluster/shared.py) and talk over a control channel
(cluster/channel.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from moorage import backoff
from moorage.cluster import addresses
from moorage.cluster.channel import Channel
from moorage.cluster.handout import Handout, WorkerLink
from moorage.cluster.index_relay import FOLLOW
from moorage.cluster.replica_config import StartError
from moorage.cluster.shared import Shared

log = logging.getLogger(__name__)

MAX_WORKERS = 64
DEFAULT_CAP = 8
# Relayed index batches a worker has not read yet, at most: one stuck that long is killed (and
# restarted, loading its view afresh) before the parent's memory pays for it.
MAX_RELAY_BACKLOG = 64 << 20

_PR_SET_PDEATHSIG = 1


def default_workers() -> int:
    """The machine's cores, at most DEFAULT_CAP: each worker holds its own index of the metadata."""
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
    following: bool = False             # gets the parent's index batches (cluster/index_relay.py)


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

    def serve(self, host: str, port: int) -> None:
        """Listen on the API's address and hand its connections to the workers, from now until stop()."""
        try:
            listener = addresses.listen_socket(host, port)
        except OSError as e:
            raise StartError(f"the listen address {host}:{port} {addresses.in_use(e)}") from None
        self.handout = Handout(listener, [w.link for w in self.workers], self.shared, self.lock)
        self.handout.start()

    async def barrier(self) -> None:
        """Every message each live worker sent before now, handled (the audit's flush waits on it)."""
        channels = [w.channel for w in self.workers if w.channel is not None and w.ready.is_set()]
        await asyncio.gather(*(c.call("barrier") for c in channels), return_exceptions=True)

    def tell(self, message: dict) -> None:
        """A message to every ready worker; one that is going misses it (its successor is told
        whatever is told next)."""
        for w in self.workers:
            if w.channel is not None and w.ready.is_set():
                try:
                    w.channel.send(message)
                except (ConnectionError, RuntimeError):
                    pass

    def relay(self, message: dict) -> None:
        """An index batch to every worker that follows the parent's watch (cluster/index_relay.py)."""
        for w in self.workers:
            if not w.following or w.channel is None:
                continue
            try:
                w.channel.send(message)
            except (ConnectionError, RuntimeError):
                continue
            backlog = w.channel.writer.transport.get_write_buffer_size()
            if backlog > MAX_RELAY_BACKLOG and w.proc is not None:
                log.warning("worker is not reading its index batches; killing it", extra={
                    "worker": w.link.slot, "pid": w.proc.pid, "backlog_bytes": backlog})
                w.following = False
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.proc.pid, signal.SIGKILL)

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
        w.following = False
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
            if msg.get("t") == "call" and msg.get("op") == FOLLOW:
                # On the list before the answer: the worker loads its view only once it has it.
                w.following = True
                return None
            return await self.handle(w.link.slot, msg)
        await channel.serve(handle)  # until the worker's end closes: it exited
        w.following = False
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
        delay = backoff.nth(w.quick_deaths + 1, RESTART_MIN_SECONDS, RESTART_MAX_SECONDS)
        log.warning("worker exited; starting another", extra={
            "worker": w.link.slot, "pid": proc.pid, "status": proc.exitcode, "restart_in_seconds": round(delay, 2)})
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
