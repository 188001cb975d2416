"""The kernels are bound once, built from the shared constants, and the production path
never loads a pure-Python twin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mirror import constants, fastpath
from mirror.entry import Kind
from tests.helpers import REPO


@pytest.mark.parametrize("name", ["scan", "delta"])
def test_compiled_kernels_are_built_from_mirror_constants(name):
    """``constants.pxi`` is generated from ``mirror/constants.py``; a stale build fails here."""
    assert fastpath.compiled(name).COMPILED_CONSTANTS == constants.all_constants()


def test_python_takes_its_kinds_and_record_layout_from_the_constants():
    assert {k.name: int(k) for k in Kind} == {
        name: getattr(constants, name)
        for name in ("FILE", "DIR", "SYMLINK", "FIFO", "SOCKET", "CHAR", "BLOCK")
    }
    assert fastpath.pure("scan").RECORD.size == constants.RECORD_SIZE


def test_engines_use_the_kernel_fastpath_bound():
    from mirror import delta, scan

    assert scan._kernel is fastpath.kernel("scan") and delta._kernel is fastpath.kernel("delta")
    forced_pure = fastpath.env_flag("MIRROR_FORCE_PURE")
    assert fastpath.is_fast("scan") is fastpath.is_fast("delta") is not forced_pure


# Every path of the product that touches a kernel, run in one fresh interpreter: diffs (plain,
# --checksum twice, with excludes, against a saved manifest), a local sync, a sync to a
# receiver that sends deltas, a live session's scoped scan, and the rdiff-style commands.
_EXERCISE = textwrap.dedent(
    r"""
    import json, os, sys, threading
    work = sys.argv[1]
    src, dst, rep = (os.path.join(work, n) for n in ("src", "dst", "rep"))
    for root in (src, dst, rep):
        os.makedirs(os.path.join(root, "sub"))
    for root, fill in ((src, b"a"), (rep, b"b")):
        with open(os.path.join(root, "big"), "wb") as f:
            f.write(fill * (300 << 10) + b"end")  # over the delta threshold
        with open(os.path.join(root, "sub", "small"), "wb") as f:
            f.write(fill)
    from mirror.cli import main
    codes = [
        main(["diff", src, dst]),
        main(["diff", "--checksum", src, dst]),
        main(["diff", "--checksum", src, dst]),
        main(["diff", "--exclude", "small", src, dst]),
        main(["scan", "--save", os.path.join(work, "m"), src]),
        main(["diff", os.path.join(work, "m"), dst]),
        main(["sync", "--delete", src, dst]),
        main(["signature", os.path.join(rep, "big"), os.path.join(work, "sig")]),
        main(["delta", os.path.join(work, "sig"), os.path.join(src, "big"), os.path.join(work, "dlt")]),
        main(["patch", os.path.join(rep, "big"), os.path.join(work, "dlt"), os.path.join(work, "out")]),
    ]
    import mirror
    secret = os.path.join(work, "secret")
    with open(secret, "wb") as f:
        f.write(b"kernel-test-secret-0123456789\n")
    os.chmod(secret, 0o600)
    server = mirror.MirrorServer(("127.0.0.1", 0), {"m": mirror.ModuleConfig(
        "m", os.fsencode(rep), secret=b"kernel-test-secret-0123456789")})
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        result = mirror.sync(src, f"mirror://127.0.0.1:{server.port}/m", secret_file=secret)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    from mirror.treescan import Scope, TreeScan
    scoped = [len(listing) for listing in TreeScan(os.fsencode(src), scope=Scope(entries=[b"big", b"sub/small"]))]
    print(json.dumps({
        "codes": codes, "sync": result.exit_code, "deltas": result.stats.files_delta, "scoped": scoped,
        "twins": sorted(m for m in sys.modules if m.startswith("mirror.") and m.endswith("_py")),
    }))
    """
)


def _exercise(tmp_path, **env_flags) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MIRROR_FORCE_PURE", "MIRROR_REQUIRE_FAST")}
    env.update(env_flags)
    proc = subprocess.run([sys.executable, "-c", _EXERCISE, str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_production_path_never_imports_a_pure_twin(tmp_path):
    got = _exercise(tmp_path, MIRROR_REQUIRE_FAST="1")
    assert got["codes"] == [1, 1, 1, 1, 0, 1, 0, 0, 0, 0]
    assert got["sync"] == 0 and got["deltas"] == 1 and got["scoped"] == [1, 1]
    assert got["twins"] == []


def test_forcing_the_twins_loads_them(tmp_path):
    """The check above can fail: the same paths on the twins show both in sys.modules."""
    got = _exercise(tmp_path, MIRROR_FORCE_PURE="1")
    assert got["codes"] == [1, 1, 1, 1, 0, 1, 0, 0, 0, 0] and got["deltas"] == 1
    assert got["twins"] == ["mirror.delta_py", "mirror.scan_py"]
