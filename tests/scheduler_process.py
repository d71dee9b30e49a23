"""A scheduler in its own process (``python -m lingua_scheduler serve``), for tests that signal it.

SIGKILL and SIGTERM have to reach a real process: an in-process test server cannot be killed without
killing the test. Configuration goes through ``LINGUA_<SECTION>__<KEY>`` environment variables (the
same path an operator uses); stderr (JSON log lines) is kept in a file and shown when a test fails.
By default the process runs the package this test run imports; ``program`` runs another installation
(an installed wheel's ``lingua-scheduler`` entry point), with ``args`` added after ``serve --port``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from tests.redis_support import free_port


def env_for(sections: dict[str, dict[str, Any]]) -> dict[str, str]:
    """``{"jobs": {"ack_timeout_ms": 400}}`` -> ``{"LINGUA_JOBS__ACK_TIMEOUT_MS": "400"}`` (TOML values)."""
    out: dict[str, str] = {}
    for section, keys in sections.items():
        for key, value in keys.items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, str):
                text = '"' + value + '"'
            else:
                text = repr(value)
            out[f"LINGUA_{section.upper()}__{key.upper()}"] = text
    return out


class SchedulerProcess:
    def __init__(
        self,
        port: int | None = None,
        *,
        program: Sequence[str] = (sys.executable, "-m", "lingua_scheduler"),
        args: Sequence[str] = (),
        cwd: Path | None = None,
        **sections: dict[str, Any],
    ) -> None:
        self.port = port or free_port()
        self.program = list(program)
        self.args = list(args)
        self.cwd = cwd
        self.sections = sections
        #: raw ``LINGUA_*`` variables, as an operator would export them (applied after ``sections``)
        self.extra_env: dict[str, str] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        fd, name = tempfile.mkstemp(prefix="lingua-sched-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def node_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/node"

    @property
    def session_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/session"

    def start(self) -> SchedulerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LINGUA_")}
        env.update(env_for({"server": {"log_level": "info"}, **self.sections}))
        env.update(self.extra_env)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*self.program, "serve", "--port", str(self.port), *self.args],
                env=env,
                cwd=self.cwd,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        return self

    async def wait_ready(self, http: aiohttp.ClientSession, timeout: float = 15.0) -> None:
        """Until ``/health`` answers (the process may take a second to import and bind)."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"scheduler exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                async with http.get(self.base + "/health", timeout=aiohttp.ClientTimeout(total=1)) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"scheduler did not answer in {timeout} s:\n{self.log_tail()}")
            await asyncio.sleep(0.05)

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: no goodbye to anyone, the kernel resets every connection."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    async def wait_exit(self, timeout: float) -> int:
        """The exit code, waiting without blocking the event loop (the test's clients keep running)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"scheduler still running after {timeout} s:\n{self.log_tail()}")
            await asyncio.sleep(0.02)
        return self.proc.returncode

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log_path.unlink(missing_ok=True)


__all__ = ["SchedulerProcess", "env_for"]
