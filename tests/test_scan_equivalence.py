"""The compiled scan kernels and their pure-Python twins agree on every generated tree.

The walk (``mirror.scan.scan``) is run over each kernel: same listings (order, entries,
problems), same packed bytes, same digests, same comparison results, same verdict on packed
input (accepted as equal listings, or both rejected); the compiled background walk hands
over exactly the listings of the walk.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import tempfile
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirror import constants, fastpath
from mirror.exclude import Excluder
from mirror.scan import scan
from tests.helpers import changing, wait_until
from tests.trees import build, chain, tree_specs

FAST = fastpath.compiled("scan")
PURE = fastpath.pure("scan")
FLAGS = constants.CMP_OWNER | constants.CMP_DIR_TIMES | constants.CMP_LINK_TIMES

settings.register_profile("scan", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _snapshot(module, root: bytes, **kw):
    listings = scan(root, kernel=module, **kw)
    return [(lst.path, lst.complete, list(lst), list(lst.problems), lst.pack()) for lst in listings]


def _both(root: bytes, **kw):
    fast, pure = _snapshot(FAST, root, **kw), _snapshot(PURE, root, **kw)
    assert fast == pure
    return fast


@settings(settings.get_profile("scan"))
@given(spec=tree_specs(), checksum=st.booleans())
def test_scan_equivalent(spec, checksum):
    with tempfile.TemporaryDirectory() as tmp:
        root = os.fsencode(tmp)
        build(root, spec)
        result = _both(root, checksum=checksum)
        # Every entry of the tree is listed exactly once, in canonical order.
        paths = [p + b"/" + e.name if p else e.name for p, _, entries, _, _ in result for e in entries]
        on_disk = []
        for dirpath, dirnames, filenames in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            for n in dirnames + filenames:
                on_disk.append(n if rel == b"." else rel + b"/" + n)
        assert sorted(paths) == sorted(on_disk)
        assert [r[0].replace(b"/", b"\0") for r in result] == sorted(r[0].replace(b"/", b"\0") for r in result)


@settings(settings.get_profile("scan"))
@given(spec=tree_specs(), patterns=st.lists(st.sampled_from(["*", "a*", "/x*", "*/", "[a-c]?", "**/z", "\\*"]), max_size=3))
def test_scan_with_excludes_equivalent(spec, patterns):
    with tempfile.TemporaryDirectory() as tmp:
        root = os.fsencode(tmp)
        build(root, spec)
        _both(root, excluder=Excluder(patterns))


@settings(settings.get_profile("scan"))
@given(a=tree_specs(max_leaves=10), b=tree_specs(max_leaves=10), checksum=st.booleans())
def test_compare_listings_equivalent(a, b, checksum):
    flags = FLAGS | (constants.CMP_CHECKSUM if checksum else 0)
    with tempfile.TemporaryDirectory() as tmp:
        ra, rb = os.path.join(os.fsencode(tmp), b"a"), os.path.join(os.fsencode(tmp), b"b")
        os.mkdir(ra)
        os.mkdir(rb)
        build(ra, a)
        build(rb, b)
        fast_a = {lst.path: lst for lst in scan(ra, kernel=FAST, checksum=checksum)}
        fast_b = {lst.path: lst for lst in scan(rb, kernel=FAST, checksum=checksum)}
        pure_a = {lst.path: lst for lst in scan(ra, kernel=PURE, checksum=checksum)}
        pure_b = {lst.path: lst for lst in scan(rb, kernel=PURE, checksum=checksum)}
        for path in fast_a.keys() & fast_b.keys():
            got = FAST.compare_listings(fast_a[path], fast_b[path], flags)
            assert got == PURE.compare_listings(pure_a[path], pure_b[path], flags)


@settings(settings.get_profile("scan"))
@given(spec=tree_specs(max_leaves=12), touch=st.integers(min_value=0, max_value=5))
def test_digest_reuse_equivalent(spec, touch):
    """Digests adopted from a previous scan (and files hashed again) are the same in both."""
    with tempfile.TemporaryDirectory() as tmp:
        root = os.fsencode(tmp)
        files = build(root, spec)
        previous = list(scan(root, kernel=PURE, checksum=True))
        for rel in files[:touch]:
            with open(os.path.join(root, rel), "ab") as f:
                f.write(b"more")
        racy_ns = 1_000_000_000 * 10**9  # files with later mtimes are hashed again
        fast_prev = [FAST.Listing.unpack(lst.path, *lst.pack(), 10**6) for lst in previous]
        runs = {
            kernel: [(lst.path, list(lst), lst.hashed) for lst in scan(root, kernel=kernel, checksum=True,
                                                                         previous=prev, racy_ns=racy_ns)]
            for kernel, prev in ((FAST, fast_prev), (PURE, previous))
        }  # fmt: skip
        fast, pure = runs[FAST], runs[PURE]
        assert fast == pure


@settings(max_examples=300, deadline=None)
@given(
    strings=st.binary(max_size=40),
    records=st.binary(max_size=3 * 80).map(lambda b: b[: len(b) - len(b) % 80] if len(b) % 7 else b),
    digests=st.one_of(st.just(b""), st.binary(min_size=16, max_size=48)),
)
def test_unpack_verdict_equivalent(strings, records, digests):
    outcomes = []
    for module in (FAST, PURE):
        try:
            outcomes.append(("ok", list(module.Listing.unpack(b"d", strings, records, digests, 10))))
        except ValueError as exc:
            outcomes.append(("error", str(exc)))
    assert outcomes[0] == outcomes[1]


def test_unpack_roundtrip_of_real_tree(tmp_path):
    root = os.fsencode(tmp_path)
    build(root, {b"f": ("file", b"x", 0o644, 5), b"l": ("symlink", b"f"), b"d": ("dir", {}, 0o755)})
    for module in (FAST, PURE):
        for listing in scan(root, checksum=True, kernel=module):
            again = module.Listing.unpack(listing.path, *listing.pack(), 100)
            assert list(again) == list(listing)
            assert again.pack() == listing.pack()
    shutil.rmtree(tmp_path)


@settings(settings.get_profile("scan"))
@given(a=tree_specs(max_leaves=10), flags=st.integers(min_value=0, max_value=15))
def test_fingerprint_equivalent_and_faithful(a, flags):
    """Both twins give the same fingerprint; equal fingerprints mean compare_listings is silent."""
    with tempfile.TemporaryDirectory() as tmp:
        root = os.fsencode(tmp)
        build(root, a)
        checksum = bool(flags & constants.CMP_CHECKSUM)
        fast = list(scan(root, kernel=FAST, checksum=checksum))
        pure = list(scan(root, kernel=PURE, checksum=checksum))
        for f, p in zip(fast, pure, strict=True):
            assert f.fingerprint(flags) == p.fingerprint(flags)
            assert f.has_links() == p.has_links()
        # A copy with times and modes kept fingerprints the same; a change shows up.
        for f in fast:
            assert f.fingerprint(flags) == FAST.Listing.unpack(f.path, *f.pack(), 10**6).fingerprint(flags)


def test_fingerprint_sees_every_compared_field(tmp_path):
    from mirror.entry import Entry

    base = Entry(b"f", 1, 0o644, 1, 2, 10, 100, 200, 5, 6, 1, 0, b"", bytes(16))
    variants = {
        "mode": base._replace(mode=0o600), "uid": base._replace(uid=9), "size": base._replace(size=11),
        "mtime": base._replace(mtime_ns=101), "digest": base._replace(digest=b"\x01" * 16),
        "name": base._replace(name=b"g"),
    }  # fmt: skip
    flags = constants.CMP_OWNER | constants.CMP_CHECKSUM
    for module in (FAST, PURE):
        ref = module.Listing(b"", [base]).fingerprint(flags)
        for field, variant in variants.items():
            assert module.Listing(b"", [variant]).fingerprint(flags) != ref, field
        # Fields compare_listings ignores do not change it.
        assert module.Listing(b"", [base._replace(ino=77, ctime_ns=1, dev=3)]).fingerprint(flags) == ref


@settings(settings.get_profile("scan"))
@given(spec=tree_specs(max_leaves=12))
def test_scan_from_a_start_directory_equivalent(spec):
    """Scanning from ``start`` gives exactly the listings of that subtree in a full scan."""
    with tempfile.TemporaryDirectory() as tmp:
        root = os.fsencode(tmp)
        build(root, spec)
        full = _both(root)
        for path, complete, _entries, _, _ in full:
            if not path or not complete:
                continue
            sub = _both(root, start=path)
            expected = [x for x in full if x[0] == path or x[0].startswith(path + b"/")]
            assert [(x[0], x[2]) for x in sub] == [(x[0], x[2]) for x in expected]


def test_start_through_a_symlink_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink("real", tmp_path / "link")
    for module in (FAST, PURE):
        import pytest

        with pytest.raises(OSError):
            list(scan(os.fsencode(tmp_path), start=b"link", kernel=module))


def _walked(module, root: bytes, **kw):
    walk = module.background_scan(root, **kw)
    try:
        return [(lst.path, lst.complete, list(lst), list(lst.problems), lst.pack()) for lst in walk]
    finally:
        walk.close()


@settings(settings.get_profile("scan"))
@given(spec=tree_specs(), skip=st.sampled_from([None, b"a", b".mirror"]))
def test_background_scan_equivalent(spec, skip):
    """Both twins' background walks hand over exactly ``scan``'s listings, in order."""
    with tempfile.TemporaryDirectory() as tmp:
        root = os.fsencode(tmp)
        build(root, spec)
        expected = _both(root, skip_at_root=skip)
        assert _walked(FAST, root, skip_at_root=skip) == expected
        assert _walked(FAST, root, skip_at_root=skip, walkers=4, max_walkers=4) == expected
        assert _walked(FAST, root, skip_at_root=skip, walkers=2, max_walkers=2, _no_openat2=True) == expected
        assert _walked(PURE, root, skip_at_root=skip) == expected


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _threads() -> int:
    """Threads of this process, the compiled walkers (which Python does not see) included."""
    return len(os.listdir("/proc/self/task"))


def test_background_scan_walkers_are_joined_however_the_walk_ends(tmp_path):
    for i in range(50):
        os.makedirs(tmp_path / f"d{i:02d}" / "e")
    root = os.fsencode(tmp_path)
    before = _threads()
    walk = FAST.background_scan(root, walkers=6, max_walkers=6)
    assert walk.walkers == 6
    assert len(list(walk)) == 101
    walk.close()  # run to its end, then closed
    assert _threads() == before
    walk = FAST.background_scan(root, walkers=6, max_walkers=6)
    next(walk)
    walk.close()  # abandoned after one listing
    assert _threads() == before
    walk = FAST.background_scan(root, walkers=6, max_walkers=6)
    next(walk)
    del walk  # dropped without close(): freeing it stops and joins its walkers
    assert _threads() == before
    with pytest.raises(ValueError):
        FAST.background_scan(root, walkers=3, max_walkers=2)


def test_background_scan_closed_early_lets_go_of_everything(tmp_path):
    # A branch 40 levels deep holds 40 descriptors while it is walked.
    deep = tmp_path
    for i in range(40):
        deep = deep / f"d{i}"
        (deep / "x").mkdir(parents=True)
    root = os.fsencode(tmp_path)
    for module, walkers in ((FAST, 1), (FAST, 4), (PURE, 1)):
        before, threads = _open_fds(), _threads()
        walk = module.background_scan(root, walkers=walkers, max_walkers=walkers)
        first = next(walk)
        assert first.path == b"" and [e.name for e in first] == [b"d0"]
        walk.close()
        assert _open_fds() == before
        # pthread_join: the compiled walkers are gone when close() returns (a Python thread
        # may still be leaving the kernel after join()).
        assert module is PURE or _threads() == threads
        assert list(walk) == []  # closed: nothing more is handed over
        assert not [t for t in threading.enumerate() if t.name == "treescan"]


def test_background_scan_walks_paths_longer_than_path_max(tmp_path):
    """Walkers open a directory by its path from the root; past PATH_MAX (4,096 bytes) the
    kernel refuses a whole path, and the walk goes one component at a time instead."""
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(20):  # 20 levels of 250-byte names: a 5,000-byte relative path
            os.mkdir(b"n" * 250, dir_fd=fd)
            os.mknod(b"f", dir_fd=fd)
            child = os.open(b"n" * 250, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)
    root = os.fsencode(tmp_path)
    expected = _both(root)
    assert len(expected) == 21 and all(complete and not problems for _, complete, _, problems, _ in expected)
    for no_openat2 in (False, True):
        assert _walked(FAST, root, walkers=3, max_walkers=3, _no_openat2=no_openat2) == expected


def test_a_directory_too_deep_for_a_receiver_is_left_unlisted_by_every_walk(tmp_path):
    """A chain of directories a user made deeper than a walk lists (2,048 levels), or whose
    paths pass what a receiver takes (64 KiB), is not listed from the directory on where a
    name could pass the limit: that directory comes as incomplete, with a problem, in every
    walk and from every start, and the rest of the tree as usual."""
    root = os.fsencode(tmp_path)
    try:
        _too_deep_walks(root)
    finally:  # pytest's own clean-up (shutil.rmtree) recurses once per level
        subprocess.run(["rm", "-rf", "--", tmp_path / "levels", tmp_path / "long"], check=True)


def _too_deep_walks(root: bytes) -> None:
    for top in (b"levels", b"long", b"plain"):
        os.mkdir(os.path.join(root, top))
    levels = b"levels/" + chain(os.path.join(root, b"levels"), b"d", constants.LISTED_DEPTH_MAX + 5)
    long = b"long/" + chain(os.path.join(root, b"long"), b"n" * 250, 265)
    expected = _both(root)
    cut = [(path, problems) for path, complete, _, problems, _ in expected if not complete]
    first_unlisted_level = b"/".join(levels.split(b"/")[: constants.LISTED_DEPTH_MAX + 1])
    first_unlisted_long = b"/".join(long.split(b"/")[: 1 + (constants.LISTED_PATH_MAX - 5) // 251 + 1])
    assert [path for path, _ in cut] == [first_unlisted_level, first_unlisted_long]
    for path, problems in cut:
        assert [(p.path, p.errno) for p in problems] == [(path, errno.ENAMETOOLONG)]
        assert "too deep to mirror" in problems[0].message and problems[0].unreadable
    listed = [path for path, complete, *_ in expected if complete]  # every name in them fits
    assert max(len(p) for p in listed) <= constants.LISTED_PATH_MAX
    assert max(p.count(b"/") + 1 for p in listed) <= constants.LISTED_DEPTH_MAX
    assert max(len(p) for p, *_ in expected) <= constants.MAX_PATH_BYTES
    assert _walked(FAST, root) == expected
    assert _walked(FAST, root, walkers=3, max_walkers=3, _no_openat2=True) == expected
    assert _walked(PURE, root) == expected
    parent = first_unlisted_level.rpartition(b"/")[0]
    assert _both(root, start=parent) == [x for x in expected if x[0] == parent or x[0].startswith(parent + b"/")]
    assert _both(root, start=first_unlisted_level) == [x for x in expected if x[0] == first_unlisted_level]


def test_background_scan_errors_arrive_in_order(tmp_path):
    for module in (FAST, PURE):
        walk = module.background_scan(os.fsencode(tmp_path / "missing"))
        with pytest.raises(FileNotFoundError):
            next(walk)
        walk.close()
    (tmp_path / "a" / "inner").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    os.symlink("b", tmp_path / "c")
    root = os.fsencode(tmp_path)
    listings = {m: _walked(m, root) for m in (FAST, PURE)}
    assert listings[FAST] == listings[PURE]
    assert [x[0] for x in listings[FAST]] == [b"", b"a", b"a/inner", b"b"]  # the symlink is not followed


def test_background_scan_hands_over_a_directory_larger_than_its_lookahead(tmp_path):
    """The walk lists at most 65,536 entries ahead, yet a bigger directory still comes whole,
    and what follows it too."""
    big = tmp_path / "big"
    big.mkdir()
    for i in range(70_000):
        os.close(os.open(big / f"{i:05d}", os.O_CREAT | os.O_WRONLY, 0o644))
    (tmp_path / "next" / "after").mkdir(parents=True)
    for walkers in (1, 4):
        walk = FAST.background_scan(os.fsencode(tmp_path), walkers=walkers, max_walkers=walkers)
        try:
            got = [(lst.path, len(lst)) for lst in walk]
        finally:
            walk.close()
        assert got == [(b"", 2), (b"big", 70_000), (b"next", 1), (b"next/after", 0)]


def test_background_scan_of_a_tree_changing_under_it(tmp_path):
    """Directories vanish, turn into symlinks and come back while the walk runs: every walk
    ends, in canonical order, and a directory it could not list is said, never skipped."""
    root = os.fsencode(tmp_path)
    for i in range(30):
        os.makedirs(os.path.join(root, b"d%d" % i, b"sub"))

    def churn(n):
        d = os.path.join(root, b"d%d" % (n % 30))
        shutil.rmtree(d, ignore_errors=True)
        if n % 2:
            os.makedirs(os.path.join(d, b"sub"), exist_ok=True)
        else:
            try:
                os.symlink(b"/", d)
                os.unlink(d)
                os.makedirs(os.path.join(d, b"sub"), exist_ok=True)
            except FileExistsError:
                pass

    said = 0
    with changing(churn):
        for _ in range(40):
            for module, walkers in ((FAST, 1), (FAST, 4), (PURE, 1)):
                listings = _walked(module, root, walkers=walkers, max_walkers=walkers)
                keys = [path.replace(b"/", b"\0") for path, *_ in listings]
                assert keys == sorted(set(keys))
                for _path, complete, _entries, problems, _packed in listings:
                    assert complete or problems
                    said += not complete
    assert said  # the churn was seen: some directory vanished between its listing and its walk


def test_background_scan_never_follows_a_directory_swapped_for_a_symlink(tmp_path):
    """While the walk runs, directories of the tree are swapped for symlinks to a directory
    outside it (and back): a walker opens each directory by its path from the root, and no
    component of that path may be a symlink, so nothing outside is ever listed."""
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "OUTSIDE").write_bytes(b"")
    tree = tmp_path / "tree"
    for i in range(20):
        (tree / f"d{i:02d}" / "sub" / "deeper").mkdir(parents=True)
    root = os.fsencode(tree)

    def swap(n):
        d = tree / f"d{n % 20:02d}"
        parked = tmp_path / "parked"
        os.rename(d, parked)
        os.symlink(outside, d)
        os.unlink(d)
        os.rename(parked, d)

    seen = 0
    ways = [(FAST, {"walkers": 4, "max_walkers": 4}), (FAST, {"walkers": 4, "max_walkers": 4, "_no_openat2": True}),
            (FAST, {}), (PURE, {})]  # fmt: skip
    with changing(swap):
        for _ in range(40):
            for module, kw in ways:
                listings = _walked(module, root, **kw)
                for _path, complete, entries, problems, _packed in listings:
                    assert b"OUTSIDE" not in [e.name for e in entries]
                    assert complete or problems
                    seen += not complete
    assert seen  # some walks met a swapped directory


def test_background_scan_closed_from_another_thread_while_taken(tmp_path):
    """A scan abandoned from another thread (an error elsewhere in the sync) while its
    consumer is taking listings: the consumer just sees the end."""
    for i in range(200):
        os.makedirs(tmp_path / f"d{i:03d}" / "e")
    root = os.fsencode(tmp_path)
    for module, walkers in ((FAST, 1), (FAST, 4), (PURE, 1)):
        for _ in range(20):
            before = _open_fds()
            walk = module.background_scan(root, walkers=walkers, max_walkers=walkers)
            taken = []

            def take(walk=walk, taken=taken):
                for listing in walk:
                    taken.append(listing.path)

            consumer = threading.Thread(target=take)
            consumer.start()
            walk.close()
            consumer.join(10)
            assert not consumer.is_alive()
            assert taken == [p for p in _expected_paths(200)][: len(taken)]
            assert _open_fds() == before


def _expected_paths(n: int) -> list[bytes]:
    paths = [b""]
    for i in range(n):
        paths += [b"d%03d" % i, b"d%03d/e" % i]
    return paths


def _seen(listing):
    return None if listing is None else (listing.path, list(listing), list(listing.problems))


def _expected_pairs(ra: bytes, rb: bytes, flags: int):
    """``compare.align``'s pairs of two walks, without the pairs ``pair_walks`` leaves out."""
    from mirror.compare import align

    kept, skipped = [], [[0] * 9, [0] * 9]
    for a, b in align(scan(ra, kernel=PURE), scan(rb, kernel=PURE)):
        if (a is not None and b is not None and a.complete and b.complete and not a.problems
                and not b.problems and len(a) == len(b) and not PURE.compare_listings(a, b, flags)):
            for side, listing in ((0, a), (1, b)):
                counts, file_bytes, _ = listing.totals()
                skipped[side][0] += 1
                for kind in range(1, 8):
                    skipped[side][kind] += counts[kind]
                skipped[side][8] += file_bytes
            continue
        kept.append((_seen(a), _seen(b)))
    return kept, [(t[0], [0] + t[1:8], t[8]) for t in skipped]


