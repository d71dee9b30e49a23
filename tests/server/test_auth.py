"""Authentication through real sockets: node enrollment and tokens, revocation (also across two
instances sharing a Redis), tenant API keys and limits, the open default, and TLS (wss://)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lingua_scheduler.clock import ManualClock
from lingua_scheduler.config import load_config
from lingua_scheduler.core.auth import hash_api_key
from lingua_scheduler.core.status import NodeStatus
from lingua_scheduler.errors import AuthenticationError
from lingua_scheduler.protocol.session import SessionInit
from lingua_scheduler.server.auth import AuthService
from lingua_scheduler.sim.nodes import Executor, SimulatedNode
from lingua_scheduler.sim.profiles import NodeProfile
from tests.conftest import RunningScheduler, eventually
from tests.redis_support import RedisServer, cluster_section, free_port, has_redis, start_instances

SECRET = "fleet-enrollment-secret-0123"
ADMIN = "admin-token-0123456789abcdef"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
NODE_AUTH: dict[str, Any] = {
    "auth": {"node_enrollment_secret": SECRET},
    "admin": {"token": ADMIN},
    "scheduler": {"fleet_view_interval_ms": 10},
}
KEY_A = "tenant-a-key-" + "a" * 32
KEY_B = "tenant-b-key-" + "b" * 32
PROFILE = NodeProfile(asr_languages=["en", "zh"], tts_languages=["en", "zh"], nmt_languages=["en", "zh"])


def tenants(query_param: bool = True, **limits_a: Any) -> dict[str, Any]:
    return {
        "auth": {
            "tenants": [
                {"tenant_id": "tenant-a", "key_sha256": hash_api_key(KEY_A), **limits_a},
                {"tenant_id": "tenant-b", "key_sha256": hash_api_key(KEY_B)},
            ],
            "api_key_query_param": query_param,
        },
        "scheduler": {"fleet_view_interval_ms": 10},
    }


async def assert_refused(
    peer: Any, reply: dict[str, Any], code: str = "UNAUTHORIZED", text: str = ""
) -> None:
    """``reply`` is an error with ``code`` naming ``text``, and the connection is then closed (1008)."""
    assert reply["type"] == "error" and reply["code"] == code, reply
    assert text in reply["message"], reply
    await eventually(lambda: peer.ws.closed)
    assert peer.ws.close_code == 1008


async def register_raw(node: SimulatedNode, **fields: Any) -> dict[str, Any]:
    """node_register with exactly these credential fields (whatever the simulator would send)."""
    waiter = node.wait_for(lambda m: m.get("type") in ("node_register_ack", "error"))
    msg = node.profile.register_message(fields.pop("node_id", None))
    for k, v in fields.items():
        setattr(msg, k, v)
    await node.send(msg)
    return await waiter


def no_secret_logged(caplog: pytest.LogCaptureFixture, *secrets_: str) -> None:
    for record in caplog.records:
        text = str(record.__dict__)
        for s in secrets_:
            assert s not in text, f"a secret was logged: {record.getMessage()}"


def ready(rs: RunningScheduler, node_id: str | None) -> bool:
    nv = rs.state.publisher.view.get(node_id or "")
    return nv is not None and nv.status is NodeStatus.READY


# --- nodes ---------------------------------------------------------------------------------------------


async def test_enrollment_issues_a_token_that_reconnects(
    scheduler_factory: Any, node_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    rs = await scheduler_factory(**NODE_AUTH)
    bare = node_factory(url=rs.node_url)
    await bare.connect()
    await assert_refused(bare, await bare.register(), text="enrollment secret")
    wrong = node_factory(url=rs.node_url, enrollment_secret="not-the-fleet-secret-0123")
    await wrong.connect()
    await assert_refused(wrong, await wrong.register(), text="wrong enrollment secret")
    assert len(rs.state.registry) == 0

    node = node_factory(url=rs.node_url, enrollment_secret=SECRET)
    ack = await node.start()
    assert ack["type"] == "node_register_ack" and ack["node_token"].startswith("v1.")
    node_id, token = ack["node_id"], ack["node_token"]
    await eventually(lambda: ready(rs, node_id))
    # re-registering on the authenticated connection needs no credential again
    assert (await register_raw(node, node_id=node_id))["type"] == "node_register_ack"
    await node.close()
    await eventually(lambda: not rs.state.registry.nodes[node_id].connected)

    again = node_factory(url=rs.node_url, node_id=node_id, node_token=token)
    ack = await again.start()
    assert ack["type"] == "node_register_ack" and ack["node_id"] == node_id and ack["node_token"] == token
    await eventually(lambda: ready(rs, node_id))
    assert await rs.metric("lingua_auth_refusals_total", '{plane="node",reason="missing"}') == 1
    assert await rs.metric("lingua_auth_refusals_total", '{plane="node",reason="invalid"}') == 1
    assert await rs.metric("lingua_node_tokens_issued_total") == 3
    no_secret_logged(caplog, SECRET, token)


async def test_reconnect_needs_that_nodes_own_token(scheduler_factory: Any, node_factory: Any) -> None:
    rs = await scheduler_factory(**NODE_AUTH)
    a = node_factory(url=rs.node_url, enrollment_secret=SECRET)
    b = node_factory(url=rs.node_url, enrollment_secret=SECRET)
    id_a, token_a = (ack := await a.start())["node_id"], ack["node_token"]
    token_b = (await b.start())["node_token"]
    await eventually(lambda: ready(rs, id_a))

    async def attempt(**fields: Any) -> tuple[SimulatedNode, dict[str, Any]]:
        n = node_factory(url=rs.node_url)
        await n.connect()
        return n, await register_raw(n, node_id=id_a, **fields)

    # while A is connected, and again after it left: nobody else gets its id
    n, reply = await attempt(node_token=token_b)
    await assert_refused(n, reply, text=f"not valid for node id {id_a}")
    assert rs.state.registry.nodes[id_a].conn is not None and ready(rs, id_a)
    await a.close()
    await eventually(lambda: not rs.state.registry.nodes[id_a].connected)
    for fields, text in (
        ({}, "needs its node token"),
        ({"enrollment_secret": SECRET}, "needs its node token"),  # the fleet secret does not pick ids
        ({"node_token": "v1.forged"}, "not valid"),
        ({"node_token": token_b}, "not valid"),
        ({"node_token": token_a + "x"}, "not valid"),
    ):
        n, reply = await attempt(**fields)
        await assert_refused(n, reply, text=text)
    assert not rs.state.registry.nodes[id_a].connected
    # the real A still gets back in
    n, reply = await attempt(node_token=token_a)
    assert reply["type"] == "node_register_ack" and reply["node_id"] == id_a


async def test_tokens_survive_a_restart_and_revocation_is_configurable(
    scheduler_factory: Any, node_factory: Any
) -> None:
    first = await scheduler_factory(**NODE_AUTH)
    node = node_factory(url=first.node_url, enrollment_secret=SECRET)
    ack = await node.start()
    # another process with the same secret verifies the token without any shared table
    restarted = await scheduler_factory(**NODE_AUTH)
    other = node_factory(url=restarted.node_url, node_id=ack["node_id"], node_token=ack["node_token"])
    assert (await other.start())["type"] == "node_register_ack"
    # ... and the configured revocation list refuses it
    cfg = {**NODE_AUTH, "auth": {**NODE_AUTH["auth"], "revoked_node_ids": [ack["node_id"]]}}
    strict = await scheduler_factory(**cfg)
    refused = node_factory(url=strict.node_url, node_id=ack["node_id"], node_token=ack["node_token"])
    await refused.connect()
    await assert_refused(refused, await refused.register(), text="revoked")


async def test_admin_revoke_disconnects_and_refuses(scheduler_factory: Any, node_factory: Any) -> None:
    rs = await scheduler_factory(**NODE_AUTH)
    node = node_factory(url=rs.node_url, enrollment_secret=SECRET)
    ack = await node.start()
    node_id, token = ack["node_id"], ack["node_token"]
    url = f"{rs.base}/api/v1/admin/nodes/{node_id}/revoke"
    async with rs.http.post(url) as r:
        assert r.status == 401
    told = node.wait_for(lambda m: m.get("type") == "error")
    async with rs.http.post(url, headers=ADMIN_HEADERS) as r:
        assert r.status == 200
        body = await r.json()
    assert body == {
        "action": "revoke",
        "node_id": node_id,
        "changed": True,
        "disconnected": True,
        "shared": True,
        "scope": "instance",
    }
    assert (await told)["code"] == "UNAUTHORIZED"
    await eventually(lambda: node.ws.closed)
    assert node.ws.close_code == 1008
    assert rs.state.registry.nodes[node_id].status is NodeStatus.OFFLINE
    back = node_factory(url=rs.node_url, node_id=node_id, node_token=token)
    await back.connect()
    await assert_refused(back, await back.register(), text="revoked")
    async with rs.http.post(url, headers=ADMIN_HEADERS) as r:
        body = await r.json()
    assert body["changed"] is False and body["disconnected"] is False
    # an id no instance knows can be revoked ahead (a stolen token of a node that is away)
    async with rs.http.post(
        f"{rs.base}/api/v1/admin/nodes/node-ELSEWHERE/revoke", headers=ADMIN_HEADERS
    ) as r:
        assert r.status == 200 and (await r.json())["changed"] is True
    async with rs.http.post(f"{rs.base}/api/v1/admin/nodes/bad%20id/revoke", headers=ADMIN_HEADERS) as r:
        assert r.status == 400
    assert await rs.metric("lingua_auth_refusals_total", '{plane="node",reason="revoked"}') == 1
    # the enrolled node can enroll again, under a new id
    fresh = node_factory(url=rs.node_url, enrollment_secret=SECRET)
    ack = await fresh.start()
    assert ack["type"] == "node_register_ack" and ack["node_id"] != node_id


async def test_ids_with_a_trailing_newline_are_refused(scheduler_factory: Any, node_factory: Any) -> None:
    """An id is matched whole: ``ID%0A`` in an admin path is not ``ID`` (revoke answers 400 and
    changes nothing, drain finds no such node), and a node may not register under ``ID\\n``."""
    rs = await scheduler_factory(**NODE_AUTH)
    node = node_factory(url=rs.node_url, enrollment_secret=SECRET)
    node_id = (await node.start())["node_id"]
    base = f"{rs.base}/api/v1/admin/nodes/{node_id}%0A"
    async with rs.http.post(f"{base}/revoke", headers=ADMIN_HEADERS) as r:
        assert r.status == 400
        assert (await r.json())["code"] == "INVALID_MESSAGE"
    async with rs.http.post(f"{base}/drain", headers=ADMIN_HEADERS) as r:
        assert r.status == 404
    assert rs.state.auth.revoked == set() and not node.ws.closed
    assert rs.state.registry.nodes[node_id].status is NodeStatus.READY
    assert await rs.metric("lingua_auth_refusals_total", '{plane="node",reason="revoked"}') == 0
    # the same id in a message
    other = node_factory(url=rs.node_url, enrollment_secret=SECRET)
    await other.connect()
    reply = await register_raw(other, node_id="node-x\n", enrollment_secret=SECRET)
    assert reply["type"] == "error" and reply["code"] == "INVALID_MESSAGE", reply
    assert "node-x\n" not in rs.state.registry.nodes


async def test_revoke_without_node_auth_is_refused(scheduler_factory: Any, node_factory: Any) -> None:
    rs = await scheduler_factory(admin={"token": ADMIN})
    node = node_factory(url=rs.node_url)
    await node.start()
    async with rs.http.post(
        f"{rs.base}/api/v1/admin/nodes/{node.node_id}/revoke", headers=ADMIN_HEADERS
    ) as r:
        assert r.status == 409 and (await r.json())["code"] == "NODE_AUTH_DISABLED"
    assert not node.ws.closed


# --- revocation across instances -----------------------------------------------------------------------


def shared(url: str, prefix: str) -> dict[str, Any]:
    return {**NODE_AUTH, "cluster": cluster_section(url, prefix, op_timeout_seconds=0.2)}


async def two_instances(factory: Any, url: str) -> list[RunningScheduler]:
    return await start_instances(factory, 2, shared(url, "auth" + secrets.token_hex(3)))


async def test_revocation_is_shared_by_instances(
    redis_server: RedisServer, scheduler_factory: Any, node_factory: Any
) -> None:
    a, b = await two_instances(scheduler_factory, redis_server.url)
    node = node_factory(url=a.node_url, enrollment_secret=SECRET)
    ack = await node.start()
    node_id, token = ack["node_id"], ack["node_token"]
    await node.close()
    await eventually(lambda: not a.state.registry.nodes[node_id].connected)
    # a token issued by A is good on B: any instance verifies it without a lookup
    moved = node_factory(url=b.node_url, node_id=node_id, node_token=token)
    assert (await moved.start())["type"] == "node_register_ack"
    # revoked on A while B holds the socket: B closes it within a tick
    async with a.http.post(f"{a.base}/api/v1/admin/nodes/{node_id}/revoke", headers=ADMIN_HEADERS) as r:
        assert r.status == 200
        body = await r.json()
    assert body["scope"] == "cluster" and body["shared"] is True and body["disconnected"] is False
    await eventually(lambda: moved.ws.closed, timeout=5)
    assert moved.ws.close_code == 1008
    assert node_id in await b.state.cluster.store.revoked_nodes()
    for rs in (a, b):
        n = node_factory(url=rs.node_url, node_id=node_id, node_token=token)
        await n.connect()
        await assert_refused(n, await n.register(), text="revoked")


async def test_revocation_during_a_store_outage_is_kept_and_shared_later(
    scheduler_factory: Any, node_factory: Any
) -> None:
    if not has_redis():
        pytest.skip("no redis-server binary")
    redis = RedisServer().start()
    try:
        a, b = await two_instances(scheduler_factory, redis.url)
        node = node_factory(url=a.node_url, enrollment_secret=SECRET)
        ack = await node.start()
        node_id, token = ack["node_id"], ack["node_token"]
        redis.stop()
        async with a.http.post(f"{a.base}/api/v1/admin/nodes/{node_id}/revoke", headers=ADMIN_HEADERS) as r:
            assert r.status == 202
            body = await r.json()
        assert body["shared"] is False and body["disconnected"] is True
        await eventually(lambda: node.ws.closed)
        # enforced here at once, whatever the store says
        n = node_factory(url=a.node_url, node_id=node_id, node_token=token)
        await n.connect()
        await assert_refused(n, await n.register(), text="revoked")
        redis.start()  # empty: the pending revocation is written again by A's sync
        await eventually(lambda: node_id in b.state.auth.revoked, timeout=10)
    finally:
        redis.close()


# --- sessions ------------------------------------------------------------------------------------------


async def test_sessions_need_a_valid_key(
    scheduler_factory: Any, session_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    rs = await scheduler_factory(**tenants())
    bare = session_factory(url=rs.session_url)
    await bare.connect()
    await assert_refused(bare, await bare.init(), text="an API key is required")
    for via in ("header", "x-api-key", "query", "init"):
        wrong = session_factory(url=rs.session_url, api_key="not-a-key", api_key_via=via)
        await wrong.connect()
        await assert_refused(wrong, await wrong.init(), text="invalid API key")
    assert rs.state.sessions == {}
    for via in ("header", "x-api-key", "query", "init"):
        s = session_factory(url=rs.session_url, api_key=KEY_A, api_key_via=via)
        ack = await s.start()
        assert ack["type"] == "session_init_ack", (via, ack)
        session = rs.state.sessions[ack["session_id"]]
        assert session.tenant_id == "tenant-a" and session.init.api_key is None
    # audio before a session is refused on an unauthenticated connection, as on any other
    bare = session_factory(url=rs.session_url)
    await bare.connect()
    err = bare.wait_for(lambda m: m.get("type") == "error")
    await bare.send({"type": "audio_chunk", "session_id": "s-00000000", "seq": 1, "is_final": True})
    assert (await err)["code"] == "INVALID_SESSION"
    assert await rs.metric("lingua_auth_refusals_total", '{plane="session",reason="invalid"}') == 4
    no_secret_logged(caplog, KEY_A)


async def test_tenant_comes_from_the_key_not_the_body(scheduler_factory: Any, session_factory: Any) -> None:
    rs = await scheduler_factory(**tenants())
    escalate = session_factory(url=rs.session_url, api_key=KEY_A, tenant_id="tenant-b")
    await escalate.connect()
    await assert_refused(escalate, await escalate.init(), text="does not match the tenant of the API key")
    assert rs.state.sessions == {}
    # two keys of different tenants on one connection
    mixed = session_factory(url=rs.session_url, api_key=KEY_A)
    await mixed.connect()
    await assert_refused(mixed, await mixed.init(api_key=KEY_B), text="invalid API key")
    same = session_factory(url=rs.session_url, api_key=KEY_B, tenant_id="tenant-b")
    ack = await same.start()
    assert rs.state.sessions[ack["session_id"]].tenant_id == "tenant-b"


async def test_tenant_limits_hold_across_instances(
    redis_server: RedisServer, scheduler_factory: Any, session_factory: Any
) -> None:
    """Two instances share tenant-a's cap of 3 sessions (not 3 each) and split its 10 jobs/s by where
    its sessions are."""
    sections = {
        **tenants(max_sessions=3, max_jobs_per_second=10.0),
        "cluster": cluster_section(redis_server.url, "ten" + secrets.token_hex(3)),
    }
    a, b = await start_instances(scheduler_factory, 2, sections)
    on_a = [session_factory(url=a.session_url, api_key=KEY_A) for _ in range(2)]
    for s in on_a:
        assert (await s.start())["type"] == "session_init_ack"
    await eventually(lambda: b.state.auth.limits.elsewhere.get("tenant-a") == 2, timeout=5)
    first_b = session_factory(url=b.session_url, api_key=KEY_A)
    assert (await first_b.start())["type"] == "session_init_ack"
    refused = await session_factory(url=b.session_url, api_key=KEY_A).start()
    assert refused["code"] == "TENANT_LIMIT" and "across the instances" in refused["message"], refused
    assert (await session_factory(url=b.session_url, api_key=KEY_B).start())["type"] == "session_init_ack"
    # the job rate follows the sessions: 2 of 3 on A, 1 of 3 on B
    await eventually(
        lambda: a.state.auth.limits.rate_share.get("tenant-a") == pytest.approx(2 / 3), timeout=5
    )
    await eventually(
        lambda: b.state.auth.limits.rate_share.get("tenant-a") == pytest.approx(1 / 3), timeout=5
    )
    # A's sessions end: B gets the whole cap and rate back within a tick or two
    for s in on_a:
        await s.close()
    await eventually(lambda: b.state.auth.limits.rate_share.get("tenant-a") == 1.0, timeout=5)
    assert (await session_factory(url=b.session_url, api_key=KEY_A).start())["type"] == "session_init_ack"


async def test_query_parameter_can_be_turned_off(scheduler_factory: Any, session_factory: Any) -> None:
    rs = await scheduler_factory(**tenants(query_param=False))
    s = session_factory(url=rs.session_url, api_key=KEY_A, api_key_via="query")
    await s.connect()
    await assert_refused(s, await s.init(), text="an API key is required")


async def test_tenant_session_cap(scheduler_factory: Any, session_factory: Any) -> None:
    rs = await scheduler_factory(**tenants(max_sessions=2))
    s1, s2, s3 = (session_factory(url=rs.session_url, api_key=KEY_A) for _ in range(3))
    assert (await s1.start())["type"] == "session_init_ack"
    assert (await s2.start())["type"] == "session_init_ack"
    refused = await s3.start()
    assert refused["type"] == "error" and refused["code"] == "TENANT_LIMIT", refused
    assert len(rs.state.sessions) == 2 and not s3.ws.closed  # the connection may try again later
    other = session_factory(url=rs.session_url, api_key=KEY_B)
    assert (await other.start())["type"] == "session_init_ack"  # limits are per tenant
    # a session_init replacing a session on the same connection does not count twice
    assert (await s2.init())["type"] == "session_init_ack"
    await s1.close()
    assert (await s3.init())["type"] == "session_init_ack"
    assert await rs.metric("lingua_auth_refusals_total", '{plane="session",reason="tenant_limit"}') == 1


async def test_tenant_job_rate(scheduler_factory: Any, session_factory: Any, node_factory: Any) -> None:
    rs = await scheduler_factory(**tenants(max_jobs_per_second=1.0, jobs_burst=2))
    node = node_factory(profile=PROFILE, url=rs.node_url, executor=Executor(latency=0.01))
    await node.start()
    await eventually(lambda: ready(rs, node.node_id))
    s = session_factory(url=rs.session_url, api_key=KEY_A)
    await s.start()
    for _ in range(4):
        await s.utterance()
    await eventually(lambda: len(s.outcomes()) == 4)
    assert s.outcomes() == {
        0: ["result"],
        1: ["result"],
        2: ["missing:job_failed"],
        3: ["missing:job_failed"],
    }
    limited = [m for m in s.of_type("error") if m["code"] == "TENANT_RATE_LIMITED"]
    assert [m["details"]["utterance_index"] for m in limited] == [2, 3]
    assert len([m for m in node.received if m["type"] == "job_assign"]) == 2  # refused = no job at all
    other = session_factory(url=rs.session_url, api_key=KEY_B)  # tenant-b has no rate limit
    await other.start()
    for _ in range(3):
        await other.utterance()
    await eventually(lambda: len(other.of_type("translation_result")) == 3)
    await asyncio.sleep(1.05)  # the bucket refills at 1 job/s
    await s.utterance()
    await eventually(lambda: s.outcomes().get(4) == ["result"])
    # nothing left behind by the refused utterances
    sid = s.session_id
    assert (await s.close())["type"] == "session_close_ack"
    assert sid not in rs.state.sessions and rs.state.engine.live_jobs_of(sid or "") == 0
    await eventually(lambda: rs.state.engine.store.inflight == 0)
    assert await rs.metric("lingua_auth_refusals_total", '{plane="session",reason="rate_limited"}') == 2


def test_refusals_are_logged_at_most_once_a_second(caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock()
    auth = AuthService(load_config(env={}, overrides=tenants()).auth, clock)

    def refuse() -> None:
        init = SessionInit(client_version="1", platform="web", src_lang="en", tgt_lang="zh", api_key="bad")
        with pytest.raises(AuthenticationError):
            auth.session_tenant(None, init)

    for _ in range(50):
        refuse()
    lines = [r for r in caplog.records if r.getMessage() == "auth refused"]
    assert len(lines) == 1 and lines[0].reason == "invalid"  # type: ignore[attr-defined]
    clock.advance(1.0)
    refuse()
    lines = [r for r in caplog.records if r.getMessage() == "auth refused"]
    assert len(lines) == 2 and lines[1].not_logged_since == 49  # type: ignore[attr-defined]
    assert auth.refusals[("session", "invalid")] == 51
    assert "bad" not in str([r.__dict__ for r in lines])


# --- the open default ----------------------------------------------------------------------------------


def auth_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "AUTHENTICATION DISABLED" in r.getMessage()]


async def test_open_default_accepts_all_and_warns(
    scheduler_factory: Any, node_factory: Any, session_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.clear()
    rs = await scheduler_factory()
    warnings = auth_warnings(caplog)
    assert any("nodes (/ws/node)" in w for w in warnings) and any(
        "sessions (/ws/session)" in w for w in warnings
    )
    node = node_factory(url=rs.node_url)
    ack = await node.start()
    assert ack["type"] == "node_register_ack" and "node_token" not in ack
    s = session_factory(url=rs.session_url, tenant_id="any-tenant")
    ack = await s.start()
    assert rs.state.sessions[ack["session_id"]].tenant_id == "any-tenant"  # open mode: the body's claim


async def test_insecure_dev_overrides_configured_secrets(
    scheduler_factory: Any, node_factory: Any, session_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.clear()
    cfg = tenants()
    cfg["auth"] |= {"node_enrollment_secret": SECRET, "insecure_dev": True}
    rs = await scheduler_factory(**cfg)
    assert all("--insecure-dev" in w for w in auth_warnings(caplog)) and len(auth_warnings(caplog)) == 2
    node = node_factory(url=rs.node_url)
    assert (await node.start())["type"] == "node_register_ack"
    s = session_factory(url=rs.session_url)
    assert (await s.start())["type"] == "session_init_ack"


async def test_only_the_unconfigured_plane_is_warned_about(
    scheduler_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.clear()
    await scheduler_factory(**NODE_AUTH)
    warnings = auth_warnings(caplog)
    assert len(warnings) == 1 and "sessions" in warnings[0]


# --- TLS -----------------------------------------------------------------------------------------------


def self_signed(tmp: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: with ``cryptography`` if installed, else ``openssl``."""
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    try:
        import datetime

        from cryptography import x509  # type: ignore[import-not-found, unused-ignore]
        from cryptography.hazmat.primitives import hashes, serialization  # type: ignore[import-not-found, unused-ignore]
        from cryptography.hazmat.primitives.asymmetric import ec  # type: ignore[import-not-found, unused-ignore]
        from cryptography.x509.oid import NameOID  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor the openssl command is available")
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        return cert, key
    import ipaddress

    pkey = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(pkey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .sign(pkey, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        pkey.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert, key


async def _stop(proc: asyncio.subprocess.Process) -> None:
    proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), 20)
    except TimeoutError:
        proc.kill()
        await proc.wait()


