"""The console script's head start (mirror.startup) and its quick exit."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys

import pytest

from mirror import startup
from mirror.cli import COMMANDS, _command_parser
from mirror.exclude import Excluder
from mirror.treescan import TreeScan
from tests.helpers import run_mirror


@pytest.mark.parametrize("command", sorted(startup.VALUE_OPTIONS))
def test_value_options_match_the_commands_parsers(command):
    """The table the launcher reads the command line with is the parsers' own truth."""
    parser = _command_parser(command, importlib.import_module(COMMANDS[command][0]))
    takes_value = {
        name
        for action in parser._actions
        for name in action.option_strings
        if action.nargs != 0  # store_true, count, help: no value
    }
    assert takes_value == startup.VALUE_OPTIONS[command]
    assert [a.dest for a in parser._actions if not a.option_strings] == ["src", "dst"]


@pytest.mark.parametrize(
    "argv, source",
    [
        (["sync", "a", "b"], "a"),
        (["sync", "--delete", "-c", "a", "b"], "a"),
        (["sync", "--secret-file", "s", "a", "mirror://h/m"], "a"),
        (["sync", "--secret-file=s", "--exclude", "*.tmp", "a", "b"], "a"),
        (["diff", "-vv", "--state-dir", "sd", "a", "b", "--json"], "a"),
        (["sync", "--secret", "s", "a", "b"], None),  # an abbreviation: three positionals, no guess
        (["sync", "a"], None),
        (["sync", "--", "-a", "b"], None),
        (["scan", "a"], None),
        (["sync", "--help"], None),
        ([], None),
    ],
)
def test_source_argument(argv, source):
    assert startup.source_argument(argv) == source


def _tree(tmp_path, name):
    root = tmp_path / name
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"x")
    return os.fsencode(root)


def test_a_plain_scan_adopts_the_early_walk(tmp_path):
    root = _tree(tmp_path, "src")
    startup.start_walk(root)
    early = startup._walks[root]
    scan = TreeScan(root).start()
    try:
        assert scan._walk is early and startup.take_walk(root) is None
        assert [listing.path for listing in scan] == [b"", b"d", b"d/e"]
    finally:
        scan.stop()


@pytest.mark.parametrize("options", [{"checksum": True}, {"excluder": Excluder([b"*.tmp"])}])
def test_any_other_scan_stops_the_early_walk(tmp_path, options):
    """A scan with digests or excludes is not what the early walk does: it is stopped."""
    root = _tree(tmp_path, "src")
    startup.start_walk(root)
    early = startup._walks[root]
    scan = TreeScan(root, **options).start()
    scan.stop()
    assert startup.take_walk(root) is None
    assert list(early) == []  # closed


def test_discard_closes_what_nobody_took(tmp_path):
    roots = [_tree(tmp_path, "a"), _tree(tmp_path, "b")]
    for root in roots:
        startup.start_walk(root)
    walks = list(startup._walks.values())
    startup.discard_walks()
    assert startup._walks == {} and all(list(w) == [] for w in walks)


def test_sync_and_diff_through_the_console_script_with_a_head_start(tmp_path):
    src = _tree(tmp_path, "src")
    dst = os.path.join(os.fsencode(tmp_path), b"dst")
    proc = run_mirror("sync", "--delete", src, dst)
    assert proc.returncode == 0, proc.stderr
    assert open(os.path.join(dst, b"d", b"f"), "rb").read() == b"x"
    assert run_mirror("diff", src, dst).returncode == 0
    with open(os.path.join(src, b"d", b"g"), "wb") as f:
        f.write(b"new")
    proc = run_mirror("diff", "--json", src, dst)
    assert proc.returncode == 1 and b'"d/g"' in proc.stdout


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # fmt: skip


def test_the_quick_exit_flushes_and_keeps_the_exit_code():
    proc = _python("import sys; from mirror.startup import _exit; sys.stdout.write('unflushed'); _exit(3)")
    assert (proc.returncode, proc.stdout) == (3, "unflushed")


def test_the_quick_exit_waits_for_a_thread_still_working():
    proc = _python(
        "import threading, time\n"
        "from mirror.startup import _exit\n"
        "threading.Thread(target=lambda: (time.sleep(0.2), print('finished'))).start()\n"
        "_exit(4)\n"
    )
    assert (proc.returncode, proc.stdout) == (4, "finished\n")


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (CI installs it)")
def test_the_descriptor_table_is_grown_before_the_early_walk_starts(tmp_path):
    """Growing the table of a process with threads waits for an RCU grace period (see
    mirror.startup): the launcher grows it while the process is still one thread."""
    src, dst = _tree(tmp_path, "src"), _tree(tmp_path, "dst")
    log = tmp_path / "strace.log"
    proc = run_mirror("diff", src, dst, prefix=["strace", "-f", "-qq", "-o", str(log), "-e", "trace=fcntl,clone,clone3"])
    assert proc.returncode == 1, proc.stderr  # the trees differ in their times
    calls = log.read_text().splitlines()
    grown = next(i for i, line in enumerate(calls) if "F_DUPFD_CLOEXEC, 2047" in line)
    first_thread = next(i for i, line in enumerate(calls) if "clone3(" in line or "clone(" in line)
    assert grown < first_thread
