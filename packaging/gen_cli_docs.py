#!/usr/bin/env python3
"""Generate the man pages and shell completions of `mirror` and `hawrap` from their argument
parsers, so they cannot drift from the commands (tests/test_cli_docs.py checks they are
current).  argparse-manpage writes the pages, shtab the completions (both in the test extras).

    python packaging/gen_cli_docs.py           # rewrite packaging/man/ and packaging/completion/
    python packaging/gen_cli_docs.py --check   # exit 1, naming them, if any file is out of date

Install: man pages to /usr/local/share/man/man1/, completions to
/usr/local/share/bash-completion/completions/{mirror,hawrap} and a zsh fpath dir as _mirror, _hawrap.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# argparse words its help differently from one Python to the next: the files are generated
# with Debian 12's Python, which CI runs, and checked there.
GENERATED_WITH = (3, 11)
sys.path.insert(0, os.path.dirname(HERE))


def parsers():
    from hawrap.cli import build_parser
    from mirror.cli import full_parser

    return {"mirror": full_parser(), "hawrap": build_parser()}


def outputs() -> dict[str, str]:
    """Relative path under packaging/ -> content."""
    import shtab
    from argparse_manpage.manpage import Manpage

    from mirror import __version__

    out = {}
    for name, parser in parsers().items():
        page = Manpage(parser, _data={
            "project_name": "hamirror", "version": __version__, "date": f"hamirror {__version__}",
            "manual_title": "hamirror manual", "manual_section": 1,
        })  # fmt: skip
        out[f"man/{name}.1"] = str(page).rstrip("\n") + "\n"
        for shell, path in (("bash", f"completion/{name}.bash"), ("zsh", f"completion/_{name}")):
            out[path] = shtab.complete(parser, shell=shell).rstrip("\n") + "\n"
    return out


def main(argv: list[str]) -> int:
    os.environ["COLUMNS"] = "80"  # help text wrapped the same everywhere
    check = "--check" in argv
    stale = []
    for rel, text in outputs().items():
        path = os.path.join(HERE, rel)
        try:
            with open(path, encoding="utf-8") as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current == text:
            continue
        stale.append(rel)
        if not check:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
    if check and stale:
        print(f"out of date: {', '.join(stale)}; run python packaging/gen_cli_docs.py", file=sys.stderr)
        return 1
    for rel in stale:
        print(f"wrote packaging/{rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
