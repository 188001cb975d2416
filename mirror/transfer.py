"""``mirror.sync(src, dst, **options)``: mirror a tree to a local directory or a receiver.

Destinations:

- ``/path/to/replica``: local mode, the same planner and writer in one process, the two
  talking through an in-process transport (no sockets, no encoding; within a session the
  receiver's handler runs in the sender's thread, see ``LocalTransport.handle_in_sender``);
- ``mirror://HOST:PORT/MODULE[/SUBPATH]``: a ``mirror serve`` receiver over TCP;
- ``HOST:PATH``: ``mirror receive PATH`` started on HOST through a remote shell
  (``rsh="ssh -T"``), speaking the protocol over its stdin and stdout.

The result says what changed, what failed and how many bytes crossed; the exit code it
carries follows the CLI's: 0 done, 1 partial (some files failed), 2 error, 25 deletions refused.
"""

from __future__ import annotations

import os
import re
import threading
from typing import TYPE_CHECKING, NamedTuple

from .errors import (
    EXIT_DIFFERENT,
    EXIT_GUARD,
    EXIT_OK,
    ConnectError,
    ConnectTimeout,
    MirrorError,
    UsageError,
    fs_path,
)
from .syncoptions import DEFAULT_CONTIMEOUT, DEFAULT_TIMEOUT, LOCAL_DELTA_THRESHOLD, SenderOptions

if TYPE_CHECKING:
    from .sender import TransferStats

# The sender, the receiver and the wire protocol are imported when a connection opens:
# a sync has its scans running by then (see Connection.open).

DEFAULT_PORT = 8730
_URL = re.compile(r"^mirror://(?P<host>\[[^\]]+\]|[^:/]+)(?::(?P<port>\d+))?/(?P<module>[^/]+)(?:/(?P<sub>.*))?$")


class SyncResult:
    """What a sync did.  ``exit_code``: 0 done, 1 partial (see ``failed``/``problems``), 25
    deletions refused (see ``deletions_refused``)."""

    def __init__(self, changes=None, failed=None, problems=None, stats: TransferStats | None = None,
                 receiver: dict | None = None, dry_run: bool = False):  # fmt: skip
        self.changes: list = changes if changes is not None else []
        # Why the replica's deletion guard did not delete (mirror.guard); None: it did, or none were asked.
        self.deletions_refused: str | None = (receiver or {}).get("deletions_refused") or None
        self.failed: list[tuple[bytes, str]] = failed if failed is not None else []
        self.problems: list = problems if problems is not None else []
        self.stats: TransferStats = stats if stats is not None else _sender().TransferStats()
        self.receiver: dict = receiver if receiver is not None else {}
        self.dry_run = dry_run

    def __repr__(self) -> str:
        return (f"SyncResult(exit_code={self.exit_code}, changes={len(self.changes)}, failed={len(self.failed)}, "
                f"problems={len(self.problems)}, dry_run={self.dry_run})")  # fmt: skip

    @property
    def exit_code(self) -> int:
        if self.deletions_refused:
            return EXIT_GUARD
        return EXIT_DIFFERENT if (self.failed or self.problems) else EXIT_OK

    @property
    def ok(self) -> bool:
        return self.exit_code == EXIT_OK


class Destination(NamedTuple):
    kind: str  # local | daemon | rsh
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
        return Destination("daemon", host=m.group("host").strip("[]"), port=int(m.group("port") or DEFAULT_PORT),
                           module=m.group("module"), subpath=sub)  # fmt: skip
    head, sep, tail = decoded.partition(":")
    if sep and head and "/" not in head:
        return Destination("rsh", host=head, path=tail.encode("utf-8", "surrogateescape") or b".")
    return Destination("local", path=raw)


def sync(src, dst, **options) -> SyncResult:
    """Make ``dst`` a verified copy of the tree ``src``; see the module docstring.

    Options: ``delete``, ``checksum``, ``dry_run``, ``excludes``, ``secret`` or
    ``secret_file``, ``lock_file`` (this node's mirroring lock), ``dst_lock_file`` (local
    destination only), ``state_dir``, ``bwlimit`` (bytes/s), ``rsh``, ``remote_command``,
    ``remote_options`` (for ``HOST:PATH``: options of the remote ``mirror receive``, e.g.
    ``["--keep-owners"]``),
    ``delta_threshold`` (files at least this large on both sides go as deltas; default 256 KiB
    to a receiver, never to a local directory), ``fsync``, ``epoch``, ``on_change(change)``,
    ``on_progress(bytes)``,
    ``keep_changes`` (default True; False leaves ``result.changes`` empty, which saves a few
    hundred bytes per changed entry: a first sync of a big tree changes every entry),
    ``timeout`` (seconds a receiver may stay silent, default 120; 0 or None: no limit) and
    ``contimeout`` (seconds to connect, default 30): ``PeerTimeout`` (exit 30),
    ``ConnectTimeout`` (exit 35); ``max_delete`` and ``allow_mass_delete`` (the deletion guard, ``mirror.guard``: a sync
    that would delete every entry of a non-empty replica, or more than ``max_delete``
    entries, deletes nothing and says why in ``result.deletions_refused``, exit code 25).

    Raises ``MirrorError`` subclasses for what ends the job (``LockedError``,
    ``StaleEpochError``, ``AuthError``, ``SourceGuardError``: a deleting sync from a source
    that is not the tree the replica mirrors, ...); files that could not be sent or written are
    reported in the result (``exit_code`` 1) while the rest is mirrored.
    """
    connection = Connection(src, dst, **options)
    with connection.open(whole_tree=True):
        return connection.session()