@settings(settings.get_profile("scan"))
@given(a=tree_specs(max_leaves=12), b=tree_specs(max_leaves=12), flags=st.sampled_from([FLAGS, 0, constants.CMP_OWNER]),
       copy=st.booleans())  # fmt: skip
def test_pair_walks_equivalent(a, b, flags, copy):
    """Both kernels pair two walks exactly as ``align`` pairs them, leaving out the same
    identical directories, and count what they left out the same."""
    with tempfile.TemporaryDirectory() as tmp:
        ra, rb = os.path.join(os.fsencode(tmp), b"a"), os.path.join(os.fsencode(tmp), b"b")
        os.mkdir(ra)
        build(ra, a)
        if copy:  # the replica mostly identical (most pairs are left out), b added below it
            subprocess.run(["cp", "-a", os.fsdecode(ra), os.fsdecode(rb)], check=True)
            os.mkdir(os.path.join(rb, b"extra-extra"))
            build(os.path.join(rb, b"extra-extra"), b)
        else:
            os.mkdir(rb)
            build(rb, b)
        expected = _expected_pairs(ra, rb, flags)
        for module, kw in ((FAST, {}), (FAST, {"walkers": 3, "max_walkers": 3}), (PURE, {})):
            walks = [module.background_scan(r, **kw) for r in (ra, rb)]
            try:
                pairs = module.pair_walks(walks[0], walks[1], flags)
                got = [(_seen(x), _seen(y)) for x, y in pairs]
                assert (got, [pairs.skipped(0), pairs.skipped(1)]) == expected, module
            finally:
                for walk in walks:
                    walk.close()


