"""`mirror demo` runs end to end and finds exactly the changes it made."""

from tests.helpers import run_mirror


def test_demo_finds_exactly_its_changes(tmp_path):
    proc = run_mirror("demo", "--dir", str(tmp_path / "demo"))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode()
    assert "all differences found exactly" in out
    assert out.count("[ok]") == 4 and "MISMATCH" not in out
    assert ">fc........" in out  # the same-size, same-mtime rewrite, found only by --checksum