class Connection:
    """A sender's connection to one destination: one handshake, then any number of sessions.

    ``sync()`` uses it for one session; the live daemon keeps it open and runs a session
    per batch of changes (``session(scope, renames)``).
    """

    def __init__(
        self,
        src,
        dst,
        *,
        delete: bool = False,
        checksum: bool = False,
        dry_run: bool = False,
        excludes=(),
        secret: bytes | None = None,
        secret_file: str | None = None,
        lock_file=None,
        dst_lock_file=None,
        state_dir=None,
        bwlimit: int | None = None,
        rsh: str = "ssh -T",
        remote_command: str = "mirror",
        remote_options=(),
        delta_threshold: int | None = None,
        fsync: bool = True,
        epoch: int | None = None,
        on_change=None,
        on_progress=None,
        cancel=None,
        keep_changes: bool = True,
        max_delete: int | None = None,
        allow_mass_delete: bool = False,
        timeout: float | None = DEFAULT_TIMEOUT,
        contimeout: float | None = DEFAULT_CONTIMEOUT,
    ):
        self.src = fs_path(src)
        if not os.path.isdir(self.src):
            raise UsageError(f"source {self.src.decode(errors='replace')!r} is not a directory")
        if secret is None and secret_file:
            from .protocol import load_secret

            secret = load_secret(secret_file)
        self.dest = parse_destination(dst)
        if delta_threshold is None and self.dest.kind == "local":
            delta_threshold = LOCAL_DELTA_THRESHOLD
        for name, value in (("timeout", timeout), ("contimeout", contimeout)):
            if value is not None and value < 0:
                raise UsageError(f"--{name} must be 0 (none) or more seconds, got {value}")
        timeout = timeout or None  # 0: none, as rsync's
        # A network receiver says it is alive a few times per timeout while it works on its own
        # (a long commit, deletions), so only a stopped, hung or vanished one times out.
        keepalive = timeout / 3 if timeout and self.dest.kind != "local" else None
        self.options = SenderOptions(
            delete=delete, checksum=checksum, dry_run=dry_run, excludes=tuple(fs_path(p) for p in excludes),
            lock_file=fs_path(lock_file) if lock_file else None, state_dir=fs_path(state_dir) if state_dir else None,
            fsync=fsync, secret=secret, cancel=cancel, keep_changes=keep_changes, max_delete=max_delete,
            allow_mass_delete=allow_mass_delete, keepalive=keepalive,
            **({"delta_threshold": delta_threshold} if delta_threshold is not None else {}),
        )  # fmt: skip
        self.epoch = epoch
        self._connect_args = (secret, dst_lock_file, bwlimit, rsh, remote_command, tuple(remote_options), timeout,
                              contimeout or None)  # fmt: skip
        self._callbacks = (on_change, on_progress)
        self.transport = None
        self._cleanup = None
        self.sender = None
        self.welcome: dict = {}

    def open(self, *, whole_tree: bool = False) -> Connection:
        """Connect and shake hands.  ``whole_tree``: the first session will be a whole-tree
        one (``sync()``): its scans start first, so they run while the rest of the code
        loads and the connection is made.  The source's always; a local destination's too,
        under the replica's writer lock."""
        from .fdtable import reserve

        reserve()  # before the first thread starts (see fdtable)
        local = self.dest.kind == "local"
        if local:
            os.makedirs(self.dest.path, exist_ok=True)
        scans, writer = (_start_scans(self.src, self.dest.path if local else None, self.options)
                         if whole_tree else (None, None))  # fmt: skip
        try:
            transport, cleanup = _connect(self.dest, *self._connect_args, writer=writer)
        except BaseException:
            _abandon(scans, writer)
            raise
        self.transport, self._cleanup = transport, cleanup
        try:
            self.sender = _sender().Sender(
                self.src, transport, self.options, module=self.dest.module, subpath=self.dest.subpath,
                on_change=self._callbacks[0], on_progress=self._callbacks[1],
                local_dst=self.dest.path if local else None, scans=scans)  # fmt: skip
            self.welcome = self.sender.handshake()
        except BaseException:
            _abandon(scans, None)  # the receiver thread owns the writer lock now
            self.close()
            raise
        return self

    def session(self, scope=None, renames=()) -> SyncResult:
        """Bring the destination up to date (all of it, or ``scope``); see ``Sender.run``."""
        if self.sender is None:
            raise UsageError("connection is not open")
        if self.epoch is not None:
            epoch = self.epoch
        else:
            from .epoch import read_epoch
            from .statedir import resolve_state_dir

            epoch = read_epoch(resolve_state_dir(self.src, self.options.state_dir))
        outcome = self.sender.run(self.welcome, epoch, scope=scope, renames=renames)
        return SyncResult(changes=outcome.changes, failed=outcome.failed, problems=outcome.problems,
                          stats=outcome.stats, receiver=outcome.receiver, dry_run=self.options.dry_run)  # fmt: skip

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        if self._cleanup is not None:
            self._cleanup()
            self._cleanup = None

    def __enter__(self) -> Connection:
        return self if self.transport is not None else self.open()

    def __exit__(self, *exc) -> None:
        self.close()


