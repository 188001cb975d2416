"""A self-contained demonstration on a generated tree (``mirror demo``).

Builds a small tree, copies it as a replica, makes a known set of changes, and shows that
``mirror diff`` finds exactly those: the quick check (size and mtime) first, then
``--checksum``, which also finds a rewrite that kept the file's size and mtime.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field

from .compare import CompareOptions, CompareSummary, compare_trees, root_entry
from .itemize import item_lines
from .treescan import TreeScan


@dataclass
class DemoStep:
    title: str
    lines: list[str]
    expected: set[bytes]
    found: set[bytes]
    seconds: float

    @property
    def ok(self) -> bool:
        return self.expected == self.found


@dataclass
class DemoResult:
    workdir: str
    files: int
    steps: list[DemoStep] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(step.ok for step in self.steps)


def make_tree(root: str, files: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    dirs = [""]
    for i in range(files // 10):
        parent = rng.choice(dirs)
        dirs.append(os.path.join(parent, f"dir{i:02d}"))
        os.makedirs(os.path.join(root, dirs[-1]))
    for i in range(files):
        path = os.path.join(root, rng.choice(dirs), f"file{i:03d}.txt")
        with open(path, "wb") as f:
            f.write(rng.randbytes(rng.randrange(10, 20000)))
    os.symlink("file000.txt", os.path.join(root, "latest"))


def _diff(src: str, dst: str, checksum: bool) -> tuple[list[str], set[bytes], float]:
    import time

    start = time.perf_counter()
    a, b = TreeScan(src, checksum=checksum), TreeScan(dst, checksum=checksum)
    summary = CompareSummary()
    changes = list(
        compare_trees(a, b, CompareOptions(checksum=checksum), summary, root_entry(a.root), root_entry(b.root))
    )
    elapsed = time.perf_counter() - start
    lines = [line for change in changes for line in item_lines(change)]
    return lines, {c.path for c in changes if c.path != b"."}, elapsed


def run_demo(workdir: str | None = None, files: int = 200) -> DemoResult:
    base = workdir or tempfile.mkdtemp(prefix="mirror-demo-")
    src, dst = os.path.join(base, "primary"), os.path.join(base, "replica")
    os.makedirs(src)
    make_tree(src, files)
    shutil.copytree(src, dst, symlinks=True)  # copies mtimes and modes too
    result = DemoResult(workdir=base, files=files)

    lines, found, secs = _diff(src, dst, checksum=False)
    result.steps.append(DemoStep("fresh copy", lines, set(), found, secs))

    rng = random.Random(11)
    names = sorted(os.path.relpath(os.path.join(d, n), src) for d, _, ns in os.walk(src) for n in ns
                   if n.startswith("file"))  # fmt: skip
    edited, grown, removed, chmodded, sneaky = rng.sample(names, 5)
    with open(os.path.join(src, edited), "r+b") as f:
        f.write(b"edited!")
    os.utime(os.path.join(src, edited), ns=(1, 2_000_000_000 * 10**9))
    with open(os.path.join(src, grown), "ab") as f:
        f.write(b"appended line\n")
    os.unlink(os.path.join(src, removed))
    os.chmod(os.path.join(src, chmodded), 0o600)
    with open(os.path.join(src, "brand-new.txt"), "w") as f:
        f.write("new file\n")
    # Same size and mtime, different bytes: only a content digest can see this one.
    path = os.path.join(src, sneaky)
    st = os.stat(path)
    with open(path, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = {os.fsencode(p) for p in (edited, grown, removed, chmodded, "brand-new.txt")}

    lines, found, secs = _diff(src, dst, checksum=False)
    result.steps.append(DemoStep("quick check (size, mtime)", lines, changed, found, secs))
    lines, found, secs = _diff(src, dst, checksum=True)
    result.steps.append(DemoStep("--checksum (xxh3-128 digests)", lines, changed | {os.fsencode(sneaky)}, found, secs))
    lines, found, secs = _diff(src, dst, checksum=True)
    result.steps.append(DemoStep("--checksum again (digest cache warm)", lines, changed | {os.fsencode(sneaky)}, found, secs))
    return result


def cleanup(result: DemoResult) -> None:
    shutil.rmtree(result.workdir, ignore_errors=True)
