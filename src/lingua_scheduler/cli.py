"""The ``lingua-scheduler`` command: ``serve`` and the simulators."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import click

from lingua_scheduler.config import Config, load_config
from lingua_scheduler.errors import ConfigError


def _load(
    config_file: str | None,
    host: str | None,
    port: int | None,
    cluster: dict[str, Any] | None = None,
    extra: dict[str, dict[str, Any]] | None = None,
    server: dict[str, Any] | None = None,
) -> Config:
    try:
        return _loader(config_file, host, port, cluster, extra, server)()
    except ConfigError as exc:
        click.echo(f"lingua-scheduler: invalid configuration: {exc}", err=True)
        sys.exit(2)


def _loader(
    config_file: str | None,
    host: str | None,
    port: int | None,
    cluster: dict[str, Any] | None = None,
    extra: dict[str, dict[str, Any]] | None = None,
    server: dict[str, Any] | None = None,
) -> Callable[[], Config]:
    """Builds the configuration from the file, the environment and these flags; again on each call
    (``serve`` reloads with it on SIGHUP). Raises ``ConfigError``."""
    overrides: dict[str, dict[str, Any]] = {
        "server": dict(server or {}),
        "cluster": cluster or {},
        **(extra or {}),
    }
    if host is not None:
        overrides["server"]["host"] = host
    if port is not None:
        overrides["server"]["port"] = port
    return lambda: load_config(config_file, overrides=overrides)


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
@click.option("--redis-url", default=None, help="Share state through Redis (multi-instance mode).")
@click.option("--redis-cluster", is_flag=True, default=None, help="The Redis URL is a Redis Cluster node.")
@click.option("--instance-id", default=None, help="This instance's id (default: hostname-pid-random).")
@click.option(
    "--tls-cert", type=click.Path(dir_okay=False), default=None, help="PEM certificate: serve wss/https."
)
@click.option("--tls-key", type=click.Path(dir_okay=False), default=None, help="PEM key of --tls-cert.")
@click.option(
    "--insecure-dev",
    is_flag=True,
    default=False,
    help="Accept every node and session even with [auth] configured (local development only).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default=None,
    help="Root log level (default info; server.log_level).",
)
@click.option(
    "--log-format",
    type=click.Choice(["auto", "text", "json"]),
    default=None,
    help="Log lines: readable text or JSON objects (default auto: text on a terminal, JSON otherwise).",
)
@click.option("--debug", is_flag=True, default=False, help="Show the Python traceback when the start fails.")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Run this many instances behind the one port (SO_REUSEPORT), supervised by this process: "
    "one per core. Above 1 it requires --redis-url (the instances share their state through Redis).",
)
@click.option(
    "--reuse-port",
    is_flag=True,
    default=False,
    help="Bind the port with SO_REUSEPORT, sharing it with other instances that do (what each worker of "
    "--workers does; also for instances started by another supervisor, e.g. systemd).",
)
def serve(
    host: str | None,
    port: int | None,
    config_file: str | None,
    redis_url: str | None,
    redis_cluster: bool | None,
    instance_id: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    insecure_dev: bool,
    log_level: str | None,
    log_format: str | None,
    debug: bool,
    workers: int,
    reuse_port: bool,
) -> None:
    """Start the scheduler (embedded in-memory state unless --redis-url is given).

    A start that cannot go on prints one line saying why and exits with status 2 (configuration:
    flags, file, environment variables) or 1 (this machine: a port taken, no permission)."""
    from lingua_scheduler.server.logs import setup_logging
    from lingua_scheduler.server.startup import StartupError, exit_code, explain
    from lingua_scheduler.server.startup import serve as run_server

    cluster = {
        k: v
        for k, v in (("redis_url", redis_url), ("redis_cluster", redis_cluster), ("instance_id", instance_id))
        if v is not None
    }
    extra: dict[str, dict[str, Any]] = {}
    if tls_cert is not None or tls_key is not None:
        extra["tls"] = {"cert_file": tls_cert or "", "key_file": tls_key or ""}
    if insecure_dev:
        extra["auth"] = {"insecure_dev": True}
    logging_flags = {k: v for k, v in (("log_level", log_level), ("log_format", log_format)) if v is not None}
    config = _load(config_file, host, port, cluster, extra, logging_flags)
    server = config.server
    setup_logging(server.log_level, server.log_levels, server.log_format)
    if workers > 1:
        sys.exit(_supervise(config, workers))
    try:
        run_server(
            config,
            reload=_loader(config_file, host, port, cluster, extra, logging_flags),
            reuse_port=reuse_port,
        )
    except (StartupError, ConfigError) as exc:  # ConfigError: what only loads at start (TLS, Redis URL)
        if debug:
            raise
        click.echo(explain(exc), err=True)
        sys.exit(exit_code(exc))


def _supervise(config: Any, workers: int) -> int:
    """``serve --workers N``: reserve the port, run N ``serve`` workers (server/workers.py)."""
    from lingua_scheduler.server.startup import check_redis_url
    from lingua_scheduler.server.workers import Supervisor, reserve_port

    if not config.cluster.redis_url:
        click.echo(
            "lingua-scheduler serve: --workers above 1 requires --redis-url (cluster.redis_url): the "
            "instances share their nodes, sessions and jobs through Redis.",
            err=True,
        )
        return 2
    try:
        check_redis_url(config.cluster.redis_url)
        held = reserve_port(config.server.host, config.server.port)
    except OSError as exc:
        click.echo(f"lingua-scheduler serve: cannot hold port {config.server.port}: {exc}", err=True)
        return 1
    except Exception as exc:  # ConfigError of a malformed Redis URL
        click.echo(f"lingua-scheduler serve: {exc}", err=True)
        return 2
    with held:
        args = sys.argv[sys.argv.index("serve") + 1 :] if "serve" in sys.argv else []
        return Supervisor(args, workers, held.getsockname()[1]).run()


@main.command("config-defaults")
def config_defaults() -> None:
    """Print every configuration key with its default, as commented TOML."""
    from lingua_scheduler.config import render_defaults

    click.echo(render_defaults(), nl=False)


@main.command("api-key")
@click.option("--tenant", "tenant_id", required=True, help="Tenant the key belongs to.")
def api_key(tenant_id: str) -> None:
    """Print a new random API key for a tenant and the [[auth.tenants]] entry to configure (its hash).

    The key is shown once: give it to the tenant; the configuration keeps only its SHA-256."""
    import secrets

    from lingua_scheduler.config import _toml_value
    from lingua_scheduler.core.auth import hash_api_key

    key = secrets.token_urlsafe(32)
    click.echo(f"# API key for tenant {tenant_id} (give it to the tenant; it is not stored anywhere):")
    click.echo(f"# {key}")
    click.echo("[[auth.tenants]]")
    click.echo(f"tenant_id = {_toml_value(tenant_id)}")
    click.echo(f'key_sha256 = "{hash_api_key(key)}"')
    click.echo("max_sessions = 0  # concurrent sessions, across all instances; 0 = unlimited")
    click.echo("max_jobs_per_second = 0  # token bucket, across all instances; 0 = unlimited")


def _client_tls_options(f: Any) -> Any:
    """--ca-file and --insecure, for the client commands (simulators and load test)."""
    f = click.option(
        "--insecure",
        is_flag=True,
        default=False,
        help="Do not verify the scheduler's TLS certificate (self-signed test certificates only).",
    )(f)
    return click.option(
        "--ca-file",
        type=click.Path(dir_okay=False),
        default=None,
        help="PEM file of the CA (or the self-signed certificate) to trust for wss:// and https://.",
    )(f)


def _run_client(command: str, run: Callable[[], Coroutine[Any, Any, dict[str, Any]]]) -> dict[str, Any]:
    """Run a simulator to its summary; an unreachable scheduler (or an unreadable --ca-file: ``run``
    is called inside, so its arguments are too) is one line on stderr and exit 3, Ctrl-C exit 130."""
    from lingua_scheduler.sim.reach import Unreachable

    try:
        return asyncio.run(run())
    except Unreachable as exc:
        click.echo(f"lingua-scheduler {command}: {exc}", err=True)
        sys.exit(3)
    except KeyboardInterrupt:
        sys.exit(130)


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
@click.option(
    "--enrollment-secret",
    envvar="LINGUA_AUTH__NODE_ENROLLMENT_SECRET",
    default=None,
    help="Fleet enrollment secret, when the scheduler requires one (default: the scheduler's env var).",
)
@click.option(
    "--timeout", type=float, default=10.0, show_default=True, help="Seconds to connect and register."
)
@_client_tls_options
def simulate_nodes(
    count: int,
    url: str,
    duration: float | None,
    interval: float | None,
    seed: int,
    enrollment_secret: str | None,
    timeout: float,
    ca_file: str | None,
    insecure: bool,
) -> None:
    """Register COUNT simulated nodes with varied capabilities and keep them heartbeating.

    Prints one JSON line when registration is over (registered, refused with the scheduler's error
    code and message, unreachable) and one when it stops. Exit status: 0 when at least one node
    registered, 1 when none did, 3 when the scheduler cannot be reached (one line on stderr)."""
    from lingua_scheduler.sim.nodes import run_fleet
    from lingua_scheduler.sim.reach import client_ssl_context

    summary = _run_client(
        "simulate-nodes",
        lambda: run_fleet(
            url,
            count,
            duration=duration,
            interval=interval,
            seed=seed,
            report=click.echo,
            enrollment_secret=enrollment_secret,
            ssl_context=client_ssl_context(ca_file, insecure),
            timeout=timeout,
        ),
    )
    sys.exit(0 if summary["registered"] else 1)


@main.command("simulate-sessions")
@click.option("--count", type=int, default=5, show_default=True)
@click.option("--utterances", type=int, default=5, show_default=True)
@click.option("--url", default="ws://127.0.0.1:5010/ws/session", show_default=True)
@click.option("--src-lang", default="en", show_default=True)
@click.option("--tgt-lang", default="zh", show_default=True)
@click.option("--api-key", envvar="LINGUA_API_KEY", default=None, help="Tenant API key (or $LINGUA_API_KEY).")
@click.option(
    "--timeout",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds to open a session, and to wait for its close ack.",
)
@click.option(
    "--room-size",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Members per room (1: no rooms); every member hears the others' utterances.",
)
@click.option(
    "--room-langs",
    default="",
    help="Comma-separated preferred languages of the members, in turn (default: each its --tgt-lang).",
)
@_client_tls_options
def simulate_sessions(
    count: int,
    utterances: int,
    url: str,
    src_lang: str,
    tgt_lang: str,
    api_key: str | None,
    timeout: float,
    room_size: int,
    room_langs: str,
    ca_file: str | None,
    insecure: bool,
) -> None:
    """Stream synthetic audio from COUNT sessions and check every utterance gets an answer.

    Prints the summary as one JSON line. Exit status: 0 when at least one session opened and every
    utterance got exactly one answer, 1 otherwise, 3 when the scheduler cannot be reached (one line
    on stderr)."""
    from lingua_scheduler.sim.reach import client_ssl_context
    from lingua_scheduler.sim.sessions import run_sessions

    summary = _run_client(
        "simulate-sessions",
        lambda: run_sessions(
            url,
            count,
            utterances,
            src_lang=src_lang,
            tgt_lang=tgt_lang,
            api_key=api_key,
            report=click.echo,
            ssl_context=client_ssl_context(ca_file, insecure),
            timeout=timeout,
            room_size=room_size,
            room_langs=tuple(x.strip() for x in room_langs.split(",") if x.strip()),
        ),
    )
    room = summary.get("room", {"unanswered": 0, "duplicates": 0})
    ok = (
        summary["opened"] > 0
        and summary["unanswered"] == 0
        and summary["duplicates"] == 0
        and room["unanswered"] == 0
        and room["duplicates"] == 0
    )
    sys.exit(0 if ok else 1)


@main.command()
@click.option("--nodes", type=int, default=100, show_default=True, help="Simulated nodes.")
@click.option("--sessions", type=int, default=10, show_default=True, help="Simulated client sessions.")
@click.option("--duration", type=float, default=30.0, show_default=True, help="Measurement window, seconds.")
@click.option(
    "--url",
    default=None,
    help="Base URL of a running scheduler (http://127.0.0.1:5010). Default: start one in a subprocess.",
)
@click.option("--warmup", type=float, default=3.0, show_default=True, help="Seconds before the window.")
@click.option("--rate", type=float, default=None, help="Offered utterances/s, all sessions.")
@click.option(
    "--session-mode",
    type=click.Choice(["mixed", "stream", "utterance"]),
    default="mixed",
    show_default=True,
    help="Streamed audio chunks, one-shot utterances, or half of each.",
)
@click.option("--utterance-ms", type=int, default=1000, show_default=True, help="Audio per utterance.")
@click.option("--window", type=int, default=0, show_default=True, help="Closed loop: in flight per session.")
@click.option("--job-latency-ms", type=float, default=200.0, show_default=True, help="Median job latency.")
@click.option("--job-latency-sigma", type=float, default=0.5, show_default=True, help="Log-normal sigma.")
@click.option("--failure-rate", type=float, default=0.01, show_default=True, help="Share of jobs that fail.")
@click.option(
    "--crash-rate", type=float, default=0.0005, show_default=True, help="Share of jobs that crash their node."
)
@click.option(
    "--heartbeat-interval",
    type=float,
    default=None,
    help="Base heartbeat interval of the scheduler it starts (nodes always follow what the scheduler tells).",
)
@click.option("--fixed-interval", type=float, default=None, help="Force this heartbeat interval.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Config of the scheduler it starts.",
)
@click.option("--node-procs", type=int, default=None, help="Node generator processes.")
@click.option("--session-procs", type=int, default=1, show_default=True, help="Session generator processes.")
@click.option(
    "--room-size",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Sessions per room (1: no rooms); each result also reaches the room's other members.",
)
@click.option("--server-pid", type=int, default=None, help="Pid of a local --url scheduler.")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option(
    "--report", "report_path", default="loadtest-report.json", show_default=True, help="JSON report path."
)
@click.option("--no-progress", is_flag=True, help="No live progress display.")
@click.option(
    "--enrollment-secret",
    envvar="LINGUA_AUTH__NODE_ENROLLMENT_SECRET",
    default=None,
    help="Fleet enrollment secret: nodes enrol and use the ids and tokens issued "
    "(default: $LINGUA_AUTH__NODE_ENROLLMENT_SECRET, or the started scheduler's --config).",
)
@click.option(
    "--api-key",
    envvar="LINGUA_API_KEY",
    default=None,
    help="Tenant API key of every session (or $LINGUA_API_KEY).",
)
@click.option(
    "--credentials",
    "credentials_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="TOML file of enrollment_secret, api_key, ca_file, insecure (keeps secrets off the command "
    "line; flags override it).",
)
@_client_tls_options
def loadtest(
    nodes: int,
    sessions: int,
    duration: float,
    url: str | None,
    warmup: float,
    rate: float | None,
    session_mode: str,
    utterance_ms: int,
    window: int,
    job_latency_ms: float,
    job_latency_sigma: float,
    failure_rate: float,
    crash_rate: float,
    heartbeat_interval: float | None,
    fixed_interval: float | None,
    config_file: str | None,
    node_procs: int | None,
    session_procs: int,
    room_size: int,
    server_pid: int | None,
    seed: int,
    report_path: str,
    no_progress: bool,
    enrollment_secret: str | None,
    api_key: str | None,
    credentials_file: str | None,
    ca_file: str | None,
    insecure: bool,
) -> None:
    """Drive a scheduler with NODES simulated nodes and SESSIONS sessions; report what it sustained.

    Load generators run in their own processes. At the end a JSON report is written and a summary
    table printed: heartbeats/s and round trips, selection, dispatch overhead, end-to-end latency, jobs,
    failovers, event-loop lag, server CPU and memory, and whether client and server counts agree.

    A scheduler configured for production (docs/security.md) is driven with its credentials: nodes
    enrol with the enrollment secret, sessions present the tenant API key, an https:// URL is verified
    against --ca-file (or not at all with --insecure).
    """
    from rich.console import Console

    from lingua_scheduler.loadtest.runner import LoadtestOptions, read_credentials, run_loadtest
    from lingua_scheduler.loadtest.workers import LoadGeneratorError

    given: dict[str, Any] = {}
    if credentials_file is not None:
        try:
            given = read_credentials(credentials_file)
        except ValueError as exc:
            click.echo(f"lingua-scheduler loadtest: --credentials {exc}", err=True)
            sys.exit(2)
    flags = {"enrollment_secret": enrollment_secret, "api_key": api_key, "ca_file": ca_file}
    given.update({k: v for k, v in flags.items() if v is not None})
    if insecure:
        given["insecure"] = True

    opts = LoadtestOptions(
        nodes=nodes,
        sessions=sessions,
        duration=duration,
        url=url,
        warmup=warmup,
        rate=rate,
        session_mode=session_mode,
        utterance_ms=utterance_ms,
        window=window,
        job_latency_ms=job_latency_ms,
        job_latency_sigma=job_latency_sigma,
        failure_rate=failure_rate,
        crash_rate=crash_rate,
        server_heartbeat_interval=heartbeat_interval,
        fixed_interval=fixed_interval,
        config_file=config_file,
        node_procs=node_procs,
        session_procs=session_procs,
        room_size=room_size,
        server_pid=server_pid,
        seed=seed,
        report_path=report_path,
        progress=not no_progress,
        **given,
    )
    console = Console() if sys.stdout.isatty() else Console(width=120)
    try:
        run_loadtest(opts, console)
    except (LoadGeneratorError, RuntimeError, OSError) as exc:
        click.echo(f"lingua-scheduler loadtest: {exc}", err=True)
        sys.exit(1)
    click.echo(f"report written to {report_path}")
