"""Exclude patterns with rsync's glob rules, matched against paths relative to the tree root.

- A pattern without ``/`` matches the last component (``*.tmp``, ``core``) at any depth.
- A pattern starting with ``/`` is anchored at the root (``/cache`` is only the top-level one).
- Any other pattern with a ``/`` matches whole trailing components (``logs/*.gz`` matches
  ``logs/a.gz`` and ``srv/logs/a.gz``).
- A trailing ``/`` matches directories only (``build/``).
- ``*`` matches within one component, ``**`` across ``/``, ``?`` one character other than
  ``/``, ``[...]`` a class (``[!...]`` or ``[^...]`` negated), ``\\`` escapes the next character.
- ``dir/***`` matches ``dir`` itself and everything under it.

An excluded directory is not descended into, so everything below it is excluded too.
Patterns and paths are bytes; a pattern given as text is encoded with the filesystem
encoding, so a name that is not UTF-8 can be excluded exactly.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from .errors import UsageError

# What a receiver takes in a session's ``start`` (docs/PROTOCOL.md), and so what every
# command takes: excludes that work locally work to any destination.
MAX_PATTERNS = 1000
MAX_PATTERN_BYTES = 1024


def _glob_to_regex(glob: bytes) -> bytes:
    out = bytearray()
    i, n = 0, len(glob)
    while i < n:
        c = glob[i : i + 1]
        if c == b"*":
            if glob[i : i + 2] == b"**":
                out += b".*"
                i += 2
                while glob[i : i + 1] == b"*":
                    i += 1
                continue
            out += b"[^/]*"
        elif c == b"?":
            out += b"[^/]"
        elif c == b"[":
            j = i + 1
            if glob[j : j + 1] in (b"!", b"^"):
                j += 1
            if glob[j : j + 1] == b"]":
                j += 1
            while j < n and glob[j : j + 1] != b"]":
                j += 1
            if j >= n:
                out += b"\\["  # no closing bracket: a literal '['
            else:
                body = glob[i + 1 : j]
                negate = body[:1] in (b"!", b"^")
                if negate:
                    body = body[1:]
                body = body.replace(b"\\", b"\\\\")
                out += b"[" + (b"^/" if negate else b"") + body + b"]"
                i = j
        elif c == b"\\" and i + 1 < n:
            out += re.escape(glob[i + 1 : i + 2])
            i += 1
        else:
            out += re.escape(c)
        i += 1
    return bytes(out)


class Pattern:
    """One compiled exclude pattern."""

    def __init__(self, text: bytes | str):
        raw = os.fsencode(text)
        if not raw or raw in (b"/", b"//"):
            raise UsageError(f"empty exclude pattern {text!r}")
        self.text = raw
        self.dirs_only = raw.endswith(b"/") and not raw.endswith(b"***")
        body = raw.rstrip(b"/") if self.dirs_only else raw
        anchored = body.startswith(b"/")
        body = body.lstrip(b"/")
        subtree = body.endswith(b"/***")
        if subtree:
            body = body[:-4]
        regex = _glob_to_regex(body)
        if subtree:
            regex += b"(?:/.*)?"
        self.on_basename = not anchored and b"/" not in body and b"**" not in body and not subtree
        if self.on_basename:
            full = b"^" + regex + b"$"
        elif anchored:
            full = b"^" + regex + b"$"
        else:
            full = b"(?:^|.*/)" + regex + b"$"
        try:
            self._regex = re.compile(full, re.DOTALL)
        except re.error as exc:
            raise UsageError(f"invalid exclude pattern {text!r}: {exc}") from exc

    def matches(self, path: bytes, is_dir: bool) -> bool:
        if self.dirs_only and not is_dir:
            return False
        subject = path.rsplit(b"/", 1)[-1] if self.on_basename else path
        return self._regex.match(subject) is not None

    def __repr__(self) -> str:
        return f"Pattern({self.text!r})"


class Excluder:
    """A list of exclude patterns; ``excluded(path, is_dir)`` is what the scanner calls."""

    def __init__(self, patterns: Iterable[bytes | str]):
        self.patterns = [Pattern(p) for p in patterns]

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def excluded(self, path: bytes, is_dir: bool) -> bool:
        return any(p.matches(path, is_dir) for p in self.patterns)

    def __repr__(self) -> str:
        return f"Excluder({[p.text for p in self.patterns]!r})"


def excluded_dir(excluded, path: bytes, seen: dict[bytes, bool] | None = None) -> bool:
    """Whether directory ``path`` or one above it is excluded by ``excluded(path, is_dir)``
    (an ``Excluder``'s): what a scan, which never descends into an excluded directory, does
    not reach.  ``seen`` caches the answers over many calls."""
    if not path:
        return False
    if seen is None:
        seen = {}
    if path not in seen:
        seen[path] = excluded(path, True) or excluded_dir(excluded, path.rpartition(b"/")[0], seen)
    return seen[path]


def read_pattern_file(path: str) -> list[bytes]:
    """Patterns from a file, one per line; blank lines and lines starting with ``#`` skipped."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    out = []
    for number, line in enumerate(lines, 1):
        if line.strip() and not line.startswith(b"#"):
            out.append(line.rstrip(b"\r"))
            if len(out[-1]) > MAX_PATTERN_BYTES:
                raise UsageError(f"{path}: line {number}: a pattern of {len(out[-1])} bytes (at most "
                                 f"{MAX_PATTERN_BYTES})")  # fmt: skip
    return out


def pattern_problem(patterns: list[bytes]) -> str | None:
    """Why ``patterns`` are more than a sync takes (None: they are not)."""
    if len(patterns) > MAX_PATTERNS:
        return f"{len(patterns)} exclude patterns (at most {MAX_PATTERNS})"
    longest = max(patterns, key=len, default=b"")
    if len(longest) > MAX_PATTERN_BYTES:
        return f"an exclude pattern of {len(longest)} bytes (at most {MAX_PATTERN_BYTES})"
    return None


def make_excluder(patterns: Iterable[bytes | str]) -> Excluder | None:
    """An Excluder for ``patterns``, or None when there are none (the scanner's fast path)."""
    excluder = Excluder(patterns)
    return excluder if excluder else None
