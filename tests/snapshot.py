"""An independent description of a tree (os.walk + lstat + content hashes), to check mirrors.

Written without any of hamirror's code, so a bug shared by the scanner and the sync cannot
hide itself: two trees are mirrors when their snapshots are equal.
"""

from __future__ import annotations

import hashlib
import os
import stat


def snapshot(root: bytes | str, *, owners: bool = True, skip_state_dir: bool = True) -> dict:
    root = os.fsencode(root)
    out = {}
    groups: dict[tuple[int, int], bytes] = {}
    st = os.lstat(root)
    out[b"."] = ("dir", stat.S_IMODE(st.st_mode), _owner(st, owners), st.st_mtime_ns)
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if skip_state_dir and rel_dir == b".":
            dirnames[:] = [d for d in dirnames if d != b".mirror"]
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = name if rel_dir == b"." else os.path.join(rel_dir, name)
            st = os.lstat(full)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.readlink(full), _owner(st, owners), st.st_mtime_ns)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", mode, _owner(st, owners), st.st_mtime_ns)
            elif stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                group = groups.setdefault((st.st_dev, st.st_ino), rel) if st.st_nlink > 1 else rel
                out[rel] = ("file", mode, _owner(st, owners), st.st_mtime_ns, digest, group)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                out[rel] = ("dev", stat.S_IFMT(st.st_mode), mode, st.st_rdev, _owner(st, owners), st.st_mtime_ns)
            else:
                out[rel] = ("special", stat.S_IFMT(st.st_mode), mode, _owner(st, owners), st.st_mtime_ns)
    return out


def _owner(st: os.stat_result, owners: bool):
    return (st.st_uid, st.st_gid) if owners else None


def assert_mirrors(src, dst, **kw) -> None:
    a, b = snapshot(src, **kw), snapshot(dst, **kw)
    if a != b:
        only_a = sorted(set(a) - set(b))[:10]
        only_b = sorted(set(b) - set(a))[:10]
        differ = [(k, a[k], b[k]) for k in sorted(set(a) & set(b)) if a[k] != b[k]][:10]
        raise AssertionError(f"trees differ: only in src {only_a}, only in dst {only_b}, different {differ}")
