"""The planner on its own: real trees scanned and compared, operations out, no transport."""

from __future__ import annotations

import os

import pytest

from mirror.compare import CompareOptions, CompareSummary, compare_pairs, root_entry
from mirror.entry import Kind
from mirror.plan import ATTRS, DELETE, DELTA, LINK, MKDIR, SPECIAL, SYMLINK, WHOLE, Planner
from mirror.treescan import TreeScan

T0 = 1_600_000_000 * 10**9


def write(path, data: bytes, mtime_ns: int = T0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def plan_all(src, dst, **options) -> tuple[list, Planner]:
    """Every operation of a session in the order the planner hands them out."""
    options = {"delete": True, "dry_run": False, "delta_threshold": 1 << 63, **options}
    planner = Planner(**options)
    scans = [TreeScan(os.fsencode(p), background=False) for p in (src, dst)]
    planner.root(root_entry(os.fsencode(src)), differs=False)
    ops = []
    summary = CompareSummary()

    def pairs():
        from mirror.compare import align

        for a, b in align(*scans):
            if a is not None:
                planner.listing(a)
            yield a, b

    for change in compare_pairs(pairs(), CompareOptions(), summary):
        planned = planner.plan(change)
        ops += planned or []
    assert summary.complete
    return ops + planner.links() + planner.closing(), planner


def kinds_of(ops, path: bytes) -> list[str]:
    return [op.kind for op in ops if op.path == path]


def test_new_tree_content_then_links_then_deletions_then_directory_times_deepest_first(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write(src / "d" / "e" / "f", b"f")
    write(src / "a", b"linked")
    os.link(src / "a", src / "d" / "b")
    os.link(src / "a", src / "z")
    os.symlink("a", src / "s")
    os.mkfifo(src / "p")
    write(dst / "old" / "x", b"x")
    ops, _ = plan_all(src, dst)
    kinds = [op.kind for op in ops]
    # Exactly one copy of the linked content, under its first name; the others link to it.
    assert kinds_of(ops, b"a") == [WHOLE]
    links = [op for op in ops if op.kind == LINK]
    assert sorted((op.path, op.link_to) for op in links) == [(b"d/b", b"a"), (b"z", b"a")]
    assert kinds_of(ops, b"s") == [SYMLINK] and kinds_of(ops, b"p") == [SPECIAL]
    assert kinds_of(ops, b"d") == [MKDIR, ATTRS] and kinds_of(ops, b"d/e") == [MKDIR, ATTRS]
    last_content = max(i for i, k in enumerate(kinds) if k in (WHOLE, MKDIR, SYMLINK, SPECIAL))
    first_link = kinds.index(LINK)
    deletion = kinds.index(DELETE)
    first_dir_time = next(i for i, op in enumerate(ops) if op.kind == ATTRS)
    assert last_content < first_link < deletion < first_dir_time
    assert ops[deletion].path == b"old"  # the directory, with its subtree: one operation
    # Directory times last, deepest first; every directory a change touched is restored.
    times = [op.path for op in ops[first_dir_time:]]
    assert all(op.kind == ATTRS and op.entry.kind == Kind.DIR for op in ops[first_dir_time:])
    assert times.index(b"d/e") < times.index(b"d") < times.index(b"")
    assert kinds.count(DELETE) == 1


def test_a_changed_file_goes_as_a_delta_only_when_both_copies_reach_the_threshold(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    for name, size in ((b"big", 5000), (b"small", 100)):
        write(os.path.join(os.fsencode(dst), name), b"o" * size, T0)
        write(os.path.join(os.fsencode(src), name), b"n" * size, T0 + 1)
    write(src / "grown", b"g" * 5000, T0 + 1)
    write(dst / "grown", b"g" * 10, T0)
    write(src / "new", b"n" * 5000)
    ops, _ = plan_all(src, dst, delta_threshold=4096)
    by_path = {op.path: op for op in ops if op.kind in (WHOLE, DELTA)}
    assert by_path[b"big"].kind == DELTA and by_path[b"big"].basis.size == 5000
    assert by_path[b"small"].kind == WHOLE
    assert by_path[b"grown"].kind == WHOLE  # the replica's copy is too small to be a basis
    assert by_path[b"new"].kind == WHOLE


def test_attribute_changes_are_set_in_place_and_directory_ones_at_the_end(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write(src / "d" / "f", b"f")
    write(dst / "d" / "f", b"f")
    os.chmod(src / "d" / "f", 0o600)
    os.chmod(dst / "d" / "f", 0o644)
    os.chmod(src / "d", 0o700)
    os.chmod(dst / "d", 0o755)
    for d in (src / "d", dst / "d"):
        os.utime(d, ns=(T0, T0))
    ops, planner = plan_all(src, dst)
    assert [(op.kind, op.path) for op in ops] == [(ATTRS, b"d/f"), (ATTRS, b"d"), (ATTRS, b"")]
    assert ops[1].entry.mode == 0o700 and planner.other_changes == 2


def test_a_chmod_of_a_file_linked_on_the_replica_breaks_the_link(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write(src / "f", b"f")
    write(dst / "f", b"f")
    os.link(dst / "f", tmp_path / "outside")  # a second name the replica's file must not share
    os.chmod(src / "f", 0o600)
    ops, _ = plan_all(src, dst)
    assert kinds_of(ops, b"f") == [WHOLE]


def test_removals_are_left_alone_without_delete(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    write(dst / "only-there", b"x")
    ops, _ = plan_all(src, dst, delete=False)
    assert ops == []


def test_a_dry_run_plans_the_deletions_only(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write(src / "new" / "f", b"f")
    write(dst / "gone", b"x")
    ops, planner = plan_all(src, dst, dry_run=True)
    assert [(op.kind, op.path) for op in ops] == [(DELETE, b"gone")]


def test_a_partial_listing_asks_for_the_parent_entry(tmp_path):
    src = tmp_path / "src"
    write(src / "d" / "f", b"f")
    asked = []

    def dir_entry(path):
        asked.append(path)
        return root_entry(os.path.join(os.fsencode(src), path))

    planner = Planner(delete=True, dry_run=False, delta_threshold=1 << 63, dir_entry=dir_entry)
    from mirror.compare import ADDED, Difference
    from mirror.entry import Entry

    entry = Entry(b"f", Kind.FILE, 0o644, 0, 0, 1, T0, T0, 1, 1, 1, 0, b"", None)
    assert planner.plan(Difference(b"d/f", ADDED, entry)) == [(WHOLE, b"d/f", entry, None, None)]
    assert asked == [b"d"]
    (closing,) = planner.closing()
    assert closing.kind == ATTRS and closing.path == b"d" and closing.entry.kind == Kind.DIR


@pytest.mark.parametrize("changed", [False, True])
def test_the_root_times_are_restored_when_they_differ_or_something_inside_changed(tmp_path, changed):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write(src / "f", b"f")
    write(dst / "f", b"f")
    if changed:
        write(src / "f", b"new", T0 + 1)
    ops, _ = plan_all(src, dst)
    assert ([op.path for op in ops if op.kind == ATTRS] == [b""]) is changed


def test_names_whose_replica_file_had_other_names_or_a_directory_are_told_when_removed_or_replaced(tmp_path):
    """The live daemon needs them: a file written through such a name (or below such a
    directory) before it went may have had other names, which changed too, and no event
    names them."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    for root in (src, dst):
        write(root / "keep", b"the same")
        write(root / "plain", b"one name on the replica")
    write(dst / "linked", b"two names on the replica")
    os.link(dst / "linked", dst / "other-name")
    write(dst / "replaced", b"two names on the replica")
    os.link(dst / "replaced", dst / "its-other-name")
    write(src / "other-name", b"two names on the replica")
    write(src / "its-other-name", b"two names on the replica")
    write(src / "replaced", b"another file at that name")
    os.unlink(src / "plain")
    write(dst / "gone-dir" / "inside", b"a directory the source has no more")
    write(dst / "dir-to-file" / "inside", b"a directory that is a file on the source")
    write(src / "dir-to-file", b"a file")
    _, planner = plan_all(src, dst)
    assert sorted(planner.replaced) == [b"dir-to-file", b"gone-dir", b"linked", b"replaced"]
