"""The mirror and hawrap command lines behave as rsync users expect: -v names the files
changed (compared with real rsync), --progress, usage errors without tracebacks, a closed
pipe, an address in use, a lock held by someone else, rsync's --mkpath rule, hawrap's
--version and documented exit codes."""

from __future__ import annotations

import os
import pty
import re
import shutil
import socket
import subprocess
import sys

import pytest

from mirror.cli import COMMANDS
from tests.helpers import MIRROR, REPO, run_mirror
from tests.servers import mirror_server


def _tree(root):
    (root / "docs" / "deep").mkdir(parents=True)
    (root / "docs" / "a.txt").write_bytes(b"alpha\n")
    (root / "docs" / "deep" / "b.bin").write_bytes(os.urandom(5000))
    (root / "top").write_bytes(b"top\n")
    (root / "old").write_bytes(b"to be deleted\n")
    os.symlink("docs/a.txt", root / "link")
    return root


def _rsync_names(src, dst, *extra) -> set[str]:
    # hamirror's own state dir in SRC is never mirrored
    out = subprocess.run(["rsync", "-a", "-v", "--exclude=/.mirror", *extra, f"{src}/", f"{dst}/"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    lines = [line for line in out.splitlines() if not line.startswith("created directory ")]
    # between the header and the blank line before the summary
    body = lines[1 : lines.index("")] if "" in lines else lines[1:]
    return {line for line in body if line != "./"}


def _mirror_names(src, dst, *extra) -> set[str]:
    proc = run_mirror("sync", src, dst, "-v", *extra)
    assert proc.returncode == 0, proc
    lines = proc.stdout.decode().splitlines()
    assert lines[-1].startswith("sent ") and "bytes" in lines[-1]
    return {line for line in lines[:-1] if line != "./"}


@pytest.mark.skipif(shutil.which("rsync") is None, reason="needs rsync")
def test_verbose_lists_the_files_changed_as_rsync_does(tmp_path):
    src = _tree(tmp_path / "src")
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    first = _mirror_names(src, ours)
    assert first == _rsync_names(src, theirs)
    assert {"docs/", "docs/a.txt", "docs/deep/b.bin", "link -> docs/a.txt", "top"} <= first
    # a change, a deletion, a new file; an attribute-only change is not listed by either
    (src / "top").write_bytes(b"top, changed\n")
    (src / "old").unlink()
    (src / "new").write_bytes(b"new\n")
    os.chmod(src / "docs" / "a.txt", 0o600)
    second = _mirror_names(src, ours, "--delete")
    assert second == _rsync_names(src, theirs, "--delete")
    assert {"top", "new", "deleting old"} <= second and "docs/a.txt" not in second


def test_progress_prints_plain_lines_when_not_on_a_terminal(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}").write_bytes(os.urandom(100_000))
    proc = run_mirror("sync", src, tmp_path / "dst", "--progress")
    assert proc.returncode == 0, proc
    lines = proc.stderr.decode().splitlines()
    assert lines and all(line.startswith("mirror sync: ") and "\x1b" not in line for line in lines), lines
    last = lines[-1]
    assert re.search(r"of 1\.9 MiB \(100%\), 20/20 files, .*/s, done in \d:\d\d:\d\d$", last), last
    for line in lines[:-1]:
        assert re.search(r"found so far \(\d+%\), \d+/\d+ files, .*/s, ETA [-\d]:[-\d]{2}:[-\d]{2}$", line), (
            line
        )


def test_progress_on_a_terminal_shows_percentage_and_eta(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(3 << 20))
    main, tty = pty.openpty()
    try:
        os.mkdir(tmp_path / "dst")
        with mirror_server(tmp_path, {"m": str(tmp_path / "dst")}) as server:
            proc = subprocess.Popen([*MIRROR, "sync", str(src), server.url("m"), "--secret-file", server.secret_file,
                                     "--progress", "--bwlimit", "2M"], stderr=tty, stdout=subprocess.DEVNULL,
                                    cwd=REPO, env={**os.environ, "COLUMNS": "160", "TERM": "xterm"})  # fmt: skip
            os.close(tty)
            tty = -1
            output = b""
            while True:
                try:
                    chunk = os.read(main, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
            assert proc.wait(timeout=60) == 0
    finally:
        os.close(main)
        if tty >= 0:
            os.close(tty)
    text = output.decode(errors="replace")
    assert "mirror sync" in text and "%" in text and "ETA" in text and "1/1 files" in text, text[-2000:]


@pytest.mark.parametrize("rate", ["fast", "-5", "0", "nan", "12Q"])
def test_a_bad_bwlimit_is_a_usage_error(tmp_path, rate):
    (tmp_path / "src").mkdir()
    proc = run_mirror("sync", tmp_path / "src", tmp_path / "dst", "--bwlimit", rate)
    assert (
        proc.returncode == 2 and b"argument --bwlimit" in proc.stderr and b"Traceback" not in proc.stderr
    ), proc
    assert not (tmp_path / "dst").exists()


def test_address_already_in_use_names_the_address_and_option(tmp_path):
    (tmp_path / "tree").mkdir()
    secret = tmp_path / "secret"
    secret.write_bytes(b"a-shared-secret-long-enough\n")
    secret.chmod(0o600)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_mirror("serve", "--listen", f"127.0.0.1:{port}", "--module", f"m={tmp_path / 'tree'}",
                          "--secret-file", secret)  # fmt: skip
        assert proc.returncode == 2, proc
        assert f"--listen: cannot listen on 127.0.0.1:{port}: Address already in use".encode() in proc.stderr
        proc = run_mirror("daemon", tmp_path / "tree", tmp_path / "dst", "--metrics", f"127.0.0.1:{port}")
        assert proc.returncode == 2, proc
        assert f"--metrics: cannot listen on 127.0.0.1:{port}: Address already in use".encode() in proc.stderr


@pytest.mark.parametrize("launcher", ["module", "script"])
def test_diff_into_a_closed_pipe_exits_quietly(tmp_path, launcher):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for i in range(3000):
        (a / f"file-{i:05d}").write_bytes(b"x")
    mirror = (
        " ".join(MIRROR) if launcher == "module" else os.path.join(os.path.dirname(sys.executable), "mirror")
    )
    if launcher == "script" and not os.path.exists(mirror):
        pytest.skip("the mirror console script is not installed next to this interpreter")
    proc = subprocess.run(["bash", "-c", f"{mirror} diff {a} {b} | head -1; echo \"exit=${{PIPESTATUS[0]}}\""],
                          capture_output=True, text=True, timeout=60, cwd=REPO)  # fmt: skip
    assert proc.stderr == "", proc.stderr
    assert proc.stdout.splitlines()[-1] == "exit=141", proc.stdout


def test_lock_acquire_on_a_lock_held_by_someone_else_exits_3(tmp_path):
    lock = tmp_path / "lock"
    assert run_mirror("lock", "acquire", lock, "--reason", "first").returncode == 0
    proc = run_mirror("lock", "acquire", lock, "--reason", "second")
    assert proc.returncode == 3 and b"already held" in proc.stdout and b"first" in proc.stdout


def test_a_destination_whose_parent_does_not_exist_needs_mkpath(tmp_path):
    src = _tree(tmp_path / "src")
    dst = tmp_path / "no" / "such" / "dst"
    proc = run_mirror("sync", src, dst)
    assert proc.returncode == 2 and b"does not exist (--mkpath creates it)" in proc.stderr, proc
    assert not (tmp_path / "no").exists()
    proc = run_mirror("sync", "--mkpath", tmp_path / "missing", dst, check_codes=(2,))  # a mistyped source
    assert b"is not a directory" in proc.stderr and not (tmp_path / "no").exists(), proc
    assert run_mirror("sync", src, tmp_path / "dst").returncode == 0  # DST itself is created
    proc = run_mirror("sync", src, dst, "--mkpath")
    assert proc.returncode == 0, proc
    assert (dst / "docs" / "a.txt").read_bytes() == b"alpha\n"


def test_a_destination_that_is_not_a_directory_is_named(tmp_path):
    src = _tree(tmp_path / "src")
    (tmp_path / "file").write_bytes(b"a user's file\n")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    for dst in (tmp_path / "file", tmp_path / "dangling", "/dev/null"):
        proc = run_mirror("sync", "--delete", src, dst, check_codes=(2,))
        assert f"the replica {dst} is not a directory".encode() in proc.stderr, proc.stderr
    assert (tmp_path / "file").read_bytes() == b"a user's file\n" and not (tmp_path / "nowhere").exists()


def test_hawrap_version_and_every_command_documents_its_exit_status():
    run = lambda *a: subprocess.run([sys.executable, "-m", "hawrap", *a], capture_output=True, text=True,  # noqa: E731
                                    timeout=60, cwd=REPO)  # fmt: skip
    proc = run("--version")
    assert proc.returncode == 0 and re.match(r"hawrap \(hamirror\) \d+\.\d+", proc.stdout), proc
    top = run("--help")
    assert top.returncode == 0 and "Exit status:" in top.stdout
    from hawrap.cli import COMMAND_HELP

    for name in COMMAND_HELP:
        proc = run(name, "--help")
        assert proc.returncode == 0 and "Exit status: 0" in proc.stdout, (name, proc.stdout)
        assert name in top.stdout


def test_every_mirror_command_has_help():
    for name in COMMANDS:
        proc = run_mirror(name, "--help")
        assert proc.returncode == 0 and proc.stdout.startswith(f"usage: mirror {name}".encode()), name
