"""``lingua-scheduler serve`` as an operator starts it: the real console script in its own process.

A start that cannot go on prints exactly one line of ours (what is wrong, what to do) and exits 2
(configuration) or 1 (this machine), without a traceback unless ``--debug``. A start that goes on
logs "listening" with the port really bound, the URLs and the mode; Redis unreachable at start is
a warning and a degraded instance, not an exit.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import pty
import re
import select
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.redis_support import RedisServer, free_port

CLI = str(Path(sys.executable).with_name("lingua-scheduler"))


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LINGUA_")}


def fail_to_start(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``serve ARGS`` that must stop at once: its exit code and its only stderr line."""
    proc = subprocess.run(
        [CLI, "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**_env(), **(env or {})},
        stdin=subprocess.DEVNULL,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert proc.stdout == ""
    return proc.returncode, lines[0]


@contextlib.contextmanager
def held_port() -> Iterator[int]:
    """A port another process's socket is listening on (our own socket: the effect is the same)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


class Serving:
    """A ``serve`` process whose stderr (JSON lines: not a terminal) is read line by line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [CLI, "serve", *args], stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=_env()
        )
        self.records: list[dict[str, Any]] = []

    def wait_for(self, msg_prefix: str, timeout: float = 30.0) -> dict[str, Any]:
        for rec in self.records:
            if rec["msg"].startswith(msg_prefix):
                return rec
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stderr], [], [], 0.2)
            if not ready:
                assert self.proc.poll() is None, f"serve exited with {self.proc.returncode}: {self.records}"
                continue
            line = self.proc.stderr.readline()
            assert line, f"serve closed stderr: {self.records}"
            record: dict[str, Any] = json.loads(line)  # one JSON object a line, no traceback
            self.records.append(record)
            if record["msg"].startswith(msg_prefix):
                return record
        raise AssertionError(f"no {msg_prefix!r} line in {timeout} s: {self.records}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def serving() -> Iterator[list[Serving]]:
    started: list[Serving] = []
    yield started
    for s in started:
        s.stop()


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _eventually_get(url: str, timeout: float = 15.0) -> tuple[int, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _get(url)
        except OSError:
            assert time.monotonic() < deadline, f"{url} did not answer"
            time.sleep(0.05)


# --- start failures: one line, the right exit code ------------------------------------------------


def test_port_in_use_names_the_port_and_the_other_process() -> None:
    with held_port() as port:
        code, line = fail_to_start("--port", str(port))
    assert code == 1
    assert line.startswith(
        f"lingua-scheduler: cannot start: port {port} on 127.0.0.1 is already in use: "
        "another process holds it."
    )
    assert "choose another --port" in line


def test_debug_shows_the_traceback() -> None:
    with held_port() as port:
        proc = subprocess.run(
            [CLI, "serve", "--port", str(port), "--debug"],
            capture_output=True,
            text=True,
            timeout=60,
            env=_env(),
        )
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "StartupError" in proc.stderr


def test_bad_bind_address_is_a_configuration_error() -> None:
    # 192.0.2.0/24 is reserved for documentation: never an address of this machine
    code, line = fail_to_start("--host", "192.0.2.7", "--port", str(free_port()))
    assert (code, line.split(": it")[0]) == (
        2,
        "lingua-scheduler: cannot start: cannot listen on --host 192.0.2.7",
    )
    assert "it is not an address of this machine" in line
    code, line = fail_to_start("--host", "no-such-host.invalid", "--port", str(free_port()))
    assert code == 2
    assert line.startswith(
        "lingua-scheduler: cannot start: cannot listen on --host no-such-host.invalid: "
        "no such address or host name."
    )


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:6379/0", "it must start with redis://, rediss:// or unix:// ('http://')"),
        ("127.0.0.1:6379", "it must start with redis://, rediss:// or unix://"),
        ("redis://127.0.0.1:70000/0", "its port is not a number in 0..65535"),
        (
            "redis://127.0.0.1:6379/zero",
            "the database after the host must be a number, e.g. /0 (got '/zero')",
        ),
        ("redis:///0", "it names no host"),
    ],
)
def test_malformed_redis_url_is_a_configuration_error(url: str, why: str) -> None:
    code, line = fail_to_start("--redis-url", url, "--port", str(free_port()))
    assert code == 2
    assert line.startswith(
        "lingua-scheduler: invalid configuration: config key 'cluster.redis_url': "
        f"{url} is not a Redis URL: {why}"
    )


