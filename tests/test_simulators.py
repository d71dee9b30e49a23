"""The client commands as a user runs them (``simulate-nodes``, ``simulate-sessions``, ``loadtest``),
through the real CLI against a real scheduler process configured as production is: node enrollment
secret, tenant API keys, TLS with a self-signed certificate.

What is checked: the JSON summaries count what the scheduler did (registered, refused with its error
code), the exit status says whether anything worked, and a wrong endpoint, a refused connection, a
silent server or an untrusted certificate ends in one line on stderr within a bounded time.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lingua_scheduler.core.auth import hash_api_key
from lingua_scheduler.loadtest.runner import local_scheduler
from tests.redis_support import free_port
from tests.server.test_auth import self_signed

SECRET = "sim-enrollment-secret-0123456789"
#: bound on a failing command's run time: interpreter start-up plus the --timeout it was given
BOUND = 8.0 * float(os.environ.get("LINGUA_TEST_TIME_FACTOR", "1"))
KEY = "sim-tenant-key-0123456789abcdef"


def cli(*args: str, timeout: float = 60.0) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``lingua-scheduler ARGS`` with no ``LINGUA_`` variable inherited; the result and seconds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINGUA_")}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "lingua_scheduler", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    return proc, time.monotonic() - t0


def summaries(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


class Scheduler:
    def __init__(self, base: str, cert: Path) -> None:
        self.base = base
        self.cert = cert
        self.host_port = base.split("://", 1)[1]

    @property
    def node_url(self) -> str:
        return f"wss://{self.host_port}/ws/node"

    @property
    def session_url(self) -> str:
        return f"wss://{self.host_port}/ws/session"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scheduler]:
    """One scheduler for the module: TLS, node enrollment, one tenant key (docs/security.md)."""
    tmp = tmp_path_factory.mktemp("secured")
    cert, key = self_signed(tmp)
    config = tmp / "scheduler.toml"
    config.write_text(
        f'[tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n'
        f'[auth]\nnode_enrollment_secret = "{SECRET}"\n'
        f'[[auth.tenants]]\ntenant_id = "acme"\nkey_sha256 = "{hash_api_key(KEY)}"\n'
        "[node_health]\nheartbeat_interval_seconds = 0.5\n"
    )
    trust = ssl.create_default_context(cafile=str(cert))
    with local_scheduler({}, str(config), ssl_context=trust) as (base, _):
        yield Scheduler(base, cert)


# --- simulate-nodes ------------------------------------------------------------------------------------


def test_nodes_all_refused_exit_non_zero_with_the_reason(secured: Scheduler) -> None:
    proc, _ = cli("simulate-nodes", "--count", "3", "--url", secured.node_url, "--ca-file", str(secured.cert))
    assert proc.returncode == 1, proc.stderr
    [summary] = summaries(proc)
    assert summary["registered"] == 0 and summary["refused"] == 3 and summary["unreachable"] == 0
    [refusal] = summary["refusals"]
    assert refusal["code"] == "UNAUTHORIZED" and refusal["count"] == 3
    assert "enrollment_secret" in refusal["message"]


def test_nodes_enrol_over_tls_with_the_ca_file(secured: Scheduler) -> None:
    proc, _ = cli(
        *("simulate-nodes", "--count", "3", "--url", secured.node_url, "--duration", "1.2"),
        *("--ca-file", str(secured.cert), "--enrollment-secret", SECRET),
    )
    assert proc.returncode == 0, proc.stderr
    registered, stopped = summaries(proc)
    assert (
        registered["event"] == "registered" and registered["registered"] == 3 and registered["refused"] == 0
    )
    assert stopped["event"] == "stopped" and stopped["still_connected"] == 3
    assert stopped["heartbeats_acked"] >= 3  # the scheduler asked for 0.5 s heartbeats


def test_untrusted_certificate_is_one_line_naming_the_way_out(secured: Scheduler) -> None:
    proc, seconds = cli("simulate-nodes", "--url", secured.node_url, "--enrollment-secret", SECRET)
    assert proc.returncode == 3 and proc.stdout == ""
    line = one_line(proc)
    assert "TLS certificate not trusted" in line and "--ca-file" in line and secured.node_url in line
    assert seconds < BOUND
    # --insecure accepts the self-signed certificate (test certificates only)
    proc, _ = cli(
        *("simulate-nodes", "--count", "1", "--url", secured.node_url, "--duration", "0"),
        *("--insecure", "--enrollment-secret", SECRET),
    )
    assert proc.returncode == 0 and summaries(proc)[0]["registered"] == 1, proc.stderr


def test_plain_ws_to_a_tls_listener_and_a_path_that_is_not_a_websocket(secured: Scheduler) -> None:
    plain = secured.node_url.replace("wss://", "ws://")
    proc, seconds = cli("simulate-nodes", "--url", plain, "--timeout", "3")
    assert proc.returncode == 3 and plain in one_line(proc) and seconds < BOUND
    health = secured.node_url.replace("/ws/node", "/health")
    proc, seconds = cli("simulate-nodes", "--url", health, "--ca-file", str(secured.cert))
    assert (
        proc.returncode == 3 and "not a WebSocket endpoint (HTTP 200)" in one_line(proc) and seconds < BOUND
    )


def test_nothing_listening_and_a_silent_server_end_in_bounded_time() -> None:
    url = f"ws://127.0.0.1:{free_port()}/ws/node"
    proc, seconds = cli("simulate-nodes", "--url", url)
    assert proc.returncode == 3 and seconds < BOUND
    assert "cannot connect" in one_line(proc) and url in one_line(proc)
    # a TCP listener that never answers: the handshake waits --timeout, not forever
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"ws://127.0.0.1:{silent.getsockname()[1]}/ws/node"
        proc, seconds = cli("simulate-nodes", "--url", url, "--timeout", "1")
        assert proc.returncode == 3 and "no answer within 1 s" in one_line(proc)
        assert seconds < BOUND
        proc, seconds = cli("simulate-sessions", "--url", url.replace("node", "session"), "--timeout", "1")
        assert proc.returncode == 3 and "no answer within 1 s" in one_line(proc)
        assert seconds < BOUND


# --- simulate-sessions ---------------------------------------------------------------------------------


def test_sessions_without_a_key_are_refused_and_with_it_answered(secured: Scheduler) -> None:
    proc, _ = cli(
        *("simulate-sessions", "--count", "2", "--utterances", "1"),
        *("--url", secured.session_url, "--ca-file", str(secured.cert)),
    )
    assert proc.returncode == 1, proc.stderr
    [summary] = summaries(proc)
    assert summary["opened"] == 0 and summary["refused"] == 2 and summary["utterances"] == 0
    assert [r["code"] for r in summary["refusals"]] == ["UNAUTHORIZED"]

    proc, _ = cli(
        *("simulate-sessions", "--count", "2", "--utterances", "2", "--api-key", KEY),
        *("--url", secured.session_url, "--ca-file", str(secured.cert)),
    )
    [summary] = summaries(proc)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # no node serves en->zh on this scheduler: every utterance gets its explicit failure, none is lost
    assert summary["opened"] == 2 and summary["refused"] == 0 and summary["utterances"] == 4
    assert summary["results"] + summary["failures"] == 4 and summary["unanswered"] == 0


def test_sessions_in_rooms_hear_each_other(secured: Scheduler) -> None:
    proc, _ = cli(
        *("simulate-sessions", "--count", "6", "--utterances", "2", "--api-key", KEY),
        *("--room-size", "3", "--room-langs", "zh,de,fr"),
        *("--url", secured.session_url, "--ca-file", str(secured.cert)),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [summary] = summaries(proc)
    room = summary["room"]
    # 2 rooms of 3; each of the 12 utterances is owed to the 2 other members of its room
    assert (room["rooms"], room["members"], room["expected"]) == (2, 6, 24)
    # no node serves these pairs here: every member gets each one's explicit failure, none is lost
    assert room["heard"] + room["missing"] == 24 and room["unanswered"] == room["duplicates"] == 0


# --- loadtest ------------------------------------------------------------------------------------------

LOADTEST = (
    *("loadtest", "--nodes", "6", "--sessions", "2", "--duration", "2", "--warmup", "0.5"),
    *("--rate", "6", "--utterance-ms", "300", "--job-latency-ms", "20", "--failure-rate", "0"),
    *("--crash-rate", "0", "--no-progress"),
)


def test_loadtest_drives_an_authenticated_tls_scheduler_to_its_summary(
    secured: Scheduler, tmp_path: Path
) -> None:
    credentials = tmp_path / "credentials.toml"
    credentials.write_text(
        f'[loadtest]\nenrollment_secret = "{SECRET}"\napi_key = "{KEY}"\nca_file = "{secured.cert}"\n'
    )
    report_path = tmp_path / "report.json"
    proc, _ = cli(
        *LOADTEST,
        *("--url", secured.base, "--credentials", str(credentials), "--report", str(report_path)),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "client vs server totals" in proc.stdout and "report written" in proc.stdout
    report = json.loads(report_path.read_text())
    assert report["registration"]["nodes"] == 6 and report["registration"]["errors"] == 0
    assert report["heartbeats"]["acked_in_window"] > 0
    assert report["jobs"]["completed_in_window"] > 0 and report["jobs"]["unanswered_at_end"] == 0
    assert "UNAUTHORIZED" not in report["jobs"]["error_codes"]
    # the report says a secret was used, never what it is
    assert SECRET not in report_path.read_text() and KEY not in report_path.read_text()
    assert report["config"]["enrollment_secret"] == "(set)"


def test_loadtest_without_credentials_stops_with_the_refusal(secured: Scheduler, tmp_path: Path) -> None:
    proc, _ = cli(
        *LOADTEST,
        *("--url", secured.base, "--ca-file", str(secured.cert), "--report", str(tmp_path / "r.json")),
        timeout=120,
    )
    assert proc.returncode == 1
    line = one_line(proc)
    assert "UNAUTHORIZED" in line and "--enrollment-secret" in line


def test_loadtest_credentials_file_errors_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "credentials.toml"
    bad.write_text('api_kee = "x"\n')
    proc, _ = cli("loadtest", "--credentials", str(bad), "--url", "http://127.0.0.1:1")
    assert proc.returncode == 2 and "unknown key 'api_kee'" in one_line(proc)
    proc, _ = cli("loadtest", "--url", f"http://127.0.0.1:{free_port()}", "--no-progress")
    assert proc.returncode == 1 and "cannot connect" in one_line(proc)
