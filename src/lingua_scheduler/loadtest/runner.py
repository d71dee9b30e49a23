"""``lingua-scheduler loadtest``: one run against a scheduler, its JSON report and its summary table.

A run: (start a scheduler in a subprocess, unless a URL is given) -> scrape ``/metrics`` -> register the
nodes (worker processes) -> open the sessions -> warm up -> measurement window (sessions talk, progress
shown live) -> scrape -> sessions stop and drain -> nodes stop and drain their acks -> final scrape.

Window figures (rates, percentiles, server CPU) come from the window; the reconciliation compares the
client's totals over the whole run with the server's counter deltas over the whole run, which must
agree exactly when no other client uses the scheduler. Server-side quantiles come from the server's
histograms (bucket resolution, interpolated) and, where the server exposes it, from ``/api/v1/stats``.

Must never: start its scheduler on anything but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import IO, Any
from urllib.parse import urlsplit

from rich.console import Console
from rich.live import Live
from rich.table import Table

from lingua_scheduler import __version__
from lingua_scheduler.loadtest.fleet import JobBehaviour
from lingua_scheduler.loadtest.metrics import (
    Scrape,
    delta,
    delta_by_label,
    get_json,
    histogram_quantiles,
    machine,
    percentiles,
    proc_cpu_seconds,
    proc_memory_mb,
    scaled,
)
from lingua_scheduler.loadtest.workers import (
    Access,
    LoadGenerator,
    NodeWorkerSpec,
    SessionWorkerSpec,
    fleet_plan,
    session_plans,
    split,
)
from lingua_scheduler.sim.reach import describe


@dataclass
class LoadtestOptions:
    nodes: int = 100
    sessions: int = 10
    duration: float = 30.0
    #: base URL of a running scheduler (http://host:port); None: start one
    url: str | None = None
    warmup: float = 3.0
    #: offered utterances per second over all sessions (None: 0.5 per session)
    rate: float | None = None
    #: "stream", "utterance" or "mixed"
    session_mode: str = "mixed"
    utterance_ms: int = 1000
    #: closed loop: utterances each session keeps outstanding (0: open loop at ``rate``)
    window: int = 0
    job_latency_ms: float = 200.0
    job_latency_sigma: float = 0.5
    failure_rate: float = 0.01
    crash_rate: float = 0.0005
    crash_downtime: float = 2.0
    #: force this heartbeat interval on the nodes instead of the scheduler's (None: as told)
    fixed_interval: float | None = None
    #: configure the started scheduler's base heartbeat interval (only when it starts one)
    server_heartbeat_interval: float | None = None
    #: extra environment of the started scheduler (LINGUA_... overrides)
    server_env: dict[str, str] = field(default_factory=dict)
    config_file: str | None = None
    node_procs: int | None = None
    session_procs: int = 1
    #: pid of the scheduler when it runs on this machine but was not started here (for /proc figures)
    server_pid: int | None = None
    drain_seconds: float = 15.0
    seed: int = 1
    report_path: str | None = "loadtest-report.json"
    progress: bool = True
    #: fleet enrollment secret of a scheduler with node authentication (docs/security.md)
    enrollment_secret: str | None = None
    #: tenant API key of a scheduler with session authentication
    api_key: str | None = None
    #: CA (or self-signed certificate) to trust for an https:// URL
    ca_file: str | None = None
    #: do not verify the scheduler's certificate (self-signed test certificates)
    insecure: bool = False
    #: members per room (1: no rooms): each utterance's result also reaches the room's other members
    room_size: int = 1


#: the options that are secrets: the report says whether they were set, never what they are
SECRET_OPTIONS = ("enrollment_secret", "api_key")

#: the keys a ``--credentials`` file may hold
CREDENTIAL_KEYS = ("enrollment_secret", "api_key", "ca_file", "insecure")


def read_credentials(path: str) -> dict[str, Any]:
    """The credentials of a TOML file of ``CREDENTIAL_KEYS`` (top level or under ``[loadtest]``).

    Raises ``ValueError`` naming the file and the key that is unknown or of the wrong type."""
    import tomllib

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from None
    table = data.get("loadtest", data)
    if not isinstance(table, dict):
        raise ValueError(f"{path}: 'loadtest' must be a table")
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in CREDENTIAL_KEYS:
            raise ValueError(f"{path}: unknown key '{key}' (expected one of {', '.join(CREDENTIAL_KEYS)})")
        want = bool if key == "insecure" else str
        if not isinstance(value, want):
            raise ValueError(f"{path}: key '{key}' must be a {want.__name__}")
        out[key] = value
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server_process(
    args: list[str],
    port: int,
    *,
    env: dict[str, str] | None = None,
    output: IO[bytes] | int = subprocess.DEVNULL,
    start_timeout: float = 30.0,
    failure: str = "the server did not start",
    ssl_context: ssl.SSLContext | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``args`` (an HTTP server listening on 127.0.0.1:``port``; HTTPS verified with
    ``ssl_context`` when given) in its own process until the block ends; the block is entered once its
    ``/health`` answers. Raises ``RuntimeError(failure)`` when the process exits first or does not
    answer within ``start_timeout`` seconds."""
    proc = subprocess.Popen(args, env=env, stdout=output, stderr=output)
    scheme = "https" if ssl_context is not None else "http"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                get_json(f"{scheme}://127.0.0.1:{port}/health", timeout=2, ssl_context=ssl_context)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(failure) from None
                time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def local_scheduler(
    env: dict[str, str],
    config_file: str | None = None,
    log_path: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``lingua-scheduler serve`` in its own process on a free 127.0.0.1 port, until the block ends.
    With ``ssl_context`` the configuration serves TLS and the base URL is https://."""
    port = free_port()
    args = [sys.executable, "-m", "lingua_scheduler", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if config_file:
        args += ["--config", config_file]
    # every load generator connects from 127.0.0.1: the per-source socket cap would refuse a large fleet
    full_env = {
        **os.environ,
        "LINGUA_SERVER__LOG_LEVEL": '"warning"',
        "LINGUA_LIMITS__MAX_CONNECTIONS_PER_SOURCE": "1000000",
        **env,
    }
    failure = "the scheduler did not start" + (f" (log: {log_path})" if log_path else "")
    with contextlib.ExitStack() as stack:
        # the log is closed after the process has stopped, not before (it writes until it exits)
        log: IO[bytes] | int = stack.enter_context(open(log_path, "ab")) if log_path else subprocess.DEVNULL
        with server_process(
            args, port, env=full_env, output=log, failure=failure, ssl_context=ssl_context
        ) as proc:
            yield f"{'https' if ssl_context is not None else 'http'}://127.0.0.1:{port}", proc


def _base_url(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url if "://" in url else "http://" + url)
    scheme = "https" if parts.scheme in ("https", "wss") else "http"
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if scheme == "https" else 80)
    return f"{scheme}://{host}:{port}", host, port


class _ServerProbe:
    """CPU and memory of the scheduler: /proc of its pid when local, else its process_* metrics."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid

    def cpu(self, scrape: Scrape) -> float | None:
        if self.pid is not None:
            with contextlib.suppress(OSError):
                return proc_cpu_seconds(self.pid)
        if scrape.has("process_cpu_seconds_total"):
            return scrape.value("process_cpu_seconds_total")
        return None

    def memory(self, scrape: Scrape) -> dict[str, Any]:
        if self.pid is not None:
            with contextlib.suppress(OSError):
                return {**proc_memory_mb(self.pid), "source": f"/proc/{self.pid}"}
        if scrape.has("process_resident_memory_bytes"):
            return {
                "rss_mb": round(scrape.value("process_resident_memory_bytes") / 2**20, 1),
                "source": "process_resident_memory_bytes",
            }
        return {"source": "unavailable (remote scheduler without process metrics)"}

    @property
    def source(self) -> str:
        return f"/proc/{self.pid}" if self.pid is not None else "process_cpu_seconds_total"


def run_loadtest(opts: LoadtestOptions, console: Console | None = None) -> dict[str, Any]:
    """Run one load test and return its report (also written to ``opts.report_path`` if set)."""
    console = console or Console(stderr=True)
    if opts.url is not None:
        base, _, _ = _base_url(opts.url)
        report = _run(opts, base, opts.server_pid, started=False, console=console)
    else:
        opts, serves_tls = _for_started_scheduler(opts)
        env = dict(opts.server_env)
        if opts.server_heartbeat_interval is not None:
            env["LINGUA_NODE_HEALTH__HEARTBEAT_INTERVAL_SECONDS"] = str(opts.server_heartbeat_interval)
            env.setdefault("LINGUA_NODE_HEALTH__HEARTBEAT_BUDGET_PER_SECOND", "1000000")
        # The load generator is a trusted peer measuring throughput: the per-connection rate limits,
        # meant for abusive peers, must not shape its offered load (one session may send 100+/s).
        for endpoint in ("NODE", "SESSION"):
            env.setdefault(f"LINGUA_LIMITS__{endpoint}_MESSAGES_PER_SECOND", "1000000")
            env.setdefault(f"LINGUA_LIMITS__{endpoint}_MESSAGE_BURST", "1000000")
        log_path = os.path.join(tempfile.gettempdir(), f"lingua-loadtest-server-{os.getpid()}.log")
        tls = _access(opts, tls=serves_tls).ssl_context()
        with local_scheduler(env, opts.config_file, log_path, tls) as (base, proc):
            report = _run(opts, base, proc.pid, started=True, console=console)
            report["server"]["log"] = log_path
    if opts.report_path:
        import json

        with open(opts.report_path, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return report


def _for_started_scheduler(opts: LoadtestOptions) -> tuple[LoadtestOptions, bool]:
    """The options for a scheduler this run starts from ``opts.config_file`` (and the environment):
    its enrollment secret unless one was given, and its own certificate as the CA to trust when it
    serves TLS (a self-signed test certificate; give --ca-file when it is signed by a CA); and whether
    it serves TLS."""
    from lingua_scheduler.config import load_config
    from lingua_scheduler.errors import ConfigError

    try:
        cfg = load_config(opts.config_file, env={**os.environ, **opts.server_env})
    except ConfigError as exc:
        raise RuntimeError(f"invalid configuration of the scheduler to start: {exc}") from None
    changes: dict[str, Any] = {}
    if opts.enrollment_secret is None and cfg.auth.node_enrollment_secret:
        changes["enrollment_secret"] = cfg.auth.node_enrollment_secret
    if cfg.tls.cert_file and opts.ca_file is None and not opts.insecure:
        changes["ca_file"] = cfg.tls.cert_file
    if cfg.auth.tenants and opts.api_key is None:
        raise RuntimeError(
            "the scheduler to start requires tenant API keys ([[auth.tenants]]): pass --api-key"
        )
    return dataclasses.replace(opts, **changes), bool(cfg.tls.cert_file)


def _access(opts: LoadtestOptions, *, tls: bool) -> Access:
    return Access(
        tls=tls,
        ca_file=opts.ca_file,
        insecure=opts.insecure,
        enrollment_secret=opts.enrollment_secret,
        api_key=opts.api_key,
    )


def _first_scrape(base: str, ssl_context: ssl.SSLContext | None) -> Scrape:
    """The first ``/metrics`` scrape, failing with one line when the scheduler cannot be reached."""
    try:
        return Scrape.fetch(base, ssl_context)
    except OSError as exc:
        cause = (
            exc.reason
            if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException)
            else exc
        )
        raise RuntimeError(describe(base + "/metrics", cause, 10.0)) from None


def _run(
    opts: LoadtestOptions, base: str, pid: int | None, *, started: bool, console: Console
) -> dict[str, Any]:
    _, host, port = _base_url(base)
    access = _access(opts, tls=base.startswith("https://"))
    tls = access.ssl_context()
    run_id = secrets.token_hex(3)
    plan = fleet_plan(opts.nodes, opts.seed, f"lt{run_id}")
    rate = opts.rate if opts.rate is not None else 0.5 * opts.sessions
    plans = (
        session_plans(
            opts.sessions,
            [p for _, p in plan],
            mode=opts.session_mode,
            total_rate=rate,
            utterance_ms=opts.utterance_ms,
            seed=opts.seed + 1,
        )
        if opts.sessions
        else []
    )
    behaviour = JobBehaviour(
        latency_ms=opts.job_latency_ms,
        latency_sigma=opts.job_latency_sigma,
        failure_rate=opts.failure_rate,
        crash_rate=opts.crash_rate,
        crash_downtime=opts.crash_downtime,
        partials=1,
    )
    node_procs = opts.node_procs or (1 if opts.nodes <= 3000 else 2)
    node_specs = [
        NodeWorkerSpec(
            host, port, part, behaviour, opts.fixed_interval, seed=opts.seed * 7919 + i, access=access
        )
        for i, part in enumerate(split(plan, node_procs))
        if part
    ]
    session_specs = [
        SessionWorkerSpec(
            host,
            port,
            part,
            window=opts.window,
            seed=opts.seed * 104729 + i,
            drain_seconds=opts.drain_seconds,
            access=access,
            room_size=opts.room_size,
        )
        for i, part in enumerate(split(plans, opts.session_procs))
        if part
    ]
    probe = _ServerProbe(pid)
    live = _Progress(opts, console) if opts.progress else None
    gen = LoadGenerator(node_specs, session_specs)
    with gen, live.live if live else contextlib.nullcontext():

        def tick() -> None:
            if live is not None:
                live.update(gen, base, probe)

        m0 = _first_scrape(base, tls)
        t_reg = time.monotonic()
        if live:
            live.phase = "registering nodes"
        gen.start_nodes()
        gen.wait_for(gen.nodes_ready, 120 + opts.nodes / 50, tick)
        registration = time.monotonic() - t_reg
        if live:
            live.phase = "opening sessions"
        gen.start_sessions()
        gen.wait_for(gen.sessions_ready, 120, tick)
        if live:
            live.phase = "warming up"
        _sleep_ticking(opts.warmup, gen, tick)
        # --- measurement window ---
        m1 = Scrape.fetch(base, tls)
        cpu1, t1 = probe.cpu(m1), time.monotonic()
        stats1 = _stats(base, tls)
        gen.go()
        if live:
            live.phase = "measuring"
            live.window_started = time.monotonic()
        lags: list[float] = []
        end_at = time.monotonic() + opts.duration
        while time.monotonic() < end_at:
            gen.poll(min(1.0, max(0.01, end_at - time.monotonic())))
            with contextlib.suppress(OSError):
                scrape = Scrape.fetch(base, tls)
                lags.append(scrape.value("lingua_event_loop_lag_seconds"))
                if live:
                    live.last_scrape = scrape
            tick()
        gen.end()
        m2 = Scrape.fetch(base, tls)
        cpu2, t2 = probe.cpu(m2), time.monotonic()
        memory = probe.memory(m2)
        stats2 = _stats(base, tls)
        # --- drain ---
        if live:
            live.phase = "draining sessions"
        gen.stop_sessions(opts.drain_seconds + 60, tick)
        if live:
            live.phase = "stopping nodes"
        gen.stop_nodes(60, tick)
        time.sleep(0.3)  # let the server see the closes before the final scrape
        m3 = Scrape.fetch(base, tls)
    window = t2 - t1
    nodes_r = gen.role_results("nodes")
    sess_r = gen.role_results("sessions")
    report = _report(
        opts,
        base=base,
        pid=pid,
        started=started,
        scrapes=(m0, m1, m2, m3),
        stats=(stats1, stats2),
        window=window,
        registration=registration,
        cpu=(cpu1, cpu2),
        memory=memory,
        lags=lags,
        nodes_r=nodes_r,
        sess_r=sess_r,
        probe=probe,
        rate=rate,
        node_procs=len(node_specs),
    )
    print_summary(report, console)
    return report


def _sleep_ticking(seconds: float, gen: LoadGenerator, tick: Any) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        gen.poll(min(0.5, max(0.01, end - time.monotonic())))
        tick()


def _stats(base: str, ssl_context: ssl.SSLContext | None) -> dict[str, Any] | None:
    try:
        body = get_json(base + "/api/v1/stats", ssl_context=ssl_context)
        return body if isinstance(body, dict) else None
    except (OSError, ValueError):
        return None


def _sum_counter(results: list[dict[str, Any]], name: str) -> int:
    return sum(int(r["counters"].get(name, 0)) for r in results)


def _report(
    opts: LoadtestOptions,
    *,
    base: str,
    pid: int | None,
    started: bool,
    scrapes: tuple[Scrape, Scrape, Scrape, Scrape],
    stats: tuple[dict[str, Any] | None, dict[str, Any] | None],
    window: float,
    registration: float,
    cpu: tuple[float | None, float | None],
    memory: dict[str, Any],
    lags: list[float],
    nodes_r: list[dict[str, Any]],
    sess_r: list[dict[str, Any]],
    probe: _ServerProbe,
    rate: float,
    node_procs: int,
) -> dict[str, Any]:
    m0, m1, m2, m3 = scrapes
    rtts = [x for r in nodes_r for x in r["rtts"]]
    lat = [x for r in sess_r for x in r["latencies"]]
    acked_window = _sum_counter(nodes_r, "window_heartbeats_acked")
    completed_window = sum(int(r["counters"]["window_completed"]) for r in sess_r)
    failed_window = sum(int(r["counters"]["window_failed"]) for r in sess_r)
    sent_window = sum(int(r["counters"]["window_sent"]) for r in sess_r)
    reasons: dict[str, int] = {}
    codes: dict[str, int] = {}
    for r in sess_r:
        for k, v in r["counters"]["failure_reasons"].items():
            reasons[k] = reasons.get(k, 0) + v
        for k, v in r["counters"]["error_codes"].items():
            codes[k] = codes.get(k, 0) + v
    hb_server_window = delta(m2, m1, "lingua_heartbeats_total")
    jobs_window = delta_by_label(m2, m1, "lingua_jobs_total", "outcome")
    jobs_total = delta_by_label(m3, m0, "lingua_jobs_total", "outcome")
    failovers_window = delta_by_label(m2, m1, "lingua_failovers_total", "reason")
    failovers_total = delta_by_label(m3, m0, "lingua_failovers_total", "reason")
    cpu_pct = (
        round(100.0 * (cpu[1] - cpu[0]) / window, 1) if cpu[0] is not None and cpu[1] is not None else None
    )
    stats_dispatch = (stats[1] or {}).get("latency", {}).get("job_dispatch_seconds")
    stats_handle = (stats[1] or {}).get("latency", {}).get("heartbeat_handle_seconds")
    client_hb = _sum_counter(nodes_r, "heartbeats_acked")
    lost_hb = _sum_counter(nodes_r, "heartbeats_lost_in_crash")
    server_hb = delta(m3, m0, "lingua_heartbeats_total")
    client_completed = sum(int(r["counters"]["completed"]) for r in sess_r)
    client_failed = sum(int(r["counters"]["failed"]) for r in sess_r)
    server_completed = jobs_total.get("completed", 0.0)
    server_failed = sum(v for k, v in jobs_total.items() if k in ("failed", "timed_out"))
    unanswered = sum(int(r["unanswered"]) for r in sess_r)
    intervals = [r["interval_max"] for r in nodes_r if r.get("interval_max") is not None]
    return {
        "tool": "lingua-scheduler loadtest",
        "version": __version__,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "config": {
            **asdict(opts),
            **{k: "(set)" if getattr(opts, k) else None for k in SECRET_OPTIONS},
            "offered_rate_per_s": rate,
            "node_processes": node_procs,
        },
        "server": {"url": base, "started_by_loadtest": started, "pid": pid},
        "window_seconds": round(window, 3),
        "registration": {
            "nodes": _sum_counter(nodes_r, "registered"),
            "seconds": round(registration, 2),
            "errors": _sum_counter(nodes_r, "register_errors"),
        },
        "heartbeats": {
            "interval_told_s": max(intervals) if intervals else None,
            "acked_in_window": acked_window,
            "per_second": round(acked_window / window, 1) if window else None,
            "server_per_second": round(hb_server_window / window, 1) if window else None,
            "rtt_ms": percentiles(rtts, 1e3),
            "server_handle_us": scaled(
                histogram_quantiles(m2, m1, "lingua_heartbeat_handle_seconds"), 1e6, 1
            ),
            "server_handle_us_exact_recent": scaled(stats_handle, 1e6, 1) if stats_handle else None,
        },
        "selection_us": {
            **scaled(histogram_quantiles(m2, m1, "lingua_selection_seconds"), 1e6, 1),
            "source": "lingua_selection_seconds histogram, window delta, interpolated within buckets",
        },
        "dispatch_overhead_ms": {
            **scaled(histogram_quantiles(m2, m1, "lingua_job_dispatch_seconds"), 1e3),
            "exact_recent": scaled(stats_dispatch, 1e3) if stats_dispatch else None,
            "source": "lingua_job_dispatch_seconds (utterance frame received -> job_assign written)",
        },
        "end_to_end_ms": {
            "client": percentiles(lat, 1e3),
            "server": scaled(histogram_quantiles(m2, m1, "lingua_job_end_to_end_seconds"), 1e3),
        },
        "jobs": {
            "offered_in_window": sent_window,
            "completed_in_window": completed_window,
            "failed_in_window": failed_window,
            "completed_per_second": round(completed_window / window, 1) if window else None,
            "server_outcomes_in_window": jobs_window,
            "failure_reasons": reasons,
            "error_codes": codes,
            "unanswered_at_end": unanswered,
        },
        "rooms": {
            "room_size": opts.room_size,
            "rooms": sum(int(r["counters"]["rooms"]) for r in sess_r),
            "heard": sum(int(r["counters"]["room_heard"]) for r in sess_r),
            "missing": sum(int(r["counters"]["room_missing"]) for r in sess_r),
            "note": "outcomes of other members' utterances received (a result reaches room_size - 1 "
            "members); every member of a room asks for one language: one job per utterance",
        },
        "failovers": {
            "in_window": int(sum(failovers_window.values())),
            "by_reason_in_window": failovers_window,
            "total": int(sum(failovers_total.values())),
            "by_reason_total": failovers_total,
            "injected_job_failures": _sum_counter(nodes_r, "jobs_answered_failed"),
            "injected_crashes": _sum_counter(nodes_r, "crashes"),
            "node_reconnects": _sum_counter(nodes_r, "reconnects"),
        },
        "event_loop_lag_ms": {
            "server_max": round(max(lags) * 1e3, 2) if lags else None,
            "server_median": round(statistics.median(lags) * 1e3, 2) if lags else None,
            "load_generator_max": round(max([r["loop_lag_max"] for r in nodes_r + sess_r] or [0.0]) * 1e3, 2),
        },
        "server_process": {
            "cpu_percent_of_one_core": cpu_pct,
            "cpu_source": probe.source if cpu_pct is not None else "unavailable",
            **memory,
        },
        "totals": {
            "heartbeats_acked": {"client": client_hb, "server": int(server_hb), "lost_in_crashes": lost_hb},
            "jobs_completed": {"client": client_completed, "server": int(server_completed)},
            "jobs_failed": {"client": client_failed, "server": int(server_failed)},
            "agree": client_hb <= int(server_hb) <= client_hb + lost_hb
            and client_completed == int(server_completed)
            and client_failed == int(server_failed),
            "note": "whole run, client totals vs server counter deltas (exact with no other client; "
            "heartbeats in flight when a node crashed may be counted by the server without an ack)",
        },
    }


# --- presentation ------------------------------------------------------------------------------------------


class _Progress:
    def __init__(self, opts: LoadtestOptions, console: Console) -> None:
        self.opts = opts
        self.phase = "starting"
        self.window_started: float | None = None
        self.last_scrape: Scrape | None = None
        self._cpu_prev: tuple[float, float] | None = None
        self._cpu_pct: float | None = None
        self._hb_prev: tuple[int, float] | None = None
        self._hb_rate = 0.0
        self.live = Live(self._render({}), console=console, refresh_per_second=2, transient=True)

    def update(self, gen: LoadGenerator, base: str, probe: _ServerProbe) -> None:
        now = time.monotonic()
        acked = gen.sum_progress("nodes", "heartbeats_acked")
        if self._hb_prev and now - self._hb_prev[1] >= 0.9:
            self._hb_rate = (acked - self._hb_prev[0]) / (now - self._hb_prev[1])
            self._hb_prev = (acked, now)
        elif self._hb_prev is None:
            self._hb_prev = (acked, now)
        if self.last_scrape is not None:
            c = probe.cpu(self.last_scrape)
            if c is not None:
                if self._cpu_prev and now - self._cpu_prev[1] >= 0.9:
                    self._cpu_pct = 100 * (c - self._cpu_prev[0]) / (now - self._cpu_prev[1])
                    self._cpu_prev = (c, now)
                elif self._cpu_prev is None:
                    self._cpu_prev = (c, now)
        registered = sum(int(v.get("registered", 0)) for v in gen.ready.values()) or gen.sum_progress(
            "nodes", "registered"
        )
        opened = sum(int(v.get("sessions", 0)) for v in gen.ready.values())
        self.live.update(
            self._render(
                {
                    "nodes registered": f"{registered} / {self.opts.nodes}",
                    "sessions": f"{opened} / {self.opts.sessions}",
                    "heartbeats acked/s": f"{self._hb_rate:,.0f}",
                    "utterances sent": f"{gen.sum_progress('sessions', 'utterances_sent'):,}",
                    "results": f"{gen.sum_progress('sessions', 'completed'):,}",
                    "failed": f"{gen.sum_progress('sessions', 'failed'):,}",
                    "injected crashes": f"{gen.sum_progress('nodes', 'crashes'):,}",
                    "server loop lag": (
                        f"{self.last_scrape.value('lingua_event_loop_lag_seconds') * 1e3:.1f} ms"
                        if self.last_scrape
                        else "-"
                    ),
                    "server CPU": f"{self._cpu_pct:.0f} %" if self._cpu_pct is not None else "-",
                }
            )
        )

    def _render(self, rows: dict[str, str]) -> Table:
        elapsed = ""
        if self.window_started is not None:
            done = min(self.opts.duration, time.monotonic() - self.window_started)
            elapsed = f" {done:.0f}/{self.opts.duration:g} s"
        t = Table(title=f"loadtest: {self.phase}{elapsed}", show_header=False, min_width=50)
        t.add_column(style="bold")
        t.add_column(justify="right")
        for k, v in rows.items():
            t.add_row(k, v)
        return t


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3f}{unit}" if abs(v) < 10 else f"{v:,.1f}{unit}"
    return f"{v:,}{unit}"


def _q(d: dict[str, Any] | None, unit: str, keys: tuple[str, ...] = ("p50", "p99", "p999")) -> str:
    if not d:
        return "-"
    return " / ".join(_fmt(d.get(k)) for k in keys) + f" {unit}"


def print_summary(report: dict[str, Any], console: Console) -> None:
    """The rich summary table of a report."""
    hb, jobs, fo = report["heartbeats"], report["jobs"], report["failovers"]
    cfg = report["config"]
    t = Table(
        title=(
            f"lingua-scheduler loadtest: {cfg['nodes']} nodes, {cfg['sessions']} sessions, "
            f"{report['window_seconds']:.0f} s window ({report['machine']['cpu']}, "
            f"{report['machine']['cores']} cores)"
        )
    )
    t.add_column("figure", style="bold")
    t.add_column("value", justify="right")
    t.add_column("source", style="dim")
    t.add_row(
        "heartbeats/s (acked)", _fmt(hb["per_second"]), f"client; server {_fmt(hb['server_per_second'])}"
    )
    t.add_row("heartbeat interval told", _fmt(hb["interval_told_s"], " s"), "next_heartbeat_ms")
    t.add_row("heartbeat RTT p50/p99/p999", _q(hb["rtt_ms"], "ms"), "client, sent -> ack")
    t.add_row(
        "heartbeat handle p50/p99", _q(hb["server_handle_us"], "µs", ("p50", "p99")), "server histogram"
    )
    t.add_row("selection p50/p99", _q(report["selection_us"], "µs", ("p50", "p99")), "server histogram")
    t.add_row(
        "dispatch overhead p50/p99",
        _q(report["dispatch_overhead_ms"], "ms", ("p50", "p99")),
        "server histogram",
    )
    t.add_row(
        "end-to-end p50/p99/p999", _q(report["end_to_end_ms"]["client"], "ms"), "client, incl. job latency"
    )
    t.add_row(
        "jobs offered / completed / failed",
        f"{jobs['offered_in_window']:,} / {jobs['completed_in_window']:,} / {jobs['failed_in_window']:,}",
        "client, window",
    )
    t.add_row("jobs completed/s", _fmt(jobs["completed_per_second"]), "client, window")
    rooms = report.get("rooms") or {}
    if rooms.get("room_size", 1) > 1:
        t.add_row(
            "rooms / heard / missing",
            f"{rooms['rooms']:,} / {rooms['heard']:,} / {rooms['missing']:,}",
            f"client, other members' outcomes (rooms of {rooms['room_size']})",
        )
    t.add_row(
        "failovers (window)",
        _fmt(fo["in_window"]),
        ", ".join(f"{k} {int(v)}" for k, v in fo["by_reason_in_window"].items()) or "server",
    )
    t.add_row(
        "injected failures / crashes",
        f"{fo['injected_job_failures']:,} / {fo['injected_crashes']:,}",
        "nodes, whole run",
    )
    lag = report["event_loop_lag_ms"]
    t.add_row(
        "server loop lag max / median",
        f"{_fmt(lag['server_max'])} / {_fmt(lag['server_median'])} ms",
        "lingua_event_loop_lag_seconds",
    )
    t.add_row("load generator loop lag max", _fmt(lag["load_generator_max"], " ms"), "client workers")
    sp = report["server_process"]
    t.add_row("server CPU", _fmt(sp["cpu_percent_of_one_core"], " % of a core"), sp["cpu_source"])
    t.add_row(
        "server memory RSS / peak",
        f"{_fmt(sp.get('rss_mb'))} / {_fmt(sp.get('peak_rss_mb'))} MiB",
        sp.get("source", ""),
    )
    tot = report["totals"]
    t.add_row(
        "client vs server totals",
        "agree" if tot["agree"] else "DIFFER",
        f"heartbeats {tot['heartbeats_acked']['client']:,}/{tot['heartbeats_acked']['server']:,}, "
        f"completed {tot['jobs_completed']['client']:,}/{tot['jobs_completed']['server']:,}, "
        f"failed {tot['jobs_failed']['client']:,}/{tot['jobs_failed']['server']:,}",
    )
    console.print(t)