def _walkers_asleep() -> bool:
    states = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/self/task/{task}/comm") as f:
                if f.read().strip() == "treescan":
                    states.append(fields[0])
        except FileNotFoundError:
            continue
    return bool(states) and all(state == "S" for state in states)


def _blocked_signals(task: str) -> int:
    with open(f"/proc/self/task/{task}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("SigBlk:")), 16)


def test_background_scan_with_its_lookahead_full_beyond_the_next_directory(tmp_path):
    """Two walkers: one lists a directory bigger than the lookahead while the other goes down a
    chain of directories before it (deeper than PATH_MAX: opened one component at a time, so
    slowly); then both stop for room with chain directories still to list before the big one.
    The consumer reaching those must get them listed, not wait for room that only its taking
    the big one would make.  Meanwhile the waiting walkers show their signal masks: every
    signal blocked (Python handles signals in the main thread; a walker must never take one)."""
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.mkdir(b"big", dir_fd=fd)
        big = os.open(b"big", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        for i in range(66_000):
            os.mknod(b"%05d" % i, dir_fd=big)
        os.close(big)
        os.mkdir(b"a", dir_fd=fd)
        chain = os.open(b"a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        for _ in range(_CHAIN):
            os.mkdir(_LINK, dir_fd=chain)
            child = os.open(_LINK, os.O_RDONLY | os.O_DIRECTORY, dir_fd=chain)
            os.close(chain)
            chain = child
        os.close(chain)
    finally:
        os.close(fd)
    threads_before = set(os.listdir("/proc/self/task"))
    walk = FAST.background_scan(os.fsencode(tmp_path), walkers=2, max_walkers=2)
    taken: list[bytes] = []
    consumer = threading.Thread(target=lambda: taken.extend(listing.path for listing in walk))
    try:
        wait_until(_walkers_asleep, timeout=60)  # the walk got as far as it can without us
        walkers = set(os.listdir("/proc/self/task")) - threads_before
        assert len(walkers) == 2
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE, signal.SIGALRM):
            assert all(_blocked_signals(task) >> (signum - 1) & 1 for task in walkers), signum
        consumer.start()
        consumer.join(120)
        assert not consumer.is_alive(), f"the walk stalled after {len(taken)} directories"
    finally:
        walk.close()
        if consumer.is_alive():
            consumer.join(10)
        _remove_chain(tmp_path / "a")  # too deep for shutil.rmtree's recursion
    assert len(taken) == 1 + 1 + _CHAIN + 1 and taken[-1] == b"big"


# "a/xxxxxxx/xxxxxxx/...": 8,000 bytes at the bottom, within the depth a walk lists
_CHAIN, _LINK = 1_000, b"x" * 7


def _remove_chain(path) -> None:
    """Remove a chain of single subdirectories ``_LINK`` (with files), bottom up, without recursion."""
    fds = [os.open(path, os.O_RDONLY | os.O_DIRECTORY)]
    while True:
        try:
            fds.append(os.open(_LINK, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fds[-1]))
        except FileNotFoundError:
            break
    while fds:
        fd = fds.pop()
        for name in os.listdir(fd):
            if name == os.fsdecode(_LINK):
                os.rmdir(name, dir_fd=fd)
            else:
                os.unlink(name, dir_fd=fd)
        os.close(fd)
    os.rmdir(path)
