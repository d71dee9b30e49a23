"""The generated OpenAPI document against live answers, in the embedded mode and in the Redis mode (two
instances on a real redis-server): every GET operation of the document is requested on a scheduler with
nodes, a session and a job, and each JSON answer is validated against the schema documented for its
status; so are the error answers of a few refused requests (their ``code`` must be one the operation
lists for that status)."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import jsonschema

from lingua_scheduler.protocol import asyncapi
from lingua_scheduler.protocol import http as h
from lingua_scheduler.server.events import KINDS
from lingua_scheduler.server.http import routes
from lingua_scheduler.server.http.openapi import document
from lingua_scheduler.sim.profiles import NodeProfile
from tests.conftest import RunningScheduler, eventually
from tests.redis_support import RedisServer, cluster_cfg, ready_in_view, start_instances

TOKEN = "openapi-live-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROFILE = NodeProfile(asr_languages=["en", "zh"], tts_languages=["en", "zh"], nmt_languages=["en", "zh"])
#: operations not requested: WebSocket upgrades and the endless event stream (tested elsewhere)
SKIPPED = {"node_websocket", "session_websocket", "stream_websocket", "dashboard_stream"}
_VALIDATOR = jsonschema.validators.validator_for({"$schema": "https://json-schema.org/draft/2020-12/schema"})


def _schema(path: str, method: str, status: int) -> dict[str, Any]:
    op = document()["paths"][path][method]
    assert str(status) in op["responses"], f"{method.upper()} {path} answered {status}, not documented"
    media = op["responses"][str(status)]["content"]["application/json"]["schema"]
    return {**media, "components": document()["components"]}


def _validate(body: Any, path: str, method: str, status: int) -> None:
    _VALIDATOR(_schema(path, method, status)).validate(body)


async def _walk(
    rs: RunningScheduler, node_id: str, job_id: str, absent: frozenset[str] = frozenset()
) -> set[str]:
    """Every GET of the document on ``rs``, each validated; returns the operation ids requested.
    The operations in ``absent`` may answer a documented error (the instance does not hold the job)."""
    fill = {"{node_id}": node_id, "{job_id}": job_id, "{name}": "dashboard.js"}
    done = set()
    for path, ops in document()["paths"].items():
        op = ops.get("get")
        if op is None or op["operationId"] in SKIPPED:
            continue
        url = path
        for k, v in fill.items():
            url = url.replace(k, v)
        if op["operationId"] == "simulate_selection":
            url += "?src_lang=en&tgt_lang=zh"
        if op["operationId"] == "usage":  # no tenant is configured here: a documented 404 (test_usage_api)
            url += "?tenant=acme"
        async with rs.http.get(rs.base + url, headers=AUTH, allow_redirects=False) as r:
            responses = op["responses"]
            assert str(r.status) in responses, (url, r.status)
            content = responses[str(r.status)].get("content", {})
            if r.content_type == "application/json" and "application/json" in content:
                _validate(await r.json(), path, "get", r.status)
            else:
                assert r.content_type in content or not content, (url, r.content_type)
            expected_error = op["operationId"] in absent or (op["operationId"] == "usage" and r.status == 404)
            assert r.status < 400 or expected_error, (url, r.status, await r.text())
        done.add(op["operationId"])
    return done


async def _refusals(rs: RunningScheduler) -> None:
    cases = [
        ("/api/v1/nodes/node-NOPE", "/api/v1/nodes/{node_id}", 404, None),
        ("/api/v1/nodes?limit=0", "/api/v1/nodes", 400, None),
        ("/api/v1/events?kind=bogus", "/api/v1/events", 400, None),
        ("/api/v1/pools/simulate?src_lang=en", "/api/v1/pools/simulate", 400, None),
        ("/api/v1/stats/series?window=5", "/api/v1/stats/series", 400, None),
        ("/api/v1/jobs/job-NOPE", "/api/v1/jobs/{job_id}", 404, None),
        ("/api/v1/admin/check", "/api/v1/admin/check", 401, {"Authorization": "Bearer wrong"}),
    ]
    for url, path, status, headers in cases:
        async with rs.http.get(rs.base + url, headers=headers) as r:
            assert r.status == status, url
            body = await r.json()
        _validate(body, path, "get", status)
    async with rs.http.post(rs.base + "/api/v1/admin/offline-nodes/forget", headers=AUTH) as r:
        assert r.status == 400
        _validate(await r.json(), "/api/v1/admin/offline-nodes/forget", "post", 400)


async def _traffic(
    rs: RunningScheduler, node_url: str, node_factory: Any, session_factory: Any
) -> tuple[str, str]:
    node = node_factory(profile=PROFILE, url=node_url)
    await node.start()
    await eventually(lambda: ready_in_view(rs, node.node_id), timeout=5)
    s = session_factory(url=rs.session_url)
    await s.start()
    await s.utterance()
    await eventually(lambda: len(s.of_type("translation_result")) == 1, timeout=5)
    job_id = next(iter(j.job_id for j in rs.state.engine.store))
    return node.node_id, job_id


def test_the_document_lists_what_the_code_has() -> None:
    assert tuple(KINDS) == h.EVENT_KINDS
    # every code the HTTP API answers with has its status, and the AsyncAPI tables say it is sent there
    http_codes = {c for c, (_, where) in asyncapi.ERROR_CODES.items() if "http" in where}
    assert set(h.HTTP_STATUS) == http_codes
    for route in routes.ROUTES:
        assert set(route.error_codes()) <= http_codes, route.op
    every_get = {op["operationId"] for ops in document()["paths"].values() if (op := ops.get("get"))}
    assert len(every_get - SKIPPED) >= 20


async def test_live_answers_embedded(scheduler_factory: Any, node_factory: Any, session_factory: Any) -> None:
    rs: RunningScheduler = await scheduler_factory(
        admin={"token": TOKEN}, scheduler={"fleet_view_interval_ms": 10}
    )
    node_id, job_id = await _traffic(rs, rs.node_url, node_factory, session_factory)
    health = await rs.get_json("/health")
    assert health["mode"] == "embedded" and "instance_id" not in health
    done = await _walk(rs, node_id, job_id)
    every_get = {op["operationId"] for ops in document()["paths"].values() if (op := ops.get("get"))}
    assert done == every_get - SKIPPED
    await _refusals(rs)


async def test_live_answers_redis_mode(
    redis_server: RedisServer, scheduler_factory: Any, node_factory: Any, session_factory: Any
) -> None:
    sections = cluster_cfg(redis_server.url, "oa" + secrets.token_hex(3))
    a, b = await start_instances(scheduler_factory, 2, {**sections, "admin": {"token": TOKEN}})
    # the node on b, the session on a: a's node detail names b, its stats carry the cluster totals
    node_id, _ = await _traffic(a, b.node_url, node_factory, session_factory)
    job_id = next(iter(j.job_id for j in a.state.engine.store))
    await eventually(lambda: a.state.engine.store.get(job_id) is not None)

    async def both_instances() -> bool:
        return len((await a.get_json("/api/v1/cluster"))["instances"]) == 2

    for _ in range(100):
        if await both_instances():
            break
        await asyncio.sleep(0.05)
    for rs in (a, b):
        health = await rs.get_json("/health")
        assert health["mode"] == "redis" and health["status"] == "ok" and health["store"] == "ok"
        await _walk(rs, node_id, job_id, frozenset() if rs is a else frozenset({"get_job"}))
        await _refusals(rs)
    stats = await a.get_json("/api/v1/stats")
    assert stats["cluster"]["instances"] == 2
    _validate(stats, "/api/v1/stats", "get", 200)

    # the store stops answering: /health says degraded, as the document allows
    redis_server.pause()
    try:
        await eventually(lambda: a.state.runtime.cluster.degraded, timeout=15)
        health = await a.get_json("/health")
        assert health["status"] == "degraded" and "store_reason" in health
        _validate(health, "/health", "get", 200)
        async with a.http.get(a.base + "/api/v1/cluster") as r:
            if r.status != 200:  # degraded: the view's fresh reading fails
                assert r.status == 503
                body = await r.json()
                assert body["code"] == "STORE_UNAVAILABLE"
                _validate(body, "/api/v1/cluster", "get", 503)
    finally:
        redis_server.resume()


def test_breakdown_lists_every_selection_reason() -> None:
    """The dry run's breakdown is the selector's exclusion reasons, in order: a reason added to
    ``core.selection.REASONS`` without its field would make ``/api/v1/pools/simulate`` answer 500."""
    from lingua_scheduler.core.selection import REASONS
    from lingua_scheduler.protocol.http import Breakdown

    fields = list(Breakdown.__struct_fields__)
    assert fields == ["total_nodes", *REASONS, "eligible", "excluded"]
