"""The ``lingua-scheduler`` command: ``serve`` and the simulators."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import click

from lingua_scheduler.config import Config, load_config
from lingua_scheduler.errors import ConfigError


def _load(config_file: str | None, host: str | None, port: int | None) -> Config:
    overrides: dict[str, dict[str, Any]] = {"server": {}}
    if host is not None:
        overrides["server"]["host"] = host
    if port is not None:
        overrides["server"]["port"] = port
    try:
        return load_config(config_file, overrides=overrides)
    except ConfigError as exc:
        click.echo(f"lingua-scheduler: invalid configuration: {exc}", err=True)
        sys.exit(2)


@click.group()
@click.version_option(package_name="lingua-scheduler")
def main() -> None:
    """Central scheduler of a distributed real-time speech-translation platform."""


@main.command()
@click.option("--host", default=None, help="Address to listen on (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port to listen on (default 5010).")
@click.option(
    "--config", "config_file", type=click.Path(dir_okay=False), default=None, help="TOML configuration file."
)
def serve(host: str | None, port: int | None, config_file: str | None) -> None:
    """Start the scheduler (embedded in-memory state)."""
    from lingua_scheduler.server.app import run
    from lingua_scheduler.server.logs import setup_logging

    config = _load(config_file, host, port)
    setup_logging(config.server.log_level, config.server.log_levels)
    run(config)


@main.command("config-defaults")
def config_defaults() -> None:
    """Print every configuration key with its default, as commented TOML."""
    from lingua_scheduler.config import render_defaults

    click.echo(render_defaults(), nl=False)


@main.command("simulate-nodes")
@click.option("--count", type=int, default=10, show_default=True)
@click.option("--url", default="ws://127.0.0.1:5010/ws/node", show_default=True)
@click.option("--duration", type=float, default=None, help="Stop after this many seconds.")
@click.option(
    "--interval",
    type=float,
    default=None,
    help="Heartbeat interval in seconds (default: what the scheduler asks for).",
)
@click.option("--seed", type=int, default=0, show_default=True)
def simulate_nodes(count: int, url: str, duration: float | None, interval: float | None, seed: int) -> None:
    """Register COUNT simulated nodes with varied capabilities and keep them heartbeating."""
    from lingua_scheduler.sim.nodes import run_fleet

    asyncio.run(run_fleet(url, count, duration=duration, interval=interval, seed=seed, report=click.echo))


@main.command("simulate-sessions")
@click.option("--count", type=int, default=5, show_default=True)
@click.option("--utterances", type=int, default=5, show_default=True)
@click.option("--url", default="ws://127.0.0.1:5010/ws/session", show_default=True)
@click.option("--src-lang", default="en", show_default=True)
@click.option("--tgt-lang", default="zh", show_default=True)
def simulate_sessions(count: int, utterances: int, url: str, src_lang: str, tgt_lang: str) -> None:
    """Stream synthetic audio from COUNT sessions and check every utterance gets an answer."""
    from lingua_scheduler.sim.sessions import run_sessions

    summary = asyncio.run(run_sessions(url, count, utterances, src_lang=src_lang, tgt_lang=tgt_lang))
    click.echo(summary)
    sys.exit(0 if summary["unanswered"] == 0 and summary["duplicates"] == 0 else 1)
