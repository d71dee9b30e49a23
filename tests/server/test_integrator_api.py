"""The integrator API's routes that run no job: usage (who sees which tenant, the answer's schema) and
webhooks (signed, in order per tenant, retried after 500s, given up after the bound, bounded queue),
and in Redis mode their durability: events queued by an instance killed with SIGKILL are delivered by
another."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import jsonschema
import msgspec
import pytest
from aiohttp import web

from lingua_scheduler.core import webhook_signing
from lingua_scheduler.core.auth import hash_api_key
from lingua_scheduler.protocol import integrator as i
from lingua_scheduler.server.http.integrator_api import USAGE, WEBHOOKS
from lingua_scheduler.server.http.openapi import document
from lingua_scheduler.server.webhooks import new_event_id
from tests.conftest import RunningScheduler, eventually
from tests.redis_support import RedisServer, cluster_section, has_redis
from tests.scheduler_process import SchedulerProcess

ADMIN = "integrator-admin-token-0123456789"
SECRET = "whsec-test-0123456789abcdef"
KEYS = {"acme": "key-acme-0123456789", "globex": "key-globex-0123456789"}


class Receiver:
    """A webhook endpoint on 127.0.0.1: answers ``fail_first`` 500s, then 200 (or always ``status``)."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.attempts = 0
        self.fail_first = 0
        self.status = 200
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        body = await request.read()
        if self.attempts <= self.fail_first or self.status != 200:
            return web.Response(status=500 if self.status == 200 else self.status)
        self.received.append((dict(request.headers), body))
        return web.Response(status=204)

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/hook"
        return self

    def events(self) -> list[dict[str, Any]]:
        return [msgspec.json.decode(b) for _, b in self.received]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    assert r.runner is not None
    await r.runner.cleanup()


def tenants(url: str = "") -> list[dict[str, Any]]:
    out = []
    for tenant, key in KEYS.items():
        entry: dict[str, Any] = {"tenant_id": tenant, "key_sha256": hash_api_key(key)}
        if url and tenant == "acme":
            entry.update(webhook_url=url, webhook_secret=SECRET)
        out.append(entry)
    return out


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def schema(path: str, method: str, status: int) -> dict[str, Any]:
    op = document()["paths"][path][method]
    return {
        **op["responses"][str(status)]["content"]["application/json"]["schema"],
        "components": document()["components"],
    }


def ping(tenant: str = "acme", n: int = 0) -> i.PingEvent:
    return i.PingEvent(
        id=new_event_id(), created=int(time.time()), tenant_id=tenant, data=i.PingData(message=f"m{n}")
    )


# --- usage -------------------------------------------------------------------------------------------


async def test_usage_who_sees_what(scheduler_factory: Callable[..., Any]) -> None:
    rs: RunningScheduler = await scheduler_factory(admin={"token": ADMIN}, auth={"tenants": tenants()})
    meter = rs.app[USAGE]
    # what the job engine will call
    meter.record_audio_received("acme", "en", "zh", 12.0)
    meter.record_job("acme", "en", "zh", "completed", audio_seconds=12.0, tts_seconds=10.0)
    meter.record_audio_received("globex", "en", "de", 99.0)
    url = rs.base + "/api/v1/usage"
    async with rs.http.get(url, headers=bearer(KEYS["acme"])) as r:
        assert r.status == 200
        body = await r.json()
    jsonschema.validate(body, schema("/api/v1/usage", "get", 200))
    assert body["tenant_id"] == "acme" and body["total"]["audio_seconds_received"] == 12.0
    assert body["total"]["jobs"]["completed"] == 1 and body["total"]["tts_seconds"] == 10.0
    assert [(b["src_lang"], b["tgt_lang"]) for b in body["buckets"]] == [("en", "zh")]
    assert body["buckets"][0]["hour"].endswith(":00:00Z")
    async with rs.http.get(url, params={"tenant": "globex"}, headers=bearer(ADMIN)) as r:
        assert (await r.json())["total"]["audio_seconds_received"] == 99.0
    cases = [
        ({"tenant": "globex"}, bearer(KEYS["acme"]), 403, "FORBIDDEN"),
        ({}, {}, 401, "UNAUTHORIZED"),
        ({}, bearer("not-a-key"), 401, "UNAUTHORIZED"),
        ({}, bearer(ADMIN), 400, "INVALID_REQUEST"),
        ({"tenant": "nobody"}, bearer(ADMIN), 404, "NOT_FOUND"),
        ({"from": "yesterday"}, bearer(KEYS["acme"]), 400, "INVALID_REQUEST"),
        ({"from": "2025-01-02T00:00:00Z", "to": "2025-01-01"}, bearer(KEYS["acme"]), 400, "INVALID_REQUEST"),
    ]
    for params, headers, status, code in cases:
        async with rs.http.get(url, params=params, headers=headers) as r:
            assert (r.status, (await r.json())["code"]) == (status, code), params
    # a range before any use: zeros
    async with rs.http.get(
        url, params={"from": "1700000000", "to": "1700003600"}, headers=bearer(KEYS["acme"])
    ) as r:
        body = await r.json()
    assert body["buckets"] == [] and body["total"]["audio_seconds_received"] == 0
    assert body["from"] == "2023-11-14T22:00:00Z"
    assert await rs.metric("lingua_usage_audio_received_seconds_total", '{tenant="acme"}') == 12.0
    assert await rs.metric("lingua_usage_jobs_total", '{outcome="completed",tenant="acme"}') == 1.0