def test_redis_url_password_never_printed() -> None:
    code, line = fail_to_start(
        "--redis-url", "redis://:hunter2secret@127.0.0.1:6379/x", "--port", str(free_port())
    )
    assert code == 2 and "redis://:***@127.0.0.1:6379/x is not a Redis URL" in line
    assert "hunter2secret" not in line


def test_missing_or_bad_tls_files_name_the_path(tmp_path: Path) -> None:
    missing, present = tmp_path / "missing.pem", tmp_path / "not-pem.txt"
    present.write_text("not a certificate\n")
    code, line = fail_to_start(
        "--tls-cert", str(missing), "--tls-key", str(present), "--port", str(free_port())
    )
    assert (code, line) == (
        2,
        f"lingua-scheduler: invalid configuration: config key 'tls.cert_file': file not found: {missing}",
    )
    code, line = fail_to_start(
        "--tls-cert", str(present), "--tls-key", str(missing), "--port", str(free_port())
    )
    assert (code, line) == (
        2,
        f"lingua-scheduler: invalid configuration: config key 'tls.key_file': file not found: {missing}",
    )
    # a directory given through the environment (the --tls-cert flag refuses one itself)
    tls_env = {"LINGUA_TLS__CERT_FILE": str(tmp_path), "LINGUA_TLS__KEY_FILE": str(present)}
    code, line = fail_to_start("--port", str(free_port()), env=tls_env)
    assert (code, line) == (
        2,
        f"lingua-scheduler: invalid configuration: config key 'tls.cert_file': not a file: {tmp_path}",
    )
    code, line = fail_to_start(
        "--tls-cert", str(present), "--tls-key", str(present), "--port", str(free_port())
    )
    assert code == 2 and line.startswith(
        "lingua-scheduler: invalid configuration: config key 'tls.cert_file': "
        f"cannot load the certificate {present} with the key {present}: they must be a PEM certificate"
    )


def test_bad_flag_values_are_configuration_errors() -> None:
    code, line = fail_to_start("--port", "70000")
    assert code == 2 and line.startswith("lingua-scheduler: invalid configuration: config key 'server.port'")


# --- a start that goes on -------------------------------------------------------------------------


def test_port_zero_logs_the_real_port_urls_and_mode(serving: list[Serving]) -> None:
    s = Serving("--port", "0")
    serving.append(s)
    first = s.wait_for("")
    assert first["msg"] == "lingua-scheduler listening" and first["level"] == "info"
    port = first["port"]
    assert isinstance(port, int) and port > 0
    base = f"127.0.0.1:{port}"
    assert (first["host"], first["mode"]) == ("127.0.0.1", "embedded")
    assert first["dashboard"] == f"http://{base}/dashboard"
    assert first["session_ws"] == f"ws://{base}/ws/session"
    assert first["node_ws"] == f"ws://{base}/ws/node"
    assert _eventually_get(f"http://{base}/health")[0] == 200
    # GET / sends a browser to the dashboard
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/")
    resp = conn.getresponse()
    assert (resp.status, resp.getheader("Location")) == (302, "/dashboard")
    conn.close()


