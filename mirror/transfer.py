"""``mirror.sync(src, dst, **options)``: mirror a tree to a local directory or a receiver.

Destinations:

- ``/path/to/replica``: a local sync (``mirror.localsync``): both trees scanned here, the
  differences planned and written straight to the replica, no protocol;
- ``mirror://HOST:PORT/MODULE[/SUBPATH]``: a ``mirror serve`` server over TCP;
- ``HOST:PATH``: ``mirror receive PATH`` started on HOST through a remote shell
  (``rsh="ssh -T"``), speaking the protocol over its stdin and stdout.

The result says what changed, what failed and how many bytes crossed; the exit code it
carries follows the CLI's: 0 done, 1 partial (some files failed), 2 error, 25 deletions refused.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from typing import NamedTuple

from .errors import (
    ConnectError,
    ConnectTimeout,
    MirrorError,
    SourceGuardError,
    StaleEpochError,
    UsageError,
    display_path,
    fs_path,
    os_error_message,
)
from .exclude import pattern_problem
from .overlap import local_replica_problem
from .records import DEFAULT_CONTIMEOUT, DEFAULT_TIMEOUT, SenderOptions, SyncResult
from .treescan import replica_scan, source_scan, stop_scans

# The sender, the receiver and the wire protocol are imported when a connection opens:
# a sync has its scans running by then (see Connection.open).

DEFAULT_PORT = 8730
_URL = re.compile(r"^mirror://(?P<host>\[[^\]]+\]|[^:/]+)(?::(?P<port>\d+))?/(?P<module>[^/]+)(?:/(?P<sub>.*))?$")


class Destination(NamedTuple):
    kind: str  # local | server | rsh
    path: bytes = b""
    host: str = ""
    port: int = DEFAULT_PORT
    module: str = ""
    subpath: bytes = b""


def parse_destination(text: str | bytes) -> Destination:
    raw = fs_path(text)
    decoded = raw.decode("utf-8", "surrogateescape")
    if decoded.startswith("mirror://"):
        m = _URL.match(decoded)
        if not m:
            raise UsageError(f"bad destination {decoded!r}: expected mirror://HOST[:PORT]/MODULE[/SUBPATH]")
        sub = (m.group("sub") or "").strip("/").encode("utf-8", "surrogateescape")
        return Destination("server", host=m.group("host").strip("[]"), port=int(m.group("port") or DEFAULT_PORT),
                           module=m.group("module"), subpath=sub)  # fmt: skip
    head, sep, tail = decoded.partition(":")
    if sep and head and "/" not in head:
        return Destination("rsh", host=head, path=tail.encode("utf-8", "surrogateescape") or b".")
    return Destination("local", path=raw)


def sync(src, dst, **options) -> SyncResult:
    """Make ``dst`` a verified copy of the tree ``src``; see the module docstring, and README's
    "Library API" for the options.

    Raises ``MirrorError`` subclasses for what ends the job (``LockedError``,
    ``StaleEpochError``, ``AuthError``, ``SourceGuardError``: a deleting sync from a source
    that is not the tree the replica mirrors, ...); files that could not be sent or written are
    reported in the result (``exit_code`` 1) while the rest is mirrored.
    """
    journal = options.pop("journal", None)  # what the sync covers of the source's journal (Connection.session)
    connection = Connection(src, dst, **options)
    with connection.open(whole_tree=True):
        return connection.session(journal=journal)


# TCP keepalive of a connection to a server (idle s, interval s, probes): a live daemon's
# connection idles between changes; a receiver that lost power is noticed within about 6 s,
# one that came back (a reboot, a new disk) at the first probe, which it resets.
KEEPALIVE = (2, 1, 3)


class Connection:
    """A sender's connection to one destination: one handshake, then any number of sessions.

    ``sync()`` uses it for one session; the live daemon keeps it open and runs a session
    per batch of changes (``session(scope, renames)``).
    """

    def __init__(self, src, dst, *, excludes=(), secret: bytes | None = None, secret_file: str | None = None,
                 lock_file=None, dst_lock_file=None, dst_require_mount: bool | None = None, state_dir=None, bwlimit: int | None = None, rsh: str = "ssh -T",
                 remote_command: str = "mirror", remote_options=(), delta_threshold: int | None = None,
                 epoch: int | None = None, on_change=None, on_progress=None,
                 timeout: float | None = DEFAULT_TIMEOUT, contimeout: float | None = DEFAULT_CONTIMEOUT,
                 **options):  # fmt: skip
        """``options``: the fields of ``records.SenderOptions`` passed as they are (``delete``,
        ``checksum``, ``dry_run``, ``fsync``, ``cancel``, ``keep_changes``, ``max_delete``,
        ``allow_mass_delete``); the others are checked or converted here."""
        self.src = fs_path(src)
        try:
            is_dir = stat.S_ISDIR(os.stat(self.src).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            is_dir = False
        except OSError as exc:  # there, but unreadable (EIO): not "not a directory"
            raise MirrorError(f"source {os_error_message(exc, self.src)}") from None
        if not is_dir:
            raise UsageError(f"source {self.src.decode(errors='replace')!r} is not a directory")
        if secret is None and secret_file:
            from .secretfile import read_secret_file  # the one rule for every secret file

            secret = read_secret_file(secret_file)
        self.dest = parse_destination(dst)
        self._dst_text = fs_path(dst)  # a remote replica's name in the source's records, as written
        for name, value in (("timeout", timeout), ("contimeout", contimeout)):
            if value is not None and value < 0:
                raise UsageError(f"--{name} must be 0 (none) or more seconds, got {value}")
        if problem := pattern_problem([fs_path(p) for p in excludes]):
            raise UsageError(f"excludes: {problem}")
        locks = [fs_path(lock) for lock in (lock_file, dst_lock_file) if lock]
        if self.dest.kind == "local" and (problem := local_replica_problem(
                self.src, self.dest.path, excludes, fs_path(state_dir) if state_dir else None, locks)):
            raise UsageError(problem)
        if self.dest.kind == "local" and os.path.lexists(self.dest.path) and not os.path.isdir(self.dest.path):
            raise UsageError(f"the replica {display_path(self.dest.path)} is not a directory")
        timeout = timeout or None  # 0: none, as rsync's
        # A network receiver says it is alive a few times per timeout while it works on its own
        # (a long commit, deletions), so only a stopped, hung or vanished one times out.
        keepalive = timeout / 3 if timeout and self.dest.kind != "local" else None
        self.options = SenderOptions(
            excludes=tuple(fs_path(p) for p in excludes), lock_file=fs_path(lock_file) if lock_file else None,
            state_dir=fs_path(state_dir) if state_dir else None, secret=secret, keepalive=keepalive,
            **({"delta_threshold": delta_threshold} if delta_threshold is not None else {}), **options,
        )  # fmt: skip
        self.epoch = epoch
        self._dst_lock_file = fs_path(dst_lock_file) if dst_lock_file else None
        if dst_require_mount and self.dest.kind != "local":
            raise UsageError("--dst-require-mount is for a local destination (a server's module says require_mount, "
                             "mirror receive --require-mount)")  # fmt: skip
        self._dst_require_mount = dst_require_mount
        self._bwlimit = bwlimit
        self._connect_args = (bwlimit, rsh, remote_command, tuple(remote_options), timeout, contimeout or None)
        self._callbacks = {"on_change": on_change, "on_progress": on_progress}
        self.sender = None  # a receiver's, over the protocol
        self.local = None  # a local replica's, written directly
        self.welcome: dict = {}
        self._held = contextlib.ExitStack()  # what the open connection holds: let go by close()

    def _refuse_foreign_replica(self) -> None:
        """A deleting connection's first session is a whole tree's: a local directory that
        is no replica yet and shares nothing with the source is refused before anything is
        made there (``guard.foreign_replica_problem``)."""
        from .exclude import make_excluder
        from .guard import foreign_replica_problem, root_names
        from .statedir import resolve_state_dir

        excluder = make_excluder(self.options.excludes)
        keep = excluder.excluded if excluder is not None else None
        if problem := foreign_replica_problem(root_names(self.src, keep), f"the source {display_path(self.src)}",
                                              self.dest.path, resolve_state_dir(self.dest.path, None), keep):  # fmt: skip
            raise SourceGuardError(problem)

    def open(self, *, whole_tree: bool = False) -> Connection:
        """Connect and shake hands (a local replica: take its writer lock).  ``whole_tree``:
        the first session will be a whole-tree one (``sync()``): its scans start first, so
        they run while the rest of the code loads and the connection is made.  The
        source's always; a local destination's too, under the replica's writer lock."""
        from .startup import reserve_descriptors
        from .statedir import check_root, resolve_state_dir

        reserve_descriptors()  # before the first thread starts
        check_root(self.src)  # its state dir is read (the replica's disk) before any session
        local = self.dest.kind == "local"
        if local:
            from .apply import ModuleConfig
            from .atomicfile import make_dirs
            from .replicadisk import check_local_replica

            # Before anything is made there, on the disk under an unmounted one.
            check_local_replica(resolve_state_dir(self.src, self.options.state_dir), self.dest.path,
                               self._dst_require_mount, record=not self.options.dry_run)  # fmt: skip
            if self.options.delete and not self.options.allow_mass_delete:
                self._refuse_foreign_replica()
            make_dirs(os.path.abspath(self.dest.path))
            check_root(self.dest.path)  # before the writer lock, which would write into a user's .mirror
        # Each lock, scan, process and stream is let go of as soon as it is held, should
        # anything after it fail; once open, by close().
        with contextlib.ExitStack() as held:
            if local and not self.options.dry_run:  # a dry run writes nothing: no lock
                from .writerlock import WriterLock

                state_dir = resolve_state_dir(self.dest.path, None)
                held.callback(WriterLock.take(state_dir, self.dest.path, "local", "the destination").release)
            # The source's scan, and a local destination's (a remote receiver scans its own);
            # a session that takes them stops them too, which is harmless.
            scans = [None, None]
            held.callback(stop_scans, scans)
            if whole_tree:
                scans[0] = source_scan(self.src, self.options)
                if local:
                    scans[1] = replica_scan(self.dest.path, self.options)
            if local:
                from .localsync import LocalSync
                from .privileges import Privileges

                # A local replica is no security boundary (the user could copy the files
                # themselves): devices, special files, set-id bits and owners are all kept.
                module = ModuleConfig(name="", path=self.dest.path, privileges=Privileges.everything(),
                                      lock_file=self._dst_lock_file, require_mount=bool(self._dst_require_mount))  # fmt: skip
                self.local = LocalSync(self.src, module, self.options, scans=scans, bwlimit=self._bwlimit,
                                       **self._callbacks)  # fmt: skip
            else:
                from .sender import Sender

                transport = _connect(self.dest, held, *self._connect_args)
                sender = Sender(self.src, transport, self.options, module=self.dest.module, subpath=self.dest.subpath,
                                source_scan=scans[0], idle_frames=self.dest.kind == "rsh", **self._callbacks)  # fmt: skip
                self.welcome = sender.handshake()
                if self.welcome.get("disk") is not None:  # the mount point the receiver's replica lies under
                    from .replicadisk import check_replica_disk

                    check_replica_disk(resolve_state_dir(self.src, self.options.state_dir), self._dst_text,
                                       self.welcome["disk"], self._dst_require_mount, record=not self.options.dry_run,
                                       where=f" on {self.dest.host}")  # fmt: skip
                self.sender = sender
            self._held = held.pop_all()
        return self

    def session(self, scope=None, renames=(), journal: dict | None = None) -> SyncResult:
        """Bring the destination up to date (all of it, or ``scope``); see ``Sender.run``
        (``journal``: what the session covers of the source's journal, remote only)."""
        if self.sender is None and self.local is None:
            raise UsageError("connection is not open")
        epoch = self.epoch
        if epoch is None:
            from .epoch import read_epoch
            from .statedir import resolve_state_dir

            epoch = read_epoch(resolve_state_dir(self.src, self.options.state_dir))
        try:
            if self.local is not None:
                return self.local.session(epoch, scope=scope, renames=renames)
            return self.sender.run(self.welcome, epoch, scope=scope, renames=renames, journal=journal)
        except StaleEpochError as exc:
            exc.sent_epoch = epoch
            raise

    def hung_up(self) -> bool:
        """Between sessions: whether the receiver's end of the connection is gone."""
        return self.sender is not None and self.sender.t.hung_up()

    def idle(self) -> None:
        """Between sessions, often: the receiver hears that we are still here (``Sender.idle``)."""
        if self.sender is not None:
            self.sender.idle()

    def close(self) -> None:
        self.sender = self.local = None
        self._held.close()

    def __enter__(self) -> Connection:
        return self if (self.sender is not None or self.local is not None) else self.open()

    def __exit__(self, *exc) -> None:
        self.close()


