"""The shipped example configuration is exactly the documented defaults, and loads back to them."""

from __future__ import annotations

from pathlib import Path

from lingua_scheduler.config import Config, load_config, render_defaults

EXAMPLE = Path(__file__).resolve().parents[2] / "lingua-scheduler.example.toml"


def test_example_file_is_current() -> None:
    assert EXAMPLE.read_text() == render_defaults(), (
        "lingua-scheduler.example.toml is stale: run `lingua-scheduler config-defaults > "
        "lingua-scheduler.example.toml`"
    )


def test_example_loads_to_defaults() -> None:
    assert load_config(EXAMPLE, env={}) == Config()
