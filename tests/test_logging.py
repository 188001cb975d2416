"""Log lines under journald carry their syslog priority (sd-daemon(3)) and no timestamp of
their own; elsewhere they carry a timestamp; state changes an operator must see are warnings."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys

from mirror.logsetup import JournalFormatter, priority
from tests.helpers import MIRROR, REPO, wait_until

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} mirror: ")


def _run_locked_daemon(tmp_path, journal: str | None) -> list[str]:
    """A real daemon held by a mirroring lock (a state an operator must see), stopped by SIGTERM;
    its stderr is a file, which ``journal`` says is (or is not) the journal stream."""
    src, dst, lock = tmp_path / "src", tmp_path / "dst", tmp_path / "lock"
    src.mkdir()
    lock.write_text("{}")
    log = tmp_path / "stderr.log"
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    with open(log, "wb") as err:
        st = os.fstat(err.fileno())
        if journal == "this":
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        elif journal == "inherited":  # set for another stream: this stderr was redirected
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino + 1}"
        proc = subprocess.Popen([*MIRROR, "daemon", str(src), str(dst), "--lock-file", str(lock)], stderr=err,
                                stdout=subprocess.DEVNULL, env=env, cwd=REPO)  # fmt: skip
        try:
            status = src / ".mirror" / "mirror-daemon.status.json"
            wait_until(
                lambda: status.exists() and json.loads(status.read_bytes())["pairs"][0]["state"] == "locked"
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
    return log.read_text().splitlines()


def test_under_journald_every_line_carries_its_priority_and_no_timestamp(tmp_path):
    lines = _run_locked_daemon(tmp_path, "this")
    assert lines and all(re.match(r"^<[0-7]>mirror: ", line) for line in lines), lines
    assert any(line.startswith("<4>mirror: WARNING: src: locked") for line in lines), lines
    # routine banners are INFO, shown by default under the journal (journalctl -p filters)
    assert any(line.startswith("<6>mirror: INFO: mirroring src: ") for line in lines), lines
    assert not any(TIMESTAMP.match(line[3:]) for line in lines)


def test_elsewhere_lines_have_one_timestamp_and_no_priority(tmp_path):
    for journal in (None, "inherited"):
        work = tmp_path / str(journal)
        work.mkdir()
        lines = _run_locked_daemon(work, journal)
        assert lines and all(TIMESTAMP.match(line) for line in lines), (journal, lines)
        assert any("mirror: WARNING: src: locked" in line for line in lines)
        assert not any(line.startswith("<") for line in lines)
        assert not any("INFO" in line for line in lines)  # a terminal shows warnings unless -v


def test_priorities_follow_syslog_and_every_line_of_a_record_is_prefixed():
    assert [priority(level) for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR,
                                          logging.CRITICAL)] == [7, 6, 4, 3, 2]  # fmt: skip
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    text = JournalFormatter("hawrap[a]: %(levelname)s: %(message)s").format(record)
    lines = text.splitlines()
    assert lines[0] == "<3>hawrap[a]: ERROR: failed" and len(lines) > 2
    assert all(line.startswith("<3>") for line in lines)


def test_hawrap_logs_by_the_same_rule(tmp_path):
    log = tmp_path / "err"
    with open(log, "wb") as err:
        st = os.fstat(err.fileno())
        code = ("from hawrap.cli import setup_logging; import logging; setup_logging(0, 'a'); "
                "logging.getLogger('hawrap.node').warning('secondary -> primary: peer silent')")  # fmt: skip
        subprocess.run([sys.executable, "-c", code], stderr=err, check=True, cwd=REPO,
                       env={**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})  # fmt: skip
    assert log.read_text() == "<4>hawrap[a]: WARNING: secondary -> primary: peer silent\n"