def _connect(dest: Destination, held: contextlib.ExitStack, bwlimit, rsh, remote_command, remote_options, timeout,
             contimeout):  # fmt: skip
    """A transport to ``dest``'s receiver; its clean-up (and the remote shell's) goes on ``held``."""
    from .protocol import StreamTransport, keepalive

    streams = {"bwlimit": bwlimit, "timeout_hint": f" after {timeout:g} s (--timeout)" if timeout else ""}
    if dest.kind == "server":
        import socket

        where = f"{dest.host}:{dest.port}"
        try:
            sock = socket.create_connection((dest.host, dest.port), timeout=contimeout)
        except TimeoutError:
            raise ConnectTimeout(f"cannot connect to {where}: no answer within {contimeout:g} s (--contimeout)") from None
        except OSError as exc:
            raise ConnectError(f"cannot connect to {where}: {exc.strerror or exc}") from None
        held.callback(sock.close)
        sock.settimeout(timeout)  # every wait for the receiver, reading or writing
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        keepalive(sock, *KEEPALIVE)
        rfile, wfile = sock.makefile("rb", buffering=1 << 20), sock.makefile("wb", buffering=1 << 20)
        transport = StreamTransport(rfile, wfile, on_close=lambda: _hang_up(sock, timeout),
                                    on_abort=lambda: sock.shutdown(socket.SHUT_RDWR),
                                    peer=f"the receiver at {where}", **streams)  # fmt: skip
    else:
        import io
        import shlex
        import subprocess

        # ssh joins its arguments into one line for the remote shell: the path must be quoted,
        # or a space breaks it and shell syntax in it runs over there.
        options = "".join(" " + shlex.quote(o) for o in remote_options)
        remote_line = f"{remote_command} receive{options} -- {shlex.quote(os.fsdecode(dest.path))}"
        argv = shlex.split(rsh)
        if argv and os.path.basename(argv[0]) == "ssh":
            # After the user's options, which ssh takes first: a vanished host ends ssh (and
            # the connection) within seconds, not at TCP's keepalive hours later.
            argv += ["-o", f"ServerAliveInterval={KEEPALIVE[0]}", "-o", f"ServerAliveCountMax={KEEPALIVE[2]}"]
            if contimeout:
                argv += ["-o", f"ConnectTimeout={max(1, round(contimeout))}"]
        try:
            proc = subprocess.Popen(argv + [dest.host, remote_line], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, bufsize=0)  # fmt: skip
        except OSError as exc:
            raise ConnectError(f"cannot start the remote shell {rsh!r} for {dest.host}: "
                               f"{exc.strerror or exc}") from None  # fmt: skip
        held.callback(_reap, proc)
        # Frames are small and many: buffered here, flushed when the protocol says so.
        transport = StreamTransport(proc.stdout, io.BufferedWriter(proc.stdin, 1 << 20), read_timeout=timeout,
                                    peer=f"the receiver on {dest.host}", **streams)  # fmt: skip
    held.callback(transport.close)
    return transport


def _reap(proc) -> None:
    """Wait for the remote shell (its end of the pipes closed) to exit; kill it if it will not."""
    import subprocess

    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _hang_up(sock, timeout: float | None) -> None:
    """Close our side, then wait (at most ``timeout``, 10 s) for the server to close its own:
    it lets go of the module's writer lock first, so a sync that has returned leaves the
    module free for the next writer."""
    import socket

    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(min(timeout or 10.0, 10.0))
        while sock.recv(1 << 16):
            pass
    except OSError:
        pass
    finally:
        sock.close()