async def test_usage_without_any_credential_configured(scheduler: RunningScheduler) -> None:
    async with scheduler.http.get(scheduler.base + "/api/v1/usage") as r:
        assert (r.status, (await r.json())["code"]) == (403, "ADMIN_DISABLED")


# --- webhooks ----------------------------------------------------------------------------------------


async def test_test_ping_is_signed_and_delivered(
    scheduler_factory: Callable[..., Any], receiver: Receiver
) -> None:
    rs = await scheduler_factory(admin={"token": ADMIN}, auth={"tenants": tenants(receiver.url)})
    url = rs.base + "/api/v1/admin/webhooks/test"
    async with rs.http.post(url, params={"tenant": "acme"}, headers=bearer(ADMIN)) as r:
        assert r.status == 202
        queued = await r.json()
    jsonschema.validate(queued, schema("/api/v1/admin/webhooks/test", "post", 202))
    assert queued["durable"] is False and queued["webhook_url"] == receiver.url
    await eventually(lambda: len(receiver.received) == 1)
    headers, body = receiver.received[0]
    assert webhook_signing.verify(SECRET, headers[webhook_signing.HEADER], body, now=time.time())
    with pytest.raises(webhook_signing.SignatureError):
        webhook_signing.verify(
            "another-secret-0123456789", headers[webhook_signing.HEADER], body, now=time.time()
        )
    event = msgspec.json.decode(body, type=i.WebhookEvent)
    assert isinstance(event, i.PingEvent) and event.id == queued["event_id"] == headers["Lingua-Event-Id"]
    assert headers["Lingua-Event-Type"] == "test.ping"
    for params, status, code in [({"tenant": "globex"}, 404, "NOT_FOUND"), ({}, 400, "INVALID_REQUEST")]:
        async with rs.http.post(url, params=params, headers=bearer(ADMIN)) as r:
            assert (r.status, (await r.json())["code"]) == (status, code)
    async with rs.http.post(url, params={"tenant": "acme"}) as r:
        assert r.status == 401


async def test_order_kept_through_retries_after_500s(
    scheduler_factory: Callable[..., Any], receiver: Receiver
) -> None:
    receiver.fail_first = 3
    rs = await scheduler_factory(
        auth={"tenants": tenants(receiver.url)},
        webhooks={"backoff_initial_seconds": 0.05, "backoff_max_seconds": 0.2},
    )
    service = rs.app[WEBHOOKS]
    sent = [ping(n=n) for n in range(6)]
    assert all(service.emit(e) for e in sent)
    assert not service.emit(ping("globex"))  # no endpoint: not queued
    await eventually(lambda: len(receiver.received) == 6, timeout=10)
    assert [e["id"] for e in receiver.events()] == [e.id for e in sent]
    assert receiver.attempts == 9
    assert await rs.metric("lingua_webhook_failed_attempts_total", '{tenant="acme"}') == 3
    assert await rs.metric("lingua_webhook_events_total", '{result="delivered",tenant="acme"}') == 6
    assert await rs.metric("lingua_webhook_unrouted_total") == 1


