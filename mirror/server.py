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

from .errors import MirrorError
from .protocol import StreamTransport
from .receiver import ModuleConfig, Receiver

log = logging.getLogger(__name__)


class MirrorServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, listen: tuple[str, int], modules: dict[str, ModuleConfig], max_connections: int = 64):
        self.modules = modules
        self._slots = threading.BoundedSemaphore(max_connections)
        self.address_family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
        super().__init__(listen, _Handler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def verify_request(self, request, client_address) -> bool:
        if not self._slots.acquire(blocking=False):
            log.warning("refusing %s: too many connections", client_address[0])
            return False
        return True

    def shutdown_request(self, request) -> None:
        super().shutdown_request(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        transport = StreamTransport(sock.makefile("rb", buffering=1 << 20), sock.makefile("wb", buffering=1 << 20))
        try:
            receiver = Receiver(transport, self.server.modules, peer=peer)
            receiver.serve()
            log.info("%s: done (%d sessions)", peer, receiver.sessions)
        except MirrorError as exc:
            log.warning("%s: connection closed: %s", peer, exc)
        except OSError as exc:
            log.warning("%s: connection lost: %s", peer, exc)
