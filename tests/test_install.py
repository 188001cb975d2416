"""README's install and test commands, as a new user runs them.

The install command is run for real from a copy of the tracked files (what a clone holds)
into a fresh virtualenv; the installed `mirror` and `hawrap` then run a sync.  The system
packages come from the one list, packaging/debian-packages.txt, that README and .ci/run read.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import REPO

PACKAGES = os.path.join(REPO, "packaging", "debian-packages.txt")


def readme_block(name: str) -> list[str]:
    """The lines of README's fenced block marked ``<!-- readme-command: NAME -->``."""
    with open(os.path.join(REPO, "README.md")) as f:
        lines = f.read().splitlines()
    start = lines.index(f"<!-- readme-command: {name} -->")
    assert lines[start + 1].startswith("```"), f"the marker for {name!r} must precede a fenced block"
    end = lines.index("```", start + 2)
    return lines[start + 2 : end]


def packages(*roles: str) -> list[str]:
    """Package names of the given roles, parsed from the list the way its header describes."""
    names = []
    with open(PACKAGES) as f:
        for line in f:
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            assert len(fields) == 2 and fields[1] in ("build", "test", "bench"), (
                f"{PACKAGES}: bad line {line!r}"
            )
            assert "#" in line, f"{PACKAGES}: {fields[0]} has no comment saying why it is needed"
            if fields[1] in roles:
                names.append(fields[0])
    return names


def _apt_packages(command_line: str) -> list[str]:
    """The packages README's ``apt-get install -y $(awk ...)`` line installs, by running its
    ``$(...)`` part with the real shell and awk."""
    assert command_line.startswith("apt-get update && apt-get install -y $("), command_line
    substitution = command_line[command_line.index("$(") :]
    out = subprocess.run(
        ["bash", "-c", f"echo {substitution}"], cwd=REPO, capture_output=True, text=True, check=True
    )
    return out.stdout.split()


def test_readme_commands_install_the_listed_packages():
    install, test = readme_block("install"), readme_block("test")
    install_apt = [line for line in install if line.startswith("apt-get")]
    test_apt = [line for line in test if line.startswith("apt-get")]
    assert len(install_apt) == 1 and len(test_apt) == 1
    assert _apt_packages(install_apt[0]) == packages("build")
    assert _apt_packages(test_apt[0]) == packages("build", "test")
    assert {"python3-dev", "libxxhash-dev", "build-essential"} <= set(packages("build"))
    assert {"iputils-ping", "arping", "iproute2"} <= set(packages("test"))


def test_ci_runs_readme_test_command():
    """.ci/run extracts README's test block with its own shell function: it must see the same
    lines, and it installs no package list of its own."""
    with open(os.path.join(REPO, ".ci", "run")) as f:
        script = f.read()
    assert "apt-get" not in script.replace("README's", "")
    function = script[
        script.index("readme_block() {") : script.index("\n}\n", script.index("readme_block() {")) + 3
    ]
    out = subprocess.run(
        ["bash", "-c", function + "readme_block test"], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.splitlines() == readme_block("test")
    assert "MIRROR_REQUIRE_FAST=1" in script and "ruff check ." in script


def _missing_packages(names: list[str]) -> list[str]:
    missing = []
    for name in names:
        r = subprocess.run(["dpkg-query", "-W", "-f", "${Status}", name], capture_output=True, text=True)
        if r.returncode != 0 or "install ok installed" not in r.stdout:
            missing.append(name)
    return missing


def _tracked_copy(dest: str) -> None:
    """The files a clone of this checkout would hold (tracked, as they are now on disk)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in filter(None, listed.decode().split("\0")):
        src = os.path.join(REPO, rel)
        if not os.path.lexists(src):  # deleted in the work tree, not yet committed
            continue
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(src, target, follow_symlinks=False)


@pytest.mark.timeout(900)
def test_fresh_virtualenv_from_readme_install_command(tmp_path):
    if shutil.which("dpkg-query") is None or shutil.which("git") is None:
        pytest.skip("needs dpkg-query (a Debian system) and git (a clone of the repository)")
    if not os.path.isdir(os.path.join(REPO, ".git")) and not os.path.isfile(os.path.join(REPO, ".git")):
        pytest.skip("not a git checkout: no list of tracked files to copy")
    missing = _missing_packages(packages("build"))
    if missing:
        pytest.skip(f"system packages missing: {' '.join(missing)} (README's install command installs them)")
    checkout = tmp_path / "hamirror"
    _tracked_copy(str(checkout))
    # Everything but the apt-get line (checked above: root and the network are not this test's
    # business), exactly as README has it, in a login-like environment without our virtualenv.
    steps = [line for line in readme_block("install") if line and not line.startswith(("#", "apt-get"))]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    venv_bin = os.path.dirname(sys.executable)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env["MIRROR_REQUIRE_FAST"] = "1"  # the compiled modules must have been built
    env["HOME"] = str(tmp_path)
    proc = subprocess.run(["bash", "-e", "-c", "\n".join(steps)], cwd=checkout, env=env, capture_output=True,
                          text=True, timeout=840)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "demo passed" in proc.stdout

    bin_dir = checkout / ".venv" / "bin"
    version = subprocess.run(
        [bin_dir / "mirror", "--version"], env=env, capture_output=True, text=True, timeout=60
    )
    assert version.returncode == 0 and version.stdout.startswith("mirror (hamirror) "), version
    helped = subprocess.run(
        [bin_dir / "hawrap", "--help"], env=env, capture_output=True, text=True, timeout=60
    )
    assert helped.returncode == 0 and "failover" in helped.stdout, helped

    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"hello\n")
    (src / "sub" / "b.bin").write_bytes(os.urandom(300_000))
    os.symlink("a.txt", src / "link")
    synced = subprocess.run(
        [bin_dir / "mirror", "sync", src, dst], env=env, capture_output=True, text=True, timeout=60
    )
    assert synced.returncode == 0, synced
    diff = subprocess.run([bin_dir / "mirror", "diff", "--checksum", src, dst], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert diff.returncode == 0 and diff.stdout == "", diff
    # Installed, not run from the checkout: the package lives in the virtualenv.
    where = subprocess.run([bin_dir / "python", "-c", "import mirror; print(mirror.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "site-packages" in where.stdout, where
