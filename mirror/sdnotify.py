"""Telling systemd how a ``Type=notify`` service is doing: the sd_notify protocol.

systemd passes the address of a datagram socket in ``$NOTIFY_SOCKET``; the service sends it
newline-separated ``KEY=VALUE`` lines: ``READY=1`` once it really serves (systemd holds
back the units ordered after it until then), ``RELOADING=1`` and ``READY=1`` around a
reload, ``STOPPING=1`` when it shuts down, ``STATUS=...`` for ``systemctl status``.  The
protocol is a handful of lines (systemd documents it as a stable interface), so it is
spoken here rather than through a library that would have to build against libsystemd.

Without ``$NOTIFY_SOCKET`` (not under systemd, or ``Type=simple``) every call does nothing.
The variable is taken out of the environment when read, so that processes this one starts
(hawrap's services and mirror processes) cannot report readiness in its name.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)

ENV = "NOTIFY_SOCKET"


class SystemdNotifier:
    """Sends state changes to systemd's notification socket at ``address`` (a path, or
    ``@name`` for an abstract socket); ``None`` makes it a no-op."""

    def __init__(self, address: str | None):
        if address and not address.startswith(("/", "@")):
            log.warning("$%s=%r is not a unix socket address: not notifying systemd", ENV, address)
            address = None
        self.address = address
        self._warned = False

    @classmethod
    def from_environment(cls) -> SystemdNotifier:
        """The notifier for this process; removes ``$NOTIFY_SOCKET`` from the environment."""
        return cls(os.environ.pop(ENV, None) or None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=VALUE`` fields (keys upper-cased); True if systemd's socket took them."""
        if self.address is None:
            return False
        # One field per line: a newline inside a value would start a bogus field.
        text = "".join(f"{key.upper()}={str(value).replace(chr(10), ' ')}\n" for key, value in fields.items())
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(text.encode(), target)
            return True
        except OSError as exc:
            # Never fatal: the service works the same; only systemd's view of it is late.
            if not self._warned:
                log.warning("cannot notify systemd at %s: %s", self.address, exc.strerror or exc)
                self._warned = True
            return False

    def ready(self, status: str | None = None) -> bool:
        return self.send(ready=1, **({"status": status} if status else {}))

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) match the reload to its request.
        return self.send(reloading=1, monotonic_usec=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> bool:
        return self.send(stopping=1)

    def status(self, text: str) -> bool:
        return self.send(status=text)
