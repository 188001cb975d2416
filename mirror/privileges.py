"""What a receiver lets a sender create: privileged objects only where the module allows them.

Whoever holds a module's secret may write its tree, but a receiver running as root would
otherwise also make whatever the sender asks for: a world-writable device node equivalent
to ``/dev/mem`` or ``/dev/sda``, a setuid-root program, a file handed to any owner.  So a
module grants these one by one (``mirror serve --allow-devices ...``, a module's
``allow_devices = true``, ``mirror receive`` flags); by default:

- device nodes (character, block) and special files (FIFOs, sockets) are refused: each is a
  failed entry of the session (exit 1), the rest goes on;
- setuid and setgid bits of regular files are removed (rsyncd's ``incoming chmod`` idea); a
  directory keeps its setgid bit (group inheritance, not a privilege);
- owners are not kept: files belong to the receiving user, and the sender is told so
  (``welcome``'s ``can_chown``), so it does not compare them.

A local ``mirror sync SRC DIR`` is no security boundary (the user could copy the files
themselves): it keeps everything, as before.
"""

from __future__ import annotations

import stat
from typing import NamedTuple

from .entry import Kind

SETID = stat.S_ISUID | stat.S_ISGID


class Privileges(NamedTuple):
    """What a module grants its senders (all False: none)."""

    devices: bool = False  # character and block device nodes
    specials: bool = False  # FIFOs and sockets
    setid: bool = False  # setuid/setgid bits on regular files
    owners: bool = False  # owners and groups as the sender has them (when the receiver is root)

    @classmethod
    def everything(cls) -> Privileges:
        return cls(True, True, True, True)

    def refusal(self, kind: int) -> str | None:
        """Why an entry of ``kind`` may not be made here (None: it may)."""
        if kind in (Kind.CHAR, Kind.BLOCK) and not self.devices:
            return "refused: this module does not accept device nodes (allow_devices)"
        if kind in (Kind.FIFO, Kind.SOCKET) and not self.specials:
            return "refused: this module does not accept FIFOs or sockets (allow_specials)"
        return None

    def file_mode(self, mode: int) -> int:
        """A regular file's permissions as this module keeps them."""
        return mode if self.setid else mode & ~SETID

    def describe(self) -> str:
        granted = [name for name in self._fields if getattr(self, name)]
        return ", ".join(granted) if granted else "none"
