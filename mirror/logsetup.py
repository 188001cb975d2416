"""Log lines for where they go: the systemd journal, or a terminal or file.

Under systemd, stderr is a stream to journald, which the service learns from
``JOURNAL_STREAM`` (``DEVICE:INODE`` of that stream; checked against stderr itself, as
sd-daemon(3) advises, since a child whose stderr was redirected inherits the variable).
There each line starts with its syslog priority (``<4>`` for a warning, sd-daemon(3)), so
``journalctl -p warning`` finds what an operator must see, and carries no timestamp: the
journal adds its own.  Elsewhere each line starts with the local time.

The journal keeps every priority and filters when read, so under it the default level is
INFO (routine banners included); on a terminal it is WARNING.  ``mirror`` and ``hawrap``
both configure logging here.
"""

from __future__ import annotations

import logging
import os
import sys

# logging level -> syslog priority (sd-daemon(3): SD_ERR "<3>", SD_WARNING "<4>", ...)
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def journal_stream(stream=None) -> bool:
    """Is ``stream`` (default stderr) the journal stream systemd gave this service?"""
    value = os.environ.get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError, AttributeError):
        return False


def priority(levelno: int) -> int:
    for level in sorted(_PRIORITY, reverse=True):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


class JournalFormatter(logging.Formatter):
    """Every line of a record (a traceback too) prefixed with the record's priority: the
    journal takes each line as an entry of its own."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def configure_logging(who: str, verbose: int = 0, quiet: bool = False) -> None:
    """Log to stderr as ``who: LEVEL: message``: priority-prefixed under the journal,
    timestamped elsewhere.  ``verbose`` raises the detail, ``quiet`` keeps only errors."""
    journal = journal_stream()
    if quiet:
        level = logging.ERROR
    else:
        levels = (logging.INFO if journal else logging.WARNING, logging.INFO, logging.DEBUG)
        level = levels[min(verbose, 2)]
    handler = logging.StreamHandler(sys.stderr)
    if journal:
        handler.setFormatter(JournalFormatter(f"{who}: %(levelname)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {who}: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
