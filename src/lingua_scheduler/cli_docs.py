"""The table of ``lingua-scheduler serve`` flags in ``docs/configuration.md``, rendered from click.

Owns the rendering of that table (from the options click itself declares, with the same names,
metavars and help texts as ``serve --help``) and the rewrite of the generated block between its two
markers. A test compares the block with the rendering, so a flag added to ``serve`` without
regenerating the page fails the suite. Regenerate with::

    .venv/bin/python -m lingua_scheduler.cli_docs docs/configuration.md

Must never: touch anything in the page outside the markers, or list a flag click does not declare.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from lingua_scheduler.cli import serve

BEGIN = (
    "<!-- serve-flags: generated from the code; do not edit, run"
    " `.venv/bin/python -m lingua_scheduler.cli_docs docs/configuration.md` -->"
)
END = "<!-- /serve-flags -->"


def render_serve_flags(command: click.Command = serve) -> str:
    """The markdown table of the command's options (``--help`` excluded), in declaration order."""
    ctx = click.Context(command, info_name=command.name)
    rows = ["| Flag | What it does |", "|---|---|"]
    for param in command.params:
        record = param.get_help_record(ctx)
        if record is None:  # hidden options, and arguments (which have no help record)
            continue
        flag, text = record
        cell = text.replace("|", "\\|")  # a pipe would end the table cell
        rows.append(f"| `{flag}` | {cell} |")
    return "\n".join(rows) + "\n"


def rewrite(page: str, table: str) -> str:
    """``page`` with the text between the markers replaced by ``table``; ValueError without markers."""
    start, end = page.find(BEGIN), page.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the page lacks the markers {BEGIN!r} ... {END!r}")
    return page[: start + len(BEGIN)] + "\n" + table + page[end:]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m lingua_scheduler.cli_docs docs/configuration.md", file=sys.stderr)
        return 2
    path = Path(argv[0])
    try:
        path.write_text(rewrite(path.read_text(), render_serve_flags()))
    except (OSError, ValueError) as exc:
        print(f"lingua_scheduler.cli_docs: {path}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
