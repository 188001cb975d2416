"""Render changes as ``rsync -i`` style lines and as JSON.

Each line is ``YXcstpoguax PATH`` (11 flag characters, a space, the path):

=====  =====================================================================================
``Y``  ``>`` a file's content would be sent; ``c`` an entry would be created or changed
       (directory, symlink, device, special); ``h`` a hard link would be made; ``.`` only
       attributes differ; ``*deleting`` stands in place of the flags for a removal.
``X``  kind: ``f`` file, ``d`` directory, ``L`` symlink, ``D`` device, ``S`` FIFO or socket.
then   ``c`` content differs by digest (``--checksum``), symlink target or device number;
       ``s`` size; ``t`` modification time; ``p`` permissions; ``o`` owner; ``g`` group;
       ``u a x`` are always ``.`` (atime, ACLs, xattrs are not compared).  A new entry shows
       ``+++++++++``; an unchanged attribute ``.``.
=====  =====================================================================================

A directory's path ends in ``/``; a symlink is followed by `` -> TARGET``; a path to be
hard-linked by `` => OTHER``.  A type change is a removal line then a creation line.

Paths are shown losslessly on one line: ``\\`` becomes ``\\\\``; control characters and
bytes that are not UTF-8 become ``\\xHH`` (JSON output carries the raw bytes as base64 in
``path_b64`` whenever the path is not plain UTF-8).
"""

from __future__ import annotations

import base64
import re
import unicodedata

from .compare import ADDED, CONTENT, HARDLINK, METADATA, REMOVED, TARGET, TYPE, Difference
from .entry import KIND_LETTER, Entry, Kind

_PLAIN = re.compile(rb"[\x20-\x5b\x5d-\x7e]*\Z")  # printable ASCII but backslash


def escape_path(path: bytes) -> str:
    """A one-line, lossless display form of ``path``."""
    if _PLAIN.match(path):
        return path.decode("ascii")
    text = path.decode("utf-8", "surrogateescape")
    out = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch == "\\":
            out.append("\\\\")
        elif code < 0x20 or code == 0x7F or unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp"):
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def _display(path: bytes, entry: Entry | None) -> str:
    text = escape_path(path)
    if entry is not None and entry.kind == Kind.DIR and path != b".":
        text += "/"
    elif path == b".":
        text = "./"
    if entry is not None and entry.kind == Kind.SYMLINK:
        text += " -> " + escape_path(entry.target)
    return text


_ATTR_ORDER = (("s", "size"), ("t", "mtime"), ("p", "mode"), ("o", "uid"), ("g", "gid"))


def _flags(entry: Entry, change: Difference, first: str) -> str:
    fields = change.fields
    c = "c" if fields & {"digest", "digest-unknown", "target", "rdev"} else "."
    rest = "".join(letter if name in fields else "." for letter, name in _ATTR_ORDER)
    return first + KIND_LETTER[Kind(entry.kind)] + c + rest + "..."


def item_lines(change: Difference) -> list[str]:
    """The itemized line(s) for one change."""
    if change.change == REMOVED:
        return [f"*deleting   {_display(change.path, change.dst)}"]
    src = change.src
    assert src is not None
    link = f" => {escape_path(change.link_to)}" if change.link_to is not None else ""
    if change.change in (ADDED, TYPE):
        lines = [f"*deleting   {_display(change.path, change.dst)}"] if change.change == TYPE else []
        first = "h" if change.link_to is not None else (">" if src.kind == Kind.FILE else "c")
        lines.append(f"{first}{KIND_LETTER[Kind(src.kind)]}+++++++++ {_display(change.path, src)}{link}")
        return lines
    if change.change == HARDLINK:
        first = "h"
    elif change.change == CONTENT and src.kind == Kind.FILE:
        first = ">"
    elif change.change in (CONTENT, TARGET):
        first = "c"
    else:
        assert change.change == METADATA
        first = "."
    return [f"{_flags(src, change, first)} {_display(change.path, src)}{link}"]


def name_lines(change: Difference) -> list[str]:
    """``rsync -v``'s listing of one change: the name of an entry created, replaced or
    deleted (a directory ends in ``/``, a symlink shows its target); none for an entry whose
    attributes alone changed."""
    if change.change == REMOVED:
        return [f"deleting {_display(change.path, change.dst)}"]
    if change.change == METADATA:
        return []
    assert change.src is not None
    lines = [f"deleting {_display(change.path, change.dst)}"] if change.change == TYPE else []
    link = f" => {escape_path(change.link_to)}" if change.link_to is not None else ""
    return [*lines, f"{_display(change.path, change.src)}{link}"]


def _path_fields(key: str, path: bytes) -> dict:
    out = {key: escape_path(path)}
    try:
        if path.decode("utf-8") != out[key]:
            raise UnicodeDecodeError("utf-8", path, 0, 1, "escaped")
    except UnicodeDecodeError:
        out[key + "_b64"] = base64.b64encode(path).decode()
    return out


def change_json(change: Difference) -> dict:
    entry = change.src if change.src is not None else change.dst
    out = _path_fields("path", change.path)
    out.update(
        change=change.change,
        kind=Kind(entry.kind).name.lower(),
        fields=sorted(change.fields),
        itemize=item_lines(change),
    )
    if change.change == TYPE and change.dst is not None:
        out["was"] = Kind(change.dst.kind).name.lower()
    if entry.kind == Kind.SYMLINK:
        out.update(_path_fields("target", entry.target))
    if change.link_to is not None:
        out.update(_path_fields("link_to", change.link_to))
    return out
