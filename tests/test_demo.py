"""`mirror demo` runs end to end: every edit arrives and the trees end identical."""

from tests.helpers import run_mirror


def test_live_demo(tmp_path):
    proc = run_mirror("demo", "--dir", str(tmp_path / "demo"), timeout=300)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    out = proc.stdout.decode()
    assert "demo passed" in out and "identical" in out
    assert out.count(" ms  ") == 6 and "did not arrive" not in out
