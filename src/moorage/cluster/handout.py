"""Connections from the replica's process to its workers: accepted once, handed over as descriptors.

The parent binds the API's listening socket and accepts on it in a thread of
its own; each connection goes, as a file descriptor over a socketpair
(SCM_RIGHTS), to the worker with the fewest open connections. Measured on
2 cores (the plan has the tables): SO_REUSEPORT hashes connections without
regard to load, so a client with three keep-alive connections lands on one
worker a quarter of the time, and a worker's death resets the connections
queued on its socket; the hand-off is even every time and loses nothing, for
~100 µs of parent CPU per new connection and nothing per request.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

from moorage.cluster.shared import Shared


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
