"""The repository stands alone: no tracked file points at a document outside it.

A clone holds only what is tracked, so a reference to the workspace around the repository
(a sibling directory, a notes folder) is a dead link for every reader.  Scratch directories
of the benchmark machine (``/work/bench...``) in recorded commands and defaults are allowed:
they name where data was written, not something to read.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.helpers import REPO

# Built in two pieces so that this file does not match itself.
_OUTSIDE = re.compile(rb"\.\./" + rb"shared|(?<![\w.])/work/(?!bench)[\w.-]+")
# A relative reference to a Markdown document, e.g. docs/DESIGN.md or RESULTS.md (not part of
# an absolute path or a URL).
_MARKDOWN_REF = re.compile(rb"(?<![\w./:-])((?:[\w.-]+/)*[\w-]+\.md)\b")


def _tracked_text_files() -> dict[str, bytes]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (no list of tracked files)")
    files = {}
    for rel in filter(None, listed.decode().split("\0")):
        path = os.path.join(REPO, rel)
        if not os.path.isfile(path) or os.path.islink(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        if b"\0" not in data:
            files[rel] = data
    return files


def test_no_tracked_file_points_outside_the_repository():
    problems = []
    for rel, data in _tracked_text_files().items():
        for number, line in enumerate(data.splitlines(), 1):
            for match in _OUTSIDE.finditer(line):
                problems.append(f"{rel}:{number}: {match.group().decode(errors='replace')}")
    assert not problems, "references outside the repository:\n" + "\n".join(problems)


def test_every_markdown_document_named_exists_in_the_repository():
    files = _tracked_text_files()
    tracked = set(
        subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    )
    missing = []
    for rel, data in files.items():
        if rel == "tests/test_standalone.py":  # names the documents it checks for
            continue
        here = os.path.dirname(rel)
        for number, line in enumerate(data.splitlines(), 1):
            for match in _MARKDOWN_REF.finditer(line):
                name = match.group(1).decode()
                candidates = {os.path.normpath(os.path.join(here, name)), os.path.normpath(name)}
                if not candidates & tracked:
                    missing.append(f"{rel}:{number}: {name}")
    assert not missing, "Markdown documents named but not in the repository:\n" + "\n".join(missing)


def test_the_design_benchmark_and_history_documents_are_there():
    for name in ("DESIGN.md", "BENCHMARKS.md", "HISTORY.md", "PROTOCOL.md"):
        with open(os.path.join(REPO, "docs", name)) as f:
            assert len(f.read()) > 2000, f"docs/{name} is nearly empty"
    with open(os.path.join(REPO, "docs", "BENCHMARKS.md")) as f:
        text = f.read()
    for scenario in ("S1", "S1n", "S2", "S3", "S4", "S4d", "S5", "S6", "S7", "S8"):
        assert f"| {scenario} |" in text, f"docs/BENCHMARKS.md does not define {scenario}"


def test_no_two_test_modules_share_a_name():
    """The tests are no package: pytest imports each module by its file name, and a second
    module of the same name (tests/x/test_a.py beside tests/test_a.py) stops the collection
    of the whole run."""
    seen: dict[str, str] = {}
    for path in sorted(_tracked_text_files()):
        name = os.path.basename(path)
        if path.startswith("tests/") and name.startswith("test_") and name.endswith(".py"):
            assert name not in seen, f"{path} and {seen[name]} share a module name"
            seen[name] = path