def test_redis_unreachable_at_start_warns_and_runs_degraded(serving: list[Serving]) -> None:
    redis_port = free_port()
    url = f"redis://:pw-not-logged@127.0.0.1:{redis_port}/0"
    s = Serving("--port", "0", "--redis-url", url, "--instance-id", "inst-startup")
    serving.append(s)
    listening = s.wait_for("lingua-scheduler listening")
    assert (listening["mode"], listening["instance"]) == ("redis", "inst-startup")
    assert listening["redis_url"] == f"redis://:***@127.0.0.1:{redis_port}/0"
    warning = s.wait_for("Redis unreachable at start")
    assert warning["level"] == "warning" and warning["degraded"] is True
    assert (warning["redis_url"], warning["instance"]) == (listening["redis_url"], "inst-startup")
    assert all("pw-not-logged" not in json.dumps(r) for r in s.records)
    # still serving, degraded: alive, not ready, and it says why
    base = f"http://127.0.0.1:{listening['port']}"
    assert _eventually_get(base + "/health")[0] == 200
    status, ready = _get(base + "/ready")
    assert status == 503 and ready["checks"]["shared_store"] is False
    # Redis comes up: the instance joins without a restart, and says so
    redis = RedisServer(port=redis_port)
    try:
        redis.start()
        redis.client().config_set("requirepass", "pw-not-logged")
        s.wait_for("shared store reachable")
        deadline = time.monotonic() + 15
        while _get(base + "/ready")[0] != 200:
            assert time.monotonic() < deadline, "never ready once Redis answered"
            time.sleep(0.1)
    finally:
        s.stop()
        redis.stop()


def test_reachable_redis_is_named_in_the_listening_line(serving: list[Serving]) -> None:
    redis = RedisServer().start()
    try:
        s = Serving("--port", "0", "--redis-url", redis.url)
        serving.append(s)
        listening = s.wait_for("lingua-scheduler listening")
        assert listening["mode"] == "redis" and listening["redis_url"] == redis.url
        assert isinstance(listening["instance"], str) and listening["instance"]
        s.wait_for("shared store reachable")
        assert not any(r["msg"].startswith("Redis unreachable") for r in s.records)
    finally:
        for s in serving:
            s.stop()
        redis.stop()


# --- log formats ----------------------------------------------------------------------------------

TEXT_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} (INFO|WARNING) +[\w.]+: .+$")


def test_text_format_and_level_flags(serving: list[Serving]) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [CLI, "serve", "--port", str(port), "--log-format", "text"],
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline().rstrip("\n")
        assert TEXT_LINE.match(first), first
        assert "server.startup: lingua-scheduler listening host=127.0.0.1 " in first
        assert f" port={port} " in first and f"dashboard=http://127.0.0.1:{port}/dashboard" in first
        assert first.endswith(" mode=embedded")
        # the next lines: start-up notes (e.g. max_connections fitted to the descriptor limit, at INFO)
        # and the insecure-mode warning, each a text line
        for _ in range(5):
            line = proc.stderr.readline()
            assert TEXT_LINE.match(line), line
            if " WARNING " in line:
                break
        assert "security=insecure" in line, line
    finally:
        proc.terminate()
        proc.wait(30)
    # --log-level warning: the info line is gone, warnings stay
    s = Serving("--port", "0", "--log-level", "warning", "--log-format", "json")
    serving.append(s)
    quiet = s.wait_for("")
    assert quiet["level"] == "warning"


def test_terminal_gets_text_by_default() -> None:
    """No --log-format: on a terminal the lines are text, not JSON."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [CLI, "serve", "--port", "0"], stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=_env()
    )
    os.close(follower)
    out = b""
    try:
        deadline = time.monotonic() + 30
        while b"\n" not in out:
            assert time.monotonic() < deadline, out
            ready, _, _ = select.select([leader], [], [], 0.2)
            if ready:
                out += os.read(leader, 4096)
    finally:
        proc.terminate()
        proc.wait(30)
        os.close(leader)
    first = out.decode().splitlines()[0]
    assert TEXT_LINE.match(first) and "lingua-scheduler listening" in first and not first.startswith("{")


def test_configuration_doc_lists_every_serve_flag() -> None:
    from lingua_scheduler.cli import serve

    doc = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    flags = [opt for param in serve.params for opt in param.opts if opt.startswith("--")]
    assert "--log-format" in flags
    missing = [f for f in flags if f"`{f}`" not in doc and f"`{f} " not in doc]
    assert missing == [], "serve flags missing from docs/configuration.md"