async def test_given_up_after_the_bound(scheduler_factory: Callable[..., Any], receiver: Receiver) -> None:
    receiver.status = 500
    rs = await scheduler_factory(
        auth={"tenants": tenants(receiver.url)},
        webhooks={"backoff_initial_seconds": 0.05, "backoff_max_seconds": 0.1, "give_up_after_seconds": 0.5},
    )
    rs.app[WEBHOOKS].emit(ping())
    await eventually(lambda: rs.app[WEBHOOKS].given_up.get("acme") == 1, timeout=5)
    assert receiver.attempts >= 3 and receiver.received == []
    assert await rs.metric("lingua_webhook_events_total", '{result="given_up",tenant="acme"}') == 1
    assert await rs.metric("lingua_webhook_queued") == 0


async def test_queue_bound_drops_and_counts(
    scheduler_factory: Callable[..., Any], receiver: Receiver
) -> None:
    receiver.status = 500
    rs = await scheduler_factory(
        auth={"tenants": tenants(receiver.url)}, webhooks={"max_queued": 2, "backoff_initial_seconds": 5}
    )
    service = rs.app[WEBHOOKS]
    assert [service.emit(ping(n=n)) for n in range(4)] == [True, True, False, False]
    assert await rs.metric("lingua_webhook_dropped_total") == 2
    assert await rs.metric("lingua_webhook_queued") == 2


# --- Redis mode: an instance's death loses none --------------------------------------------------


@pytest.mark.skipif(not has_redis(), reason="no redis-server binary")
async def test_events_of_a_killed_instance_are_delivered_by_another(
    redis_server: RedisServer, receiver: Receiver
) -> None:
    receiver.status = 503  # nothing is delivered while A lives: its events stay queued
    prefix = "wh" + secrets.token_hex(3)
    cluster = cluster_section(redis_server.url, prefix)
    hook = (
        f'[{{tenant_id = "acme", key_sha256 = "{hash_api_key(KEYS["acme"])}", '
        f'webhook_url = "{receiver.url}", webhook_secret = "{SECRET}"}}]'
    )
    webhooks = {"backoff_initial_seconds": 0.1, "backoff_max_seconds": 0.3, "claim_idle_seconds": 0.5}
    procs = [SchedulerProcess(cluster=cluster, admin={"token": ADMIN}, webhooks=webhooks) for _ in range(2)]
    for p in procs:
        p.extra_env["LINGUA_AUTH__TENANTS"] = hook
    a, b = procs
    async with aiohttp.ClientSession() as http:
        try:
            a.start()
            await a.wait_ready(http)
            ids = []
            for _ in range(5):
                async with http.post(
                    a.base + "/api/v1/admin/webhooks/test", params={"tenant": "acme"}, headers=bearer(ADMIN)
                ) as r:
                    assert r.status == 202, await r.text()
                    body = await r.json()
                    assert body["durable"] is True
                    ids.append(body["event_id"])
            await eventually(lambda: receiver.attempts >= 2, timeout=10)  # A tried, and keeps them
            a.kill()
            receiver.status = 200
            b.start()
            await b.wait_ready(http)
            await eventually(lambda: len(receiver.received) >= 5, timeout=20)
            await asyncio.sleep(0.5)
            got = [e["id"] for e in receiver.events()]
            assert sorted(set(got)) == sorted(ids), b.log_tail()
            # in order: each event's first delivery comes after the one queued before it
            first = [got.index(eid) for eid in ids]
            assert first == sorted(first)
            for headers, body in receiver.received:
                webhook_signing.verify(SECRET, headers[webhook_signing.HEADER], body, now=time.time())
        finally:
            for p in procs:
                p.close()
