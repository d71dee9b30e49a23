"""The command line as a user runs it: real processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_bad_config_is_rejected_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[node_health]\nheartbeat_timeout_seconds = -5\n")
    proc = subprocess.run(
        [sys.executable, "-m", "lingua_scheduler", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "node_health.heartbeat_timeout_seconds" in proc.stderr and str(cfg) in proc.stderr
    env = dict(os.environ, LINGUA_SERVER__PORT="not-a-port")
    proc = subprocess.run(
        [sys.executable, "-m", "lingua_scheduler", "serve"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert proc.returncode == 2 and "server.port" in proc.stderr
    assert "LINGUA_SERVER__PORT: " in proc.stderr  # the variable the bad value came from


def test_serve_listens_and_logs_where(tmp_path: Path) -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lingua_scheduler", "serve", "--port", str(port)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        # lines before it may say how the start fitted itself to the host (descriptor limit)
        first = json.loads(proc.stderr.readline())
        while first["msg"] != "lingua-scheduler listening":
            first = json.loads(proc.stderr.readline())
        assert first["port"] == port
        deadline = time.time() + 10
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert json.loads(r.read())["status"] == "ok"
                break
            except OSError:
                assert time.time() < deadline
                time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(10)
