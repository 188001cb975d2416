"""``mirror serve``: receivers for many clients at once, one writer per module at a time.

Each connection gets a thread running a ``Receiver``.  A connection that breaks the
protocol (garbage, a truncated or oversized frame, a failed challenge) is closed; the
others go on.  The one-writer rule is an ``flock`` in the module's state dir, so it also
holds against ``mirror receive`` started over ssh on the same tree.

Anyone who reaches the port can open connections, so unauthenticated ones must never keep
the primary out:

- a connection has ``handshake_deadline`` seconds in all (10 s) to prove it knows the
  secret, however slowly it sends (the deadline is not restarted by each byte), and reads
  no frame over ``PREAUTH_MAX_FRAME`` (8 KiB) until then;
- authenticated connections have their own slots (``max_connections``); connections still in
  their handshake have others (``max_startups``), and when those are full the oldest is
  dropped to make room (OpenSSH's MaxStartups idea, without the randomness): an attacker
  holding handshakes open is pushed out by every new connection, while the real sender
  completes its handshake in a few milliseconds.  Per-address limits would not help: an
  attacker may share the primary's address (NAT, the same host).
"""

from __future__ import annotations

import collections
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Mapping

from .apply import ModuleConfig, remember_replica_disks
from .errors import MirrorError
from .protocol import StreamTransport, keepalive
from .receiver import Receiver

log = logging.getLogger(__name__)


HANDSHAKE_DEADLINE = 10.0
SESSION_TIMEOUT = 600.0
MAX_STARTUPS = 64
_DROP_LOG_SECONDS = 10.0


class _Startups:
    """The connections still in their handshake, oldest first, at most ``limit``."""

    def __init__(self, limit: int):
        self.limit = limit
        self._lock = threading.Lock()
        self._open: collections.OrderedDict[socket.socket, float] = collections.OrderedDict()
        self.dropped = 0
        self._logged = 0.0

    def add(self, sock: socket.socket) -> float:
        """Register a new connection (dropping the oldest when full); its start time."""
        evicted = None
        now = time.monotonic()
        with self._lock:
            if len(self._open) >= self.limit:
                evicted, _ = self._open.popitem(last=False)
                self.dropped += 1
                try:
                    # Under the lock: its thread cannot have closed it (it discards it first).
                    evicted.shutdown(socket.SHUT_RDWR)  # wakes that thread, which closes it
                except OSError:
                    pass
            self._open[sock] = now
            dropped, log_now = self.dropped, now - self._logged >= _DROP_LOG_SECONDS
            if evicted is not None and log_now:
                self._logged = now
        if evicted is not None:
            if log_now:
                log.warning("handshake slots full (%d): dropped the oldest unauthenticated connection "
                            "(%d so far)", self.limit, dropped)  # fmt: skip
        return now

    def discard(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.pop(sock, None)

    def started(self, sock: socket.socket) -> float | None:
        with self._lock:
            return self._open.get(sock)


class MirrorServer(socketserver.ThreadingTCPServer):
    """``timeout``: seconds a client may stay silent in a session (default 600 s; it also
    shortens the handshake deadline when smaller).  Between the sessions of a persistent
    connection (the live daemon's) there is no limit, but TCP keepalive finds a peer that
    vanished within about two minutes and frees the module's writer lock.
    ``max_connections`` authenticated clients at once, ``max_startups`` in their handshake."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # a flood of connections must not fill the accept queue

    def __init__(self, listen: tuple[str, int], modules: dict[str, ModuleConfig], max_connections: int = 64,
                 timeout: float | None = None, max_startups: int = MAX_STARTUPS,
                 handshake_deadline: float = HANDSHAKE_DEADLINE):  # fmt: skip
        self.modules = modules
        remember_replica_disks(modules.values())
        self.io_timeout = timeout
        self.handshake_deadline = min(handshake_deadline, timeout) if timeout else handshake_deadline
        self._slots = threading.BoundedSemaphore(max_connections)
        self.startups = _Startups(max_startups)
        self.address_family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
        super().__init__(listen, _Handler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def reload(self, modules: dict[str, ModuleConfig], timeout: float | None) -> None:
        """Serve ``modules`` from now on (``mirror serve`` on SIGHUP).  A new connection sees
        them at once; a session already running finishes on the configuration it started
        with, and a connection whose module was changed or removed is refused its next
        session (the client reconnects under the new configuration)."""
        self.modules = dict(modules)  # replaced whole: a handshake sees the old set or the new
        remember_replica_disks(self.modules.values())
        self.io_timeout = timeout

    def process_request(self, request, client_address):
        self.startups.add(request)  # before its thread exists: a full table drops the oldest now
        super().process_request(request, client_address)

    def admit(self, sock: socket.socket) -> None:
        """The connection proved it knows the secret: from a handshake slot to a session slot."""
        self.startups.discard(sock)
        if not self._slots.acquire(blocking=False):
            raise MirrorError("too many connections; try again later")

    def release(self) -> None:
        self._slots.release()


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        server: MirrorServer = self.server
        started = server.startups.started(sock)
        admitted = False
        try:
            if started is None:
                return  # dropped already, to make room for a newer connection
            sock.settimeout(server.handshake_deadline)  # its writes too, until it is admitted
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            keepalive(sock)
            peer = f"{self.client_address[0]}:{self.client_address[1]}"
            # A client that stops reading is dropped at once (no thread waits on it any longer,
            # so the writer lock goes); one silent too long is told why first.
            transport = StreamTransport(sock.makefile("rb", buffering=1 << 20), sock.makefile("wb", buffering=1 << 20),
                                        peer=f"client {peer}", on_abort=lambda: sock.shutdown(socket.SHUT_RDWR),
                                        abort_when_silent=False)  # fmt: skip
            transport.set_deadline(started + server.handshake_deadline, sock.settimeout)

            def admit():
                nonlocal admitted
                server.admit(sock)
                admitted = True
                transport.set_deadline(None)

            try:
                receiver = Receiver(transport, _CurrentModules(server), peer=peer, admit=admit,
                                    timeouts=(sock.settimeout, server.io_timeout or SESSION_TIMEOUT),
                                    hang_up=lambda: sock.shutdown(socket.SHUT_RDWR))  # fmt: skip
                receiver.serve()
                log.info("%s: done (%d sessions)", peer, receiver.sessions)
            except MirrorError as exc:
                (log.warning if admitted else log.info)("%s: connection closed: %s", peer, exc)
            except OSError as exc:
                log.warning("%s: connection lost: %s", peer, exc)
        finally:
            server.startups.discard(sock)
            if admitted:
                server.release()


class _CurrentModules(Mapping):
    """The server's modules as they are at each lookup, across reloads."""

    def __init__(self, server: MirrorServer):
        self._server = server

    def __getitem__(self, name: str) -> ModuleConfig:
        return self._server.modules[name]

    def __iter__(self):
        return iter(self._server.modules)

    def __len__(self) -> int:
        return len(self._server.modules)
