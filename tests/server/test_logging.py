"""Structured logs: per-module levels from config, trace ids on job and session lines, no text at INFO."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from lingua_scheduler.config import load_config
from lingua_scheduler.errors import ConfigError
from lingua_scheduler.server.logs import JsonFormatter, setup_logging
from lingua_scheduler.sim.nodes import Behavior, Executor
from lingua_scheduler.sim.sessions import pcm_chunk
from tests.conftest import RunningScheduler, eventually


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    touched = ["lingua_scheduler.server.dispatcher", "lingua_scheduler.server", "aiohttp.access"]
    levels = {n: logging.getLogger(n).level for n in touched}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for n, lvl in levels.items():
        logging.getLogger(n).setLevel(lvl)


def test_per_module_levels_from_config(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    config = load_config(
        env={
            "LINGUA_SERVER__LOG_LEVEL": '"warning"',
            "LINGUA_SERVER__LOG_LEVELS": '{"lingua_scheduler.server.dispatcher" = "debug"}',
        }
    )
    setup_logging(config.server.log_level, config.server.log_levels)
    chatty = logging.getLogger("lingua_scheduler.server.dispatcher")
    quiet = logging.getLogger("lingua_scheduler.server.ws.node_endpoint")
    assert chatty.isEnabledFor(logging.DEBUG) and not quiet.isEnabledFor(logging.INFO)
    chatty.debug("placed", extra={"job_id": "job-1", "trace_id": "trace-1"})
    quiet.info("not shown")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(r["level"], r["msg"], r["job_id"], r["trace_id"]) for r in lines] == [
        ("debug", "placed", "job-1", "trace-1")
    ]
    with pytest.raises(ConfigError) as err:
        load_config(env={"LINGUA_SERVER__LOG_LEVELS": '{"x" = "loud"}'})
    assert err.value.key == "server.log_levels"


async def test_trace_ids_and_no_text_at_info(
    scheduler_factory: Any, node_factory: Any, session_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="lingua_scheduler")
    rs: RunningScheduler = await scheduler_factory(
        scheduler={"fleet_view_interval_ms": 10}, jobs={"ack_timeout_ms": 300}, session={"pause_ms": 300}
    )
    bad = node_factory(url=rs.node_url, executor=Executor(behavior=Behavior.NEVER_ACK))
    await bad.start()
    await eventually(lambda: bool(rs.state.publisher.view.pools))
    s = session_factory(url=rs.session_url)
    await s.start()
    assigned = bad.wait_for(lambda m: m.get("type") == "job_assign")
    await s.speak(chunks=2)
    await assigned
    good = node_factory(url=rs.node_url, executor=Executor(latency=0.01))
    await good.start()
    await eventually(lambda: len(s.of_type("translation_result")) == 1, timeout=5)
    result = s.of_type("translation_result")[0]
    await s.close()

    fmt = JsonFormatter()
    lines = [json.loads(fmt.format(r)) for r in caplog.records if r.name.startswith("lingua_scheduler")]
    by_msg = {line["msg"]: line for line in lines}
    failover = by_msg["job failover"]
    assert failover["job_id"] == result["job_id"] and failover["node_id"] == bad.node_id
    assert failover["session_id"] == s.session_id and failover["trace_id"] == result["trace_id"]
    for msg in ("session created", "session closed"):
        assert by_msg[msg]["session_id"] == s.session_id and by_msg[msg]["trace_id"] == result["trace_id"]
    assert by_msg["node registered"]["node_id"] in (bad.node_id, good.node_id)
    # never audio or transcript text at INFO or above
    secrets = [
        result["text_asr"],
        result["text_translated"],
        "partial 0",
        pcm_chunk()[:40],  # base64 audio
    ]
    for line in lines:
        if line["level"] in ("info", "warning", "error", "critical"):
            text = json.dumps(line)
            assert not any(secret in text for secret in secrets), line
