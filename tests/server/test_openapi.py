"""The OpenAPI document: it validates, it matches the router both ways, and the running server keeps it.

Three checks: the document is valid OpenAPI 3.1 (openapi-spec-validator); every route of the app is
documented and every documented operation is routed; schemathesis sends requests generated from the
document to a real server (in a thread, with live nodes) and checks status codes, content types and
response schemas; and responses describing real nodes, jobs and events are validated against the
schemas with jsonschema (random ids rarely hit a real node, so schemathesis alone would not cover them).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import aiohttp
import hypothesis
import jsonschema
import pytest
import schemathesis
from aiohttp import web
from openapi_spec_validator import validate

from lingua_scheduler.server.app import build_app
from lingua_scheduler.server.http.openapi import document
from lingua_scheduler.sim.nodes import Behavior, Executor, SimulatedNode
from lingua_scheduler.sim.profiles import NodeProfile
from tests.conftest import RunningScheduler, eventually, make_config

TOKEN = "openapi-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROFILE = NodeProfile(asr_languages=["en", "zh"], tts_languages=["en", "zh"], nmt_languages=["en", "zh"])


def test_document_is_valid_openapi() -> None:
    validate(document())
    ids = [op["operationId"] for path in document()["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids))


def routed(app: web.Application) -> set[tuple[str, str]]:
    out = set()
    for route in app.router.routes():
        if route.method == "HEAD":  # added by aiohttp for every GET
            continue
        info = route.resource.get_info() if route.resource is not None else {}
        out.add((route.method.lower(), info.get("path") or info["formatter"]))
    return out


@pytest.mark.parametrize("admin", [{}, {"token": TOKEN}])
def test_every_route_documented_and_vice_versa(admin: dict[str, str]) -> None:
    app = build_app(make_config(admin=admin))
    documented = {(m, p) for p, ops in document()["paths"].items() for m in ops}
    assert routed(app) - documented == set(), "routes missing from the OpenAPI document"
    assert documented - routed(app) == set(), "documented operations the app does not route"


async def test_served_document(scheduler: RunningScheduler) -> None:
    async with scheduler.http.get(scheduler.base + "/api/v1/openapi.json") as r:
        assert r.status == 200 and r.content_type == "application/json"
        assert await r.json() == document()


# --- real responses against the schemas ----------------------------------------------------------


def validator(component: str) -> jsonschema.protocols.Validator:
    schema = {"$ref": f"#/components/schemas/{component}", "components": document()["components"]}
    cls = jsonschema.validators.validator_for({"$schema": "https://json-schema.org/draft/2020-12/schema"})
    return cls(schema)


def response_schema(path: str, method: str, status: int) -> dict[str, Any]:
    op = document()["paths"][path][method]
    media = op["responses"][str(status)]["content"]["application/json"]["schema"]
    return {**media, "components": document()["components"]}


async def test_live_responses_match_schemas(
    scheduler_factory: Any, node_factory: Any, session_factory: Any
) -> None:
    rs: RunningScheduler = await scheduler_factory(
        admin={"token": TOKEN}, scheduler={"fleet_view_interval_ms": 10}, jobs={"ack_timeout_ms": 300}
    )
    bad = node_factory(profile=PROFILE, url=rs.node_url, executor=Executor(behavior=Behavior.NEVER_ACK))
    await bad.start()
    await eventually(lambda: len(rs.state.publisher.view.pools) > 0)
    s = session_factory(url=rs.session_url)
    await s.start()
    assigned = bad.wait_for(lambda m: m.get("type") == "job_assign")
    await s.utterance()
    job_id = (await assigned)["job_id"]
    good = node_factory(profile=PROFILE, url=rs.node_url, executor=Executor(latency=0.01))
    await good.start()
    await eventually(lambda: len(s.of_type("translation_result")) == 1, timeout=5)  # after a failover
    async with rs.http.post(rs.base + f"/api/v1/admin/nodes/{good.node_id}/drain", headers=AUTH) as r:
        jsonschema.validate(
            await r.json(), response_schema("/api/v1/admin/nodes/{node_id}/drain", "post", 200)
        )

    checks = {
        "/health": ("/health", 200),
        "/ready": ("/ready", 200),
        "/api/v1/stats": ("/api/v1/stats", 200),
        "/api/v1/events": ("/api/v1/events", 200),
        "/api/v1/nodes?limit=1": ("/api/v1/nodes", 200),
        f"/api/v1/nodes/{good.node_id}": ("/api/v1/nodes/{node_id}", 200),
        "/api/v1/nodes/nope": ("/api/v1/nodes/{node_id}", 404),
        "/api/v1/pools": ("/api/v1/pools", 200),
        "/api/v1/pools/simulate?src_lang=en&tgt_lang=zh": ("/api/v1/pools/simulate", 200),
        "/api/v1/pools/simulate?src_lang=en": ("/api/v1/pools/simulate", 400),
        f"/api/v1/jobs/{job_id}": ("/api/v1/jobs/{job_id}", 200),
        "/api/v1/sessions": ("/api/v1/sessions", 200),
    }
    for url, (path, status) in checks.items():
        async with rs.http.get(rs.base + url) as r:
            assert r.status == status, url
            body = await r.json()
        jsonschema.validate(body, response_schema(path, "get", status))
    stats = await rs.get_json("/api/v1/stats")
    assert stats["language_pairs"] and stats["language_pairs"][0]["supply"] is not None
    events = (await rs.get_json("/api/v1/events"))["events"]
    assert {"failover", "admin", "node_status"} <= {e["kind"] for e in events}
    job = await rs.get_json(f"/api/v1/jobs/{job_id}")
    assert job["attempt"] == 2 and len(job["tried_nodes"]) == 2


# --- schemathesis against a live server ------------------------------------------------------------


@pytest.fixture(scope="module")
def live_base() -> Iterator[str]:
    """A scheduler with two live simulated nodes, served from its own event loop in a thread."""
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        stop = asyncio.Event()
        box["stop"] = stop
        box["loop"] = asyncio.get_running_loop()
        app = build_app(make_config(admin={"token": TOKEN}, scheduler={"fleet_view_interval_ms": 10}))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        box["base"] = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            nodes = [SimulatedNode(http, f"ws://127.0.0.1:{port}/ws/node", PROFILE) for _ in range(2)]
            for n in nodes:
                await n.start()
            ready.set()
            await stop.wait()
            for n in nodes:
                await n.close()
        await runner.cleanup()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(20), "live scheduler did not start"
    yield box["base"]
    box["loop"].call_soon_threadsafe(box["stop"].set)
    thread.join(20)


schema = (
    schemathesis.openapi.from_dict(document())
    .exclude(tag="websocket")  # upgrades, not request/response
    .exclude(operation_id="dashboard_stream")  # an endless event stream (tested in test_dashboard)
)


@schema.parametrize()
@hypothesis.settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
)
def test_api_conforms(case: schemathesis.Case, live_base: str) -> None:
    headers = AUTH if case.path.startswith("/api/v1/admin") else None
    # Blank filter values (``?kind=``, ``?status=``) mean "no filter", as HTML forms send them: the
    # server accepts them on purpose, so the check that every schema-violating request is refused is
    # left out. Negative cases still run every other check (no 5xx, documented status, schemas).
    excluded = [schemathesis.checks.negative_data_rejection]
    if case.path == "/v1/speech/translate":
        # An upload must be real audio (an Ogg page's CRC, a WAV header...), which no schema can say:
        # a schema-valid body of random bytes is rightly refused (400 with details.reason). A language
        # pair no node serves is answered 503 NO_AVAILABLE_NODE, as documented: only a 500 is a fault.
        excluded += [schemathesis.checks.positive_data_acceptance, schemathesis.checks.not_a_server_error]
        response = case.call(base_url=live_base, headers=headers, timeout=10)
        assert response.status_code != 500, response.text
        case.validate_response(response, excluded_checks=excluded)
        return
    case.call_and_validate(base_url=live_base, headers=headers, timeout=10, excluded_checks=excluded)