async def test_serve_with_tls(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    port = free_port()
    env = dict(os.environ, LINGUA_AUTH__NODE_ENROLLMENT_SECRET=SECRET)
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "lingua_scheduler", "serve", "--port", str(port)),
        *("--tls-cert", str(cert), "--tls-key", str(key)),
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stderr is not None
        first = json.loads(await asyncio.wait_for(proc.stderr.readline(), 30))
        while first["msg"] != "lingua-scheduler listening":  # after how the start fitted itself to the host
            first = json.loads(await asyncio.wait_for(proc.stderr.readline(), 30))
        assert first["node_ws"] == f"wss://127.0.0.1:{port}/ws/node"
        trust = ssl.create_default_context(cafile=str(cert))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as http:
            deadline = time.monotonic() + 15
            while True:
                try:
                    async with http.get(f"https://127.0.0.1:{port}/health") as r:
                        assert (await r.json())["status"] == "ok"
                    break
                except aiohttp.ClientConnectionError:
                    assert time.monotonic() < deadline, "the TLS listener did not come up"
                    await asyncio.sleep(0.05)
            node = SimulatedNode(http, f"wss://127.0.0.1:{port}/ws/node", PROFILE, enrollment_secret=SECRET)
            ack = await node.start()
            assert ack["type"] == "node_register_ack" and ack["node_token"].startswith("v1.")
            await node.heartbeat()
            await eventually(lambda: len(node.rtts) >= 2)  # start() sent one, acknowledged over TLS too
            await node.close()
            # the listener speaks TLS only
            with pytest.raises((aiohttp.ClientError, ConnectionError)):
                async with aiohttp.ClientSession() as plain:
                    await plain.ws_connect(f"ws://127.0.0.1:{port}/ws/node")
    finally:
        await _stop(proc)


def test_bad_tls_files_stop_the_start(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "lingua_scheduler", "serve", "--port", str(free_port())),
            *("--tls-cert", str(missing), "--tls-key", str(missing)),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "tls.cert_file" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "lingua_scheduler", "serve", "--tls-cert", str(missing)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "tls.key_file" in proc.stderr


def test_api_key_command(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lingua_scheduler", "api-key", "--tenant", "acme"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    key = out.splitlines()[1].removeprefix("# ")
    entry = tomllib.loads(out)["auth"]["tenants"][0]
    assert entry["tenant_id"] == "acme" and entry["key_sha256"] == hash_api_key(key)
    assert key not in out.split("[[auth.tenants]]")[1]  # the configuration part holds only the hash
    cfg = tmp_path / "auth.toml"
    cfg.write_text(out)
    assert load_config(cfg, env={}).auth.sessions_required
