"""``mirror serve``: receivers for many clients at once, one writer per module at a time.

Each connection gets a thread running a ``Receiver``.  A connection that breaks the
protocol (garbage, a truncated or oversized frame, a failed challenge) is closed; the
others go on.  The one-writer rule is an ``flock`` in the module's state dir, so it also
holds against ``mirror receive`` started over ssh on the same tree.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
from collections.abc import Mapping

from . import protocol as P
from .errors import MirrorError
from .protocol import StreamTransport
from .receiver import ModuleConfig, Receiver

log = logging.getLogger(__name__)


HANDSHAKE_TIMEOUT = 30.0
SESSION_TIMEOUT = 600.0


class MirrorServer(socketserver.ThreadingTCPServer):
    """``timeout``: seconds a client may stay silent during the handshake or a session
    (default 30 s for the handshake, 600 s in a session).  Between the sessions of a
    persistent connection (the live daemon's) there is no limit, but TCP keepalive finds
    a peer that vanished within about two minutes and frees the module's writer lock."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, listen: tuple[str, int], modules: dict[str, ModuleConfig], max_connections: int = 64,
                 timeout: float | None = None):  # fmt: skip
        self.modules = modules
        self.io_timeout = timeout
        self._slots = threading.BoundedSemaphore(max_connections)
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
        self.io_timeout = timeout

    def process_request_thread(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            log.warning("refusing %s: too many connections", client_address[0])
            try:
                request.settimeout(2)
                request.sendall(P.encode([P.ERROR, "MirrorError", 2, "too many connections; try again later"]))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        keepalive(sock)
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        timeout = self.server.io_timeout
        handshake = min(timeout, HANDSHAKE_TIMEOUT) if timeout else HANDSHAKE_TIMEOUT
        session = timeout or SESSION_TIMEOUT
        sock.settimeout(handshake)
        transport = StreamTransport(sock.makefile("rb", buffering=1 << 20), sock.makefile("wb", buffering=1 << 20))
        try:
            receiver = Receiver(transport, _CurrentModules(self.server), peer=peer,
                                timeouts=(sock.settimeout, session))  # fmt: skip
            receiver.serve()
            log.info("%s: done (%d sessions)", peer, receiver.sessions)
        except MirrorError as exc:
            log.warning("%s: connection closed: %s", peer, exc)
        except OSError as exc:
            log.warning("%s: connection lost: %s", peer, exc)


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


def keepalive(sock: socket.socket, idle: int = 60, interval: int = 10, count: int = 6) -> None:
    """TCP keepalive: a peer that vanished (power loss, half-open connection) is noticed."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