def _sender():
    from . import sender

    return sender


def _start_scans(src: bytes, local_dst: bytes | None, options):
    """Start the source's scan, and for a local destination take the replica's writer lock
    (a dry run writes nothing: no lock) and start the replica's scan too.

    The lock comes first: no other sync may change the replica between its scan and our
    writes.  The receiver is handed the lock and keeps it for the connection.  A remote
    receiver scans its own tree, under its own lock, once the session starts."""
    from .statedir import resolve_state_dir
    from .syncscan import replica_scan, source_scan

    writer = None
    if local_dst is not None:
        from .statedir import check_root

        check_root(local_dst)  # before the writer lock, which would write into a user's .mirror
    if local_dst is not None and not options.dry_run:
        from .writerlock import WriterLock

        writer = WriterLock.take(resolve_state_dir(local_dst, None), "local", "the destination")
    src_scan = None
    try:
        src_scan = source_scan(src, excludes=options.excludes, checksum=options.checksum,
                               state_dir=options.state_dir, dry_run=options.dry_run)  # fmt: skip
        dst_scan = None
        if local_dst is not None:
            dst_scan = replica_scan(local_dst, excludes=options.excludes, checksum=options.checksum)
        return (src_scan, dst_scan), writer
    except BaseException:
        _abandon((src_scan,), writer)
        raise


def _abandon(scans, writer) -> None:
    from .syncscan import stop_scans

    stop_scans(scans)
    if writer is not None:
        writer.release()


def _connect(dest: Destination, secret, dst_lock_file, bwlimit, rsh, remote_command, remote_options, timeout,
             contimeout, writer=None):  # fmt: skip
    from .protocol import LocalTransport, StreamTransport

    if dest.kind == "local":
        from .receiver import ModuleConfig, Receiver

        mine, theirs = LocalTransport.pair()
        from .privileges import Privileges

        # A local replica is no security boundary (the user could copy the files
        # themselves): devices, special files, set-id bits and owners are all kept.
        module = ModuleConfig(name="", path=dest.path, secret=None, privileges=Privileges.everything(),
                              lock_file=fs_path(dst_lock_file) if dst_lock_file else None)  # fmt: skip
        errors: list[BaseException] = []

        def serve():
            try:
                Receiver(theirs, {"": module}, peer="local", writer=writer).serve()
            except MirrorError as exc:
                errors.append(exc)  # already reported to the sender as an error message

        thread = threading.Thread(target=serve, name="local-receiver", daemon=True)
        thread.start()
        return mine, lambda: thread.join(timeout=30)
    if dest.kind == "daemon":
        import socket

        where = f"{dest.host}:{dest.port}"
        try:
            sock = socket.create_connection((dest.host, dest.port), timeout=contimeout)
        except TimeoutError:
            raise ConnectTimeout(f"cannot connect to {where}: no answer within {contimeout:g} s (--contimeout)") from None
        except OSError as exc:
            raise ConnectError(f"cannot connect to {where}: {exc.strerror or exc}") from None
        sock.settimeout(timeout)  # every wait for the receiver, reading or writing
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rfile, wfile = sock.makefile("rb", buffering=1 << 20), sock.makefile("wb", buffering=1 << 20)
        return StreamTransport(rfile, wfile, bwlimit=bwlimit, on_close=sock.close, peer=f"the receiver at {where}",
                               timeout_hint=f" after {timeout:g} s (--timeout)" if timeout else ""), lambda: None  # fmt: skip
    import shlex
    import subprocess

    # ssh joins its arguments into one line for the remote shell: the path must be quoted,
    # or a space breaks it and shell syntax in it runs over there.
    options = "".join(" " + shlex.quote(o) for o in remote_options)
    remote_line = f"{remote_command} receive{options} -- {shlex.quote(os.fsdecode(dest.path))}"
    argv = shlex.split(rsh) + [dest.host, remote_line]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    transport = StreamTransport(proc.stdout, _Buffered(proc.stdin), bwlimit=bwlimit, read_timeout=timeout,
                                peer=f"the receiver on {dest.host}",
                                timeout_hint=f" after {timeout:g} s (--timeout)" if timeout else "")  # fmt: skip

    def reap():
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    return transport, reap


class _Buffered:
    """A write buffer in front of a pipe, flushed explicitly (frames are small and many)."""

    def __init__(self, raw):
        import io

        self._f = io.BufferedWriter(raw, 1 << 20)

    def write(self, data):
        return self._f.write(data)

    def flush(self):
        self._f.flush()

    def close(self):
        self._f.close()
