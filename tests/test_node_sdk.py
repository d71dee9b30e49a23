"""The node SDK's example (docs/node-sdk.md), run as a real process against a real scheduler process:
it registers, runs jobs, survives a scheduler restart under its persisted id, and drains on SIGTERM.
Plus the SDK's parts that need no scheduler (identity file, backoff)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lingua_scheduler.node import Backoff, Identity, IdentityStore, Job, Node, Refused, Result
from lingua_scheduler.sim.sessions import SimulatedSession
from tests.scheduler_process import SchedulerProcess
from tests.server.test_auth import SECRET, self_signed

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "node-sdk.md"
#: the example's promise
MAX_LINES = 30


def example_code() -> str:
    """The first python block of the SDK page."""
    m = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert m is not None, "docs/node-sdk.md has no python example"
    return m.group(1)


def test_example_is_under_30_lines() -> None:
    lines = example_code().rstrip("\n").splitlines()
    assert len(lines) < MAX_LINES, f"the example has {len(lines)} lines"


async def node_record(http: aiohttp.ClientSession, sched: SchedulerProcess, node_id: str) -> Any:
    async with http.get(f"{sched.base}/api/v1/nodes/{node_id}") as r:
        return await r.json() if r.status == 200 else None


async def until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def ready_node(http: aiohttp.ClientSession, sched: SchedulerProcess, state_file: Path) -> str:
    async def ready() -> str | None:
        node_id = IdentityStore(state_file).load()
        rec = await node_record(http, sched, node_id.node_id) if node_id else None
        return node_id.node_id if rec and rec["status"] == "ready" and rec["connected"] else None

    found: str = await until(ready, 30.0, "the example node to be ready")
    return found


async def one_job(http: aiohttp.ClientSession, sched: SchedulerProcess) -> dict[str, Any]:
    s = SimulatedSession(http, sched.session_url, src_lang="en", tgt_lang="zh")
    try:
        assert (await s.start())["type"] == "session_init_ack"
        result = s.wait_for(lambda m: m.get("type") in ("translation_result", "missing_result"), 20.0)
        await s.utterance()
        return await result
    finally:
        await s.disconnect()


def start_node(script: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, str(script)], env=env, stdout=out, stderr=out)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def test_example_node_registers_survives_a_restart_and_drains(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    script = tmp_path / "node.py"
    script.write_text(example_code())
    state_file = tmp_path / "state" / "node.json"
    sched = SchedulerProcess().start()
    node: subprocess.Popen[bytes] | None = None
    node_log = tmp_path / "node.log"
    try:
        await sched.wait_ready(http)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LINGUA_")}
        env.update(LINGUA_NODE_URL=sched.node_url, LINGUA_NODE_STATE_FILE=str(state_file))
        node = start_node(script, env, node_log)
        node_id = await ready_node(http, sched, state_file)
        assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(state_file.parent.stat().st_mode) == 0o700

        first = await one_job(http, sched)
        assert first["type"] == "translation_result", first
        assert first["text_translated"].startswith("[zh] ") and "bytes of" in first["text_asr"]
        rec = await node_record(http, sched, node_id)
        assert rec["protocol"]["sends_acks"] is True

        # the scheduler dies and comes back on the same port: the node reconnects under its id
        sched.kill()
        sched = SchedulerProcess(port=sched.port).start()
        await sched.wait_ready(http)
        assert await ready_node(http, sched, state_file) == node_id
        second = await one_job(http, sched)
        assert second["type"] == "translation_result", second

        # SIGTERM while a job runs: the node drains (no new job), finishes the job, exits 0
        s = SimulatedSession(http, sched.session_url, src_lang="en", tgt_lang="zh")
        assert (await s.start())["type"] == "session_init_ack"
        accepted = s.wait_for(lambda m: m.get("event") == "NODE_ACCEPTED", 20.0)
        result = s.wait_for(lambda m: m.get("type") == "translation_result", 20.0)
        await s.utterance()
        await accepted
        node.send_signal(signal.SIGTERM)

        async def draining() -> bool:
            rec = await node_record(http, sched, node_id)
            return bool(rec and rec["status"] == "draining")

        await until(draining, 10.0, "the node to be draining")
        assert (await result)["utterance_index"] == 0  # the running job finished
        await s.disconnect()
        deadline = time.monotonic() + 20
        while node.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110 - a process, no event
            await asyncio.sleep(0.05)
        assert node.returncode == 0, node_log.read_text()
        rec = await node_record(http, sched, node_id)
        assert any("drained by the node" in h["event"] for h in rec["history"]), rec["history"]
    except BaseException:
        print("node log:\n" + node_log.read_text(errors="replace"), "\nscheduler log:\n" + sched.log_tail())
        raise
    finally:
        if node is not None and node.poll() is None:
            node.kill()
            node.wait(10)
        sched.close()


def test_identity_file_is_private_and_replaced_whole(tmp_path: Path) -> None:
    store = IdentityStore(tmp_path / "a" / "b" / "node.json")
    assert store.load() is None
    store.save(Identity("node-1", "tok-1"))
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    store.path.chmod(0o644)
    store.save(Identity("node-1", "tok-2"))
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert store.load() == Identity("node-1", "tok-2")
    assert not list(store.path.parent.glob("*.tmp"))
    store.path.write_text('{"token": 3}')
    with pytest.raises(ValueError, match="node identity file"):
        store.load()


def test_backoff_grows_is_capped_and_jittered() -> None:
    b = Backoff(base=0.5, cap=4.0)
    delays = [b.next() for _ in range(10)]
    for i, d in enumerate(delays):
        ceiling = min(4.0, 0.5 * 2**i)
        assert ceiling / 2 <= d <= ceiling
    assert len({round(d, 6) for d in delays[5:]}) > 1  # jittered, not one fixed delay
    b.reset()
    assert b.next() <= 0.5
    with pytest.raises(ValueError, match="base"):
        Backoff(base=0.0)


async def _serve_until_registered(node: Node) -> asyncio.Task[None]:
    task = asyncio.create_task(node.serve())
    deadline = time.monotonic() + 20
    while not node.registrations:
        if task.done():
            task.result()  # raises what stopped it
        assert time.monotonic() < deadline, "the node did not register"
        await asyncio.sleep(0.02)
    return task


async def test_enrollment_over_tls_then_the_persisted_token(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    sched = SchedulerProcess(
        args=["--tls-cert", str(cert), "--tls-key", str(key)], auth={"node_enrollment_secret": SECRET}
    ).start()
    url = f"wss://127.0.0.1:{sched.port}/ws/node"
    state_file = tmp_path / "node.json"
    trust = ssl.create_default_context(cafile=str(cert))

    def make(**kw: Any) -> Node:
        return Node(
            handle_nothing,
            languages=[("en", "zh")],
            gpus=[("GPU", 8.0)],
            url=url,
            ca_file=cert,
            state_file=state_file,
            **kw,
        )

    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as http:
            deadline = time.monotonic() + 30
            while True:
                try:
                    async with http.get(f"https://127.0.0.1:{sched.port}/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                assert time.monotonic() < deadline, sched.log_tail()
                await asyncio.sleep(0.05)
        first = make(enrollment_secret=SECRET)
        task = await _serve_until_registered(first)
        enrolled = IdentityStore(state_file).load()
        assert enrolled is not None and enrolled.node_token is not None
        first.drain()
        await asyncio.wait_for(task, 20)

        again = make()  # no secret: the persisted id and token open the record
        task = await _serve_until_registered(again)
        assert again.node_id == enrolled.node_id
        again.drain()
        await asyncio.wait_for(task, 20)

        IdentityStore(state_file).save(Identity(enrolled.node_id, "v1.forged"))
        with pytest.raises(Refused) as refused:
            await asyncio.wait_for(make().serve(), 20)
        assert refused.value.code == "UNAUTHORIZED"
    finally:
        sched.close()


async def handle_nothing(job: Job) -> Result:
    return Result(text_asr="")
