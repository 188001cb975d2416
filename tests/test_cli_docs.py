"""The committed man pages and shell completions are those the parsers generate today."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

SCRIPT = os.path.join(REPO, "packaging", "gen_cli_docs.py")
sys.path.insert(0, os.path.join(REPO, "packaging"))
import gen_cli_docs  # noqa: E402

pytest.importorskip("argparse_manpage")
pytest.importorskip("shtab")


@pytest.mark.skipif(sys.version_info[:2] != gen_cli_docs.GENERATED_WITH,
                    reason=f"generated with Python {gen_cli_docs.GENERATED_WITH}, whose argparse words help "
                           "its own way")  # fmt: skip
def test_man_pages_and_completions_are_current():
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--check"], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr


def test_they_cover_every_command_and_option():
    from hawrap.cli import COMMAND_HELP
    from mirror.cli import COMMANDS

    files = gen_cli_docs.outputs()
    mirror_page, hawrap_page = files["man/mirror.1"], files["man/hawrap.1"]
    for name in COMMANDS:
        assert f"'mirror {name}'" in mirror_page and name in files["completion/mirror.bash"], name
    for name in COMMAND_HELP:
        roff = name.replace("-", "\\-")  # roff escapes the hyphen
        assert f"'hawrap {roff}'" in hawrap_page and name in files["completion/_hawrap"], name
    for option in ("bwlimit", "mkpath", "check", "secret\\-file"):
        assert f"\\-\\-{option}" in mirror_page, option
    assert "Exit status: 0 valid; 2 invalid" in hawrap_page.replace("\n", " ")
    assert "--mkpath" in files["completion/mirror.bash"]
