"""docs/configuration.md lists every ``serve`` flag, as click declares it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest

from lingua_scheduler.cli import serve
from lingua_scheduler.cli_docs import BEGIN, END, render_serve_flags, rewrite

PAGE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def _block(page: str) -> str:
    return page[page.index(BEGIN) + len(BEGIN) : page.index(END)]


def test_configuration_page_lists_the_serve_flags_click_declares() -> None:
    assert _block(PAGE.read_text()) == "\n" + render_serve_flags(), (
        "docs/configuration.md lists stale serve flags: run "
        "`.venv/bin/python -m lingua_scheduler.cli_docs docs/configuration.md`"
    )


def test_every_serve_option_is_a_row_of_the_page() -> None:
    # independent of the renderer: each long flag click knows has a row of its own
    rows = [line for line in _block(PAGE.read_text()).splitlines() if line.startswith("| `--")]
    flags = [opt for p in serve.params for opt in p.opts if opt.startswith("--")]
    assert len(flags) >= 9
    for flag in flags:
        assert any(row.startswith(f"| `{flag}") for row in rows), flag
    assert len(rows) == len([p for p in serve.params if isinstance(p, click.Option) and not p.hidden])


def test_rendering_follows_the_command_and_escapes_pipes() -> None:
    @click.command()
    @click.option("--alpha", type=int, help="First | second.")
    @click.option("--beta", is_flag=True, help="A flag.")
    @click.option("--secret", hidden=True)
    def cmd(alpha: int, beta: bool, secret: str) -> None: ...

    assert render_serve_flags(cmd).splitlines()[2:] == [
        r"| `--alpha INTEGER` | First \| second. |",
        "| `--beta` | A flag. |",
    ]


def test_rewrite_replaces_only_the_block() -> None:
    page = f"intro\n{BEGIN}\nold table\n{END}\noutro\n"
    assert rewrite(page, "new\n") == f"intro\n{BEGIN}\nnew\n{END}\noutro\n"
    with pytest.raises(ValueError, match="markers"):
        rewrite("no markers here\n", "new\n")


def test_regenerating_from_the_command_line(tmp_path: Path) -> None:
    page = tmp_path / "configuration.md"
    page.write_text(f"# Title\n{BEGIN}\n| stale |\n{END}\nrest\n")
    done = subprocess.run(
        [sys.executable, "-m", "lingua_scheduler.cli_docs", str(page)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert page.read_text() == f"# Title\n{BEGIN}\n{render_serve_flags()}{END}\nrest\n"
    missing = subprocess.run(
        [sys.executable, "-m", "lingua_scheduler.cli_docs", str(tmp_path / "absent.md")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode == 1 and "absent.md" in missing.stderr
