"""The integrator front doors through a real server and simulated nodes: ``POST /v1/speech/translate``
with each audio type, auto source, TTS on and off, long audio in order, idempotent retries, the limits
and quotas; ``/v1/stream`` end to end and with a node dying mid-job; usage figures that match what the
nodes did; lifecycle webhooks from real session events; client cancel (``utterance_cancel``, and an
HTTP caller leaving)."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import signal
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import msgspec
import pytest

from lingua_scheduler.core.auth import hash_api_key
from lingua_scheduler.node import Job
from lingua_scheduler.protocol.node import JobAssign
from lingua_scheduler.server.http.openapi import document
from lingua_scheduler.sim.nodes import Behavior, Executor, SimulatedNode
from lingua_scheduler.sim.profiles import NodeProfile
from tests.conftest import RunningScheduler, eventually
from tests.core.audio_files import PACKET_20MS, ogg_opus, wav
from tests.redis_support import RedisServer, cluster_section, has_redis, ready_in_view
from tests.scheduler_process import SchedulerProcess
from tests.server.test_integrator_api import Receiver

KEYS = {"acme": "key-acme-0123456789", "globex": "key-globex-0123456789"}
SECRET = "whsec-test-0123456789abcdef"
PROFILE = NodeProfile(asr_languages=["en", "zh"], tts_languages=["en", "zh"], nmt_languages=["en", "zh"])
TRANSLATE = "/v1/speech/translate"
EN_ZH = {"src_lang": "en", "tgt_lang": "zh"}
#: what the simulated node answers as speech: 3 bytes of pcm16 (base64)
NODE_TTS = base64.b64encode(b"\0\0\0").decode()


@pytest.fixture
async def hooks() -> AsyncIterator[Receiver]:
    """A webhook endpoint on 127.0.0.1 (answers 204)."""
    r = await Receiver().start()
    yield r
    assert r.runner is not None
    await r.runner.cleanup()


def tenants(url: str = "", **acme: Any) -> list[dict[str, Any]]:
    out = []
    for tenant, key in KEYS.items():
        entry: dict[str, Any] = {"tenant_id": tenant, "key_sha256": hash_api_key(key)}
        if tenant == "acme":
            entry.update(acme)
            if url:
                entry.update(webhook_url=url, webhook_secret=SECRET)
        out.append(entry)
    return out


def auth(tenant: str = "acme", **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}", **headers}


def pcm(ms: int, rate: int = 16000) -> bytes:
    """``ms`` of a (non-silent) 16-bit tone."""
    n = rate * ms // 1000
    return struct.pack(f"<{n}h", *((1000 if (i // 20) % 2 else -1000) for i in range(n)))


def opus_packets(n: int) -> list[bytes]:
    return [PACKET_20MS[:1] + bytes([i % 251 + 1]) * 60 for i in range(n)]


def framed(packets: list[bytes]) -> bytes:
    return b"".join(struct.pack("<H", len(p)) + p for p in packets)


def schema(status: int = 200) -> dict[str, Any]:
    op = document()["paths"][TRANSLATE]["post"]
    return {
        **op["responses"][str(status)]["content"]["application/json"]["schema"],
        "components": document()["components"],
    }


async def start(
    factory: Callable[..., Any], node_factory: Callable[..., Any], n_nodes: int = 1, **sections: Any
) -> tuple[RunningScheduler, list[SimulatedNode]]:
    sections.setdefault("auth", {"tenants": tenants()})
    sections.setdefault("scheduler", {"fleet_view_interval_ms": 10})
    rs: RunningScheduler = await factory(**sections)
    nodes = []
    for _ in range(n_nodes):
        node = node_factory(profile=PROFILE, url=rs.node_url, executor=Executor(latency=0.01))
        await node.start()
        await eventually(lambda node=node: ready_in_view(rs, node.node_id), timeout=5)
        nodes.append(node)
    return rs, nodes


async def post(rs: RunningScheduler, data: Any, *, params: Any = None, **headers: str) -> tuple[int, Any]:
    async with rs.http.post(rs.base + TRANSLATE, data=data, params=params, headers=headers) as r:
        if r.content_type == "application/json":
            return r.status, await r.json()
        return r.status, (r.content_type, dict(r.headers), await r.read())


def form(audio: bytes, ctype: str, **fields: str) -> aiohttp.FormData:
    f = aiohttp.FormData()
    f.add_field("audio", audio, filename="clip", content_type=ctype)
    for k, v in fields.items():
        f.add_field(k, v)
    return f


# --- POST /v1/speech/translate ------------------------------------------------------------------


async def test_each_audio_type_is_translated(scheduler_factory: Any, node_factory: Any) -> None:
    rs, (node,) = await start(scheduler_factory, node_factory)
    seen: list[dict[str, Any]] = []
    node.on_message = lambda m: seen.append(m) if m.get("type") == "job_assign" else None
    cases: list[tuple[Any, dict[str, str], dict[str, str], str, int]] = [
        (form(wav(pcm(500)), "audio/wav", src_lang="en", tgt_lang="zh"), {}, {}, "pcm16", 16000),
        (ogg_opus(opus_packets(25), rate=16000), {"Content-Type": "audio/ogg"}, EN_ZH, "opus", 16000),
        (pcm(300, 8000), {"Content-Type": "audio/l16; rate=8000"}, EN_ZH, "pcm16", 8000),
        (framed(opus_packets(10)), {}, {"audio_format": "opus", **EN_ZH}, "opus", 16000),
    ]  # fmt: skip
    for data, headers, params, fmt, rate in cases:
        status, body = await post(rs, data, params=params, **auth(), **headers)
        assert status == 200, body
        jsonschema.validate(body, schema())
        assert body["transcript"] == "asr 0" and body["text"] == body["translation"]
        assert body["audio_tts"] == NODE_TTS and body["tts_format"] == "pcm16"
        assert body["job_id"] == body["utterances"][0]["job_id"] and len(body["utterances"]) == 1
        assert (seen[-1]["audio_format"], seen[-1]["sample_rate"]) == (fmt, rate)
    assert len(seen) == 4
    # the jobs ran as sessions: ended, none left behind
    await eventually(lambda: not rs.state.sessions and rs.state.engine.tracked_jobs() == 0)


async def test_auto_source_tts_off_metadata_and_audio_answer(
    scheduler_factory: Any, node_factory: Any
) -> None:
    rs, (node,) = await start(scheduler_factory, node_factory)
    seen: list[dict[str, Any]] = []
    node.on_message = lambda m: seen.append(m) if m.get("type") == "job_assign" else None
    meta = {"domain": "medical", "customer_ref": "c-42"}
    status, body = await post(
        rs,
        form(pcm(400), "audio/l16", src_lang="auto", tgt_lang="en", tts="false", metadata=json.dumps(meta)),
        **auth(),
    )
    assert status == 200, body
    assert seen[-1]["src_lang"] == "auto" and seen[-1]["pipeline"]["use_tts"] is False
    assert seen[-1]["metadata"] == meta and body["metadata"] == meta
    assert body["tgt_lang"] == "en" and body["translation"] == "en 0"
    # Accept: audio/* -> the speech alone
    status, (ctype, headers, audio) = await post(rs, pcm(300), params=EN_ZH, **auth(Accept="audio/*"))
    assert (
        status == 200
        and ctype == "audio/l16"
        and audio == b"\0\0\0"
        and headers["X-Job-Id"].startswith("job")
    )
    # metadata over its bounds is refused, naming the field
    big = json.dumps({f"k{i}": "v" for i in range(17)})
    status, body = await post(rs, form(pcm(100), "audio/l16", metadata=big), **auth())
    assert (status, body["code"], body["details"]["field"]) == (400, "INVALID_REQUEST", "metadata")


async def test_long_audio_is_cut_and_answered_in_order(scheduler_factory: Any, node_factory: Any) -> None:
    rs, _ = await start(
        scheduler_factory, node_factory, n_nodes=2, session={"max_duration_ms": 1000, "pause_ms": 300}
    )
    status, body = await post(rs, pcm(3500), params={"src_lang": "en", "tgt_lang": "zh"}, **auth())
    assert status == 200, body
    utts = body["utterances"]
    assert [u["index"] for u in utts] == [0, 1, 2, 3]
    assert [u["translation"] for u in utts] == ["zh 0", "zh 1", "zh 2", "zh 3"]
    assert [u["start_ms"] for u in utts] == [0, 1000, 2000, 3000]
    assert sum(u["duration_ms"] for u in utts) == 3500 == body["audio_duration_ms"]
    assert body["translation"] == "zh 0 zh 1 zh 2 zh 3"
    assert base64.b64decode(body["audio_tts"]) == b"\0\0\0" * 4


async def test_idempotent_retry_gets_the_first_answer(scheduler_factory: Any, node_factory: Any) -> None:
    rs, (node,) = await start(scheduler_factory, node_factory)
    key = {"Idempotency-Key": "order-17"}
    first = await post(rs, pcm(300), params=EN_ZH, **auth(**key))
    again = await post(rs, pcm(300), params=EN_ZH, **auth(**key))
    assert first[0] == again[0] == 200 and first[1]["job_id"] == again[1]["job_id"]
    assert node.jobs_received == 1
    # concurrent retries: one run, one answer for all
    answers = await asyncio.gather(
        *(post(rs, pcm(300), params=EN_ZH, **auth(**{"Idempotency-Key": "k2"})) for _ in range(3))
    )
    assert len({a[1]["job_id"] for a in answers}) == 1 and node.jobs_received == 2
    # the key is the tenant's: another tenant's same key runs its own
    other = await post(rs, pcm(300), params=EN_ZH, **auth("globex", **key))
    assert other[1]["job_id"] != first[1]["job_id"] and node.jobs_received == 3


async def test_limits_and_refusals(scheduler_factory: Any, node_factory: Any) -> None:
    rs, _ = await start(
        scheduler_factory,
        node_factory,
        integrator={"translate_max_body_bytes": 20_000, "translate_max_audio_seconds": 0.5},
    )
    cases = [
        (pcm(100), {}, 401, "UNAUTHORIZED"),
        (pcm(100), {"Authorization": "Bearer nope"}, 401, "UNAUTHORIZED"),
        (b"x" * 30_000, auth(), 413, "MESSAGE_TOO_LARGE"),
        (pcm(600), auth(), 413, "MESSAGE_TOO_LARGE"),
        (b"{}", auth(**{"Content-Type": "application/json"}), 415, "UNSUPPORTED_MEDIA_TYPE"),
        (b"RIFF\0\0\0\0WAVEjunk", auth(), 400, "INVALID_REQUEST"),
        (b"", auth(), 400, "INVALID_REQUEST"),
    ]
    for data, headers, status, code in cases:
        got = await post(rs, data, **headers)
        assert (got[0], got[1]["code"]) == (status, code), (status, code, got)
    # a pair no node serves: the session machinery's own code
    got = await post(rs, pcm(200), params={"src_lang": "de", "tgt_lang": "fr"}, **auth())
    assert (got[0], got[1]["code"]) == (503, "NO_AVAILABLE_NODE")
    assert not rs.state.sessions


async def test_deadline_and_a_caller_leaving_cancel_the_job(
    scheduler_factory: Any, node_factory: Any
) -> None:
    rs, (node,) = await start(scheduler_factory, node_factory, integrator={"translate_deadline_seconds": 0.5})
    node.executor.latency = 5.0
    cancels: list[dict[str, Any]] = []
    node.on_message = lambda m: cancels.append(m) if m.get("type") == "job_cancel" else None
    got = await post(rs, pcm(300), params=EN_ZH, **auth())
    assert (got[0], got[1]["code"]) == (504, "JOB_TIMEOUT")
    await eventually(lambda: len(cancels) == 1)
    # a caller that gives up: its connection closes, the job is cancelled on the node
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(post(rs, pcm(300), params=EN_ZH, **auth()), 0.2)
    await eventually(lambda: len(cancels) == 2)
    await eventually(lambda: not rs.state.sessions and rs.state.engine.tracked_jobs() == 0)


async def test_quota_on_every_front_door_with_warning(
    scheduler_factory: Any, node_factory: Any, hooks: Receiver
) -> None:
    # 0.05 min = 3 s a day: 2 s pass (80 % warns at 2.4 s, not yet), 0.5 s more warns, then refused
    rs, _ = await start(
        scheduler_factory, node_factory, auth={"tenants": tenants(hooks.url, daily_audio_minutes=0.05)}
    )
    assert (await post(rs, pcm(2000), params=EN_ZH, **auth()))[0] == 200
    assert (await post(rs, pcm(500), params=EN_ZH, **auth()))[0] == 200
    status, body = await post(rs, pcm(600), params=EN_ZH, **auth())
    assert (status, body["code"], body["details"]["period"]) == (429, "QUOTA_EXCEEDED", "daily")
    assert body["details"]["reset_at"].endswith("T00:00:00Z")
    # the stream: its utterance is refused with the same code
    async with rs.http.ws_connect(rs.base + "/v1/stream", headers=auth()) as ws:
        await ws.send_json({"type": "start", "src_lang": "en", "tgt_lang": "zh"})
        assert (await ws.receive_json())["type"] == "started"
        await ws.send_json({"type": "audio", "chunk": base64.b64encode(pcm(600)).decode()})
        err = await ws.receive_json()
        assert (err["type"], err["code"], err["utterance_index"]) == ("error", "QUOTA_EXCEEDED", 0)
    # a session: 0.5 s still fit, its session_init passes; once used up, session_init is refused
    async with rs.http.ws_connect(rs.session_url, headers=auth()) as ws:
        init = {
            "type": "session_init",
            "client_version": "t",
            "platform": "web",
            "src_lang": "en",
            "tgt_lang": "zh",
        }
        await ws.send_json({**init, "audio_format": "pcm16"})
        ack = await ws.receive_json()
        assert ack["type"] == "session_init_ack"
        chunk = base64.b64encode(pcm(500)).decode()
        sid = ack["session_id"]
        await ws.send_json(
            {"type": "audio_chunk", "session_id": sid, "seq": 0, "is_final": True, "payload": chunk}
        )
        while (await ws.receive_json())["type"] != "translation_result":
            pass
    await eventually(lambda: len([e for e in hooks.events() if e["type"] == "quota.warning"]) == 1)
    warning = next(e for e in hooks.events() if e["type"] == "quota.warning")
    assert warning["data"]["period"] == "daily" and warning["data"]["limit_seconds"] == 3.0
    async with rs.http.ws_connect(rs.session_url, headers=auth()) as ws:
        await ws.send_json({**init, "audio_format": "pcm16"})
        msg = await ws.receive_json()
        assert (msg["type"], msg["code"]) == ("error", "QUOTA_EXCEEDED")
    # another tenant is not limited by acme's quota
    assert (await post(rs, pcm(600), params=EN_ZH, **auth("globex")))[0] == 200


async def test_tenant_caps_and_monthly_quota(scheduler_factory: Any, node_factory: Any) -> None:
    acme = {"max_sessions": 1, "monthly_audio_minutes": 0.02}  # 1.2 s a month
    rs, (node,) = await start(scheduler_factory, node_factory, auth={"tenants": tenants(**acme)})
    node.executor.latency = 0.5
    slow = asyncio.ensure_future(post(rs, pcm(500), params=EN_ZH, **auth()))
    await eventually(lambda: node.running_jobs == 1)
    status, body = await post(rs, pcm(100), params=EN_ZH, **auth())  # the tenant's one session is busy
    assert (status, body["code"]) == (429, "TENANT_LIMIT")
    jsonschema.validate(body, schema(429))
    assert (await slow)[0] == 200
    status, body = await post(rs, pcm(800), params=EN_ZH, **auth())  # 0.5 + 0.8 > 1.2 s
    assert (status, body["code"], body["details"]["period"]) == (429, "QUOTA_EXCEEDED", "monthly")
    assert body["details"]["reset_at"].endswith("-01T00:00:00Z")
    assert (await post(rs, pcm(700), params=EN_ZH, **auth()))[0] == 200  # exactly up to the quota


async def test_tenant_job_rate_refuses_and_is_not_metered(scheduler_factory: Any, node_factory: Any) -> None:
    acme = {"max_jobs_per_second": 0.01, "jobs_burst": 1}
    rs, _ = await start(scheduler_factory, node_factory, auth={"tenants": tenants(**acme)})
    assert (await post(rs, pcm(400), params=EN_ZH, **auth()))[0] == 200
    status, body = await post(rs, pcm(600), params=EN_ZH, **auth())
    assert (status, body["code"]) == (429, "TENANT_RATE_LIMITED")
    async with rs.http.get(rs.base + "/api/v1/usage", headers=auth()) as r:
        total = (await r.json())["total"]
    assert total["audio_seconds_received"] == 0.4 and total["jobs"]["completed"] == 1


async def test_session_metadata_reaches_the_node_and_comes_back(
    scheduler_factory: Any, node_factory: Any, session_factory: Any
) -> None:
    rs, (node,) = await start(scheduler_factory, node_factory)
    seen: list[dict[str, Any]] = []
    node.on_message = lambda m: seen.append(m) if m.get("type") == "job_assign" else None
    s = session_factory(url=rs.session_url, api_key=KEYS["acme"], audio_format="pcm16")
    await s.connect()
    ack = await s.init(metadata={"glossary": "g-7"})
    assert ack["type"] == "session_init_ack"
    await s.utterance(n_bytes=8000)
    await eventually(lambda: len(s.of_type("translation_result")) == 1)
    assert seen[0]["metadata"] == {"glossary": "g-7"}
    assert Job.from_assign(msgspec.convert(seen[0], JobAssign)).metadata == {
        "glossary": "g-7"
    }  # the SDK's view
    assert s.of_type("translation_result")[0]["metadata"] == {"glossary": "g-7"}
    # over the bound (17 entries): the session_init is refused, naming the field
    s2 = session_factory(url=rs.session_url, api_key=KEYS["acme"], audio_format="pcm16")
    await s2.connect()
    refused = await s2.init(metadata={f"k{i}": "v" for i in range(17)})
    assert refused["type"] == "error" and refused["code"] == "INVALID_MESSAGE"


# --- /v1/stream ---------------------------------------------------------------------------------


async def test_stream_end_to_end_with_partials_and_usage(scheduler_factory: Any, node_factory: Any) -> None:
    rs, _ = await start(scheduler_factory, node_factory)
    async with rs.http.ws_connect(rs.base + "/v1/stream", headers=auth()) as ws:
        await ws.send_json({"type": "audio", "chunk": ""})
        assert (await ws.receive_json())["code"] == "INVALID_SESSION"
        await ws.send_json({"type": "start", "src_lang": "en", "tgt_lang": "zh", "partials": True})
        started = await ws.receive_json()
        assert started["type"] == "started" and started["session_id"].startswith("s-")
        for _ in range(3):
            await ws.send_json({"type": "audio", "chunk": base64.b64encode(pcm(500)).decode()})
        await ws.send_json({"type": "end"})
        msgs = []
        async for m in ws:
            msgs.append(json.loads(m.data))
    finals = [m for m in msgs if m["type"] == "final"]
    assert [f["utterance_index"] for f in finals] == [0, 1, 2]
    assert [f["text"] for f in finals] == ["zh 0", "zh 1", "zh 2"] and finals[0]["audio"] == NODE_TTS
    assert any(m["type"] == "partial" for m in msgs)
    ended = msgs[-1]
    assert ended["type"] == "ended" and ended["session_id"] == started["session_id"]
    assert ended["usage"]["audio_seconds_received"] == 1.5 and ended["usage"]["jobs"]["completed"] == 3


async def test_stream_fails_over_when_a_node_dies_mid_job(scheduler_factory: Any, node_factory: Any) -> None:
    rs, (first,) = await start(scheduler_factory, node_factory)
    first.executor.behavior = Behavior.CRASH_MID_JOB
    async with rs.http.ws_connect(rs.base + "/v1/stream", headers=auth()) as ws:
        await ws.send_json({"type": "start", "src_lang": "en", "tgt_lang": "zh"})
        await ws.receive_json()
        for _ in range(4):
            await ws.send_json({"type": "audio", "chunk": base64.b64encode(pcm(300)).decode()})
        # it died holding the stream's first job: its socket is gone for the scheduler
        await eventually(lambda: first.jobs_received >= 1 and not ready_in_view(rs, first.node_id))
        second = node_factory(profile=PROFILE, url=rs.node_url, executor=Executor(latency=0.01))
        await second.start()
        await ws.send_json({"type": "end"})
        msgs = [json.loads(m.data) async for m in ws]
    finals = [m for m in msgs if m["type"] == "final"]
    assert [f["utterance_index"] for f in finals] == [0, 1, 2, 3]
    assert first.jobs_received >= 1 and second.jobs_done == 4
    assert msgs[-1]["type"] == "ended" and msgs[-1]["usage"]["jobs"]["completed"] == 4


# --- usage, webhooks, cancel --------------------------------------------------------------------


async def test_usage_is_what_the_nodes_did_and_webhooks_follow_sessions(
    scheduler_factory: Any, node_factory: Any, session_factory: Any, hooks: Receiver
) -> None:
    rs, (node,) = await start(scheduler_factory, node_factory, auth={"tenants": tenants(hooks.url)})
    node.executor.fail_every = 4  # every 4th job fails: job.failed, a failed outcome
    for ms in (300, 700):
        await post(rs, pcm(ms), params={"src_lang": "en", "tgt_lang": "zh"}, **auth())
    async with rs.http.ws_connect(rs.base + "/v1/stream", headers=auth()) as ws:
        await ws.send_json({"type": "start", "src_lang": "zh", "tgt_lang": "en"})
        await ws.receive_json()
        for _ in range(2):
            await ws.send_json({"type": "audio", "chunk": base64.b64encode(pcm(400)).decode()})
        await ws.send_json({"type": "end"})
        _ = [m async for m in ws]
    s = session_factory(url=rs.session_url, api_key=KEYS["acme"], audio_format="pcm16")
    await s.start()
    await s.utterance(n_bytes=32000)  # 1 s
    await eventually(lambda: len(s.of_type("translation_result")) + len(s.of_type("missing_result")) == 1)
    await s.close()
    await eventually(lambda: not rs.state.sessions)
    async with rs.http.get(rs.base + "/api/v1/usage", headers=auth()) as r:
        usage = await r.json()
    by_pair = {(b["src_lang"], b["tgt_lang"]): b for b in usage["buckets"]}
    assert by_pair[("en", "zh")]["audio_seconds_received"] == 2.0  # 0.3 + 0.7 + the session's 1.0
    assert by_pair[("zh", "en")]["audio_seconds_received"] == 0.8
    jobs = usage["total"]["jobs"]
    assert (jobs["completed"], jobs["failed"]) == (4, 1) == (node.jobs_done - 1, 1)
    assert usage["total"]["tts_seconds"] == round(jobs["completed"] * 3 / 32000, 3)
    # webhooks: started/ended per session with its usage, job.failed for the failed job, in order
    await eventually(lambda: len([e for e in hooks.events() if e["type"] == "session.ended"]) == 4)
    events = hooks.events()
    kinds = [e["type"] for e in events]
    assert kinds.count("session.started") == 4 and kinds.count("job.failed") == 1
    vias = [e["data"]["via"] for e in events if e["type"] == "session.started"]
    assert vias == ["translate", "translate", "stream", "session"]
    ended = [e["data"] for e in events if e["type"] == "session.ended"]
    assert sum(e["usage"]["audio_seconds_received"] for e in ended) == pytest.approx(2.8)
    for e in events:  # each session's started comes before its ended
        if e["type"] == "session.ended":
            sid = e["data"]["session_id"]
            assert kinds.index("session.started") <= events.index(e)
            assert any(x["type"] == "session.started" and x["data"]["session_id"] == sid for x in events)
    # Prometheus: per configured tenant
    assert await rs.metric("lingua_usage_audio_received_seconds_total", '{tenant="acme"}') == pytest.approx(
        2.8
    )


async def test_utterance_cancel_stops_its_job(
    scheduler_factory: Any, node_factory: Any, session_factory: Any
) -> None:
    rs, (node,) = await start(scheduler_factory, node_factory)
    node.executor.latency = 5.0
    cancels: list[dict[str, Any]] = []
    node.on_message = lambda m: cancels.append(m) if m.get("type") == "job_cancel" else None
    s = session_factory(url=rs.session_url, api_key=KEYS["acme"], audio_format="pcm16")
    await s.start()
    index = await s.utterance(n_bytes=16000)
    await eventually(lambda: node.running_jobs == 1)
    await s.send({"type": "utterance_cancel", "session_id": s.session_id, "utterance_index": index})
    await eventually(lambda: len(s.of_type("missing_result")) == 1)
    err = s.of_type("error")[-1]
    assert (err["code"], err["details"]["utterance_index"]) == ("JOB_CANCELLED", index)
    assert s.of_type("missing_result")[0]["utterance_index"] == index
    assert len(cancels) == 1
    # nothing in flight: refused, nothing changes
    await s.send({"type": "utterance_cancel", "session_id": s.session_id, "utterance_index": 9})
    await eventually(lambda: s.of_type("error")[-1]["code"] == "INVALID_MESSAGE")
    assert len(s.of_type("missing_result")) == 1


# --- Redis mode: two instances, one SIGKILLed ----------------------------------------------------


@pytest.mark.skipif(not has_redis(), reason="no redis-server binary")
async def test_usage_is_cluster_wide_and_survives_a_sigkill(redis_server: RedisServer) -> None:
    prefix = "fd" + secrets.token_hex(3)
    entries = ", ".join(f'{{tenant_id = "{t}", key_sha256 = "{hash_api_key(k)}"}}' for t, k in KEYS.items())
    procs = [
        SchedulerProcess(
            cluster=cluster_section(redis_server.url, prefix), scheduler={"fleet_view_interval_ms": 10}
        )
        for _ in range(2)
    ]
    for p in procs:
        p.extra_env["LINGUA_AUTH__TENANTS"] = f"[{entries}]"
    a, b = procs
    async with aiohttp.ClientSession() as http:
        nodes: list[SimulatedNode] = []
        try:
            for p in procs:
                p.start()
            for p in procs:
                await p.wait_ready(http)
            for p in procs:
                node = SimulatedNode(http, p.node_url, PROFILE, executor=Executor(latency=0.01))
                await node.start()
                nodes.append(node)

            async def translate(p: SchedulerProcess, ms: int, **headers: str) -> dict[str, Any]:
                async with http.post(
                    p.base + TRANSLATE, data=pcm(ms), params=EN_ZH, headers=auth(**headers)
                ) as r:
                    body: dict[str, Any] = await r.json()
                    assert r.status == 200, body
                    return body

            async def wait_fleet(p: SchedulerProcess) -> None:
                async def ready() -> bool:
                    async with http.get(p.base + "/api/v1/nodes") as r:
                        listed = await r.json()
                    return len([n for n in listed["nodes"] if n["status"] == "ready"]) == 2

                for _ in range(200):
                    if await ready():
                        return
                    await asyncio.sleep(0.05)
                raise AssertionError("the instances do not see both nodes")

            await wait_fleet(a)
            await wait_fleet(b)
            # an upload retried on the other instance with the same Idempotency-Key: one job
            first = await translate(a, 500, **{"Idempotency-Key": "retry-1"})
            again = await translate(b, 500, **{"Idempotency-Key": "retry-1"})
            assert again["job_id"] == first["job_id"]
            for p, ms in ((a, 700), (b, 300), (a, 1200)):
                await translate(p, ms)
            async with http.ws_connect(a.base + "/v1/stream", headers=auth()) as ws:
                await ws.send_json({"type": "start", "src_lang": "zh", "tgt_lang": "en"})
                await ws.receive_json()
                for _ in range(2):
                    await ws.send_json({"type": "audio", "chunk": base64.b64encode(pcm(400)).decode()})
                await ws.send_json({"type": "end"})
                streamed = [json.loads(m.data) async for m in ws]
            assert [m["type"] for m in streamed].count("final") == 2
            done = sum(n.jobs_done for n in nodes)
            assert done == 6  # the retried upload ran once
            expected = {"received": 0.5 + 0.7 + 0.3 + 1.2 + 0.8, "completed": done, "tts": done * 3 / 32000}

            async def figures(p: SchedulerProcess) -> dict[str, float]:
                async with http.get(p.base + "/api/v1/usage", headers=auth()) as r:
                    total = (await r.json())["total"]
                return {
                    "received": total["audio_seconds_received"],
                    "completed": total["jobs"]["completed"],
                    "tts": total["tts_seconds"],
                }

            def same(got: dict[str, float]) -> bool:
                return all(got[k] == pytest.approx(v, abs=1e-3) for k, v in expected.items())

            # every answer was counted in Redis before it was sent: both instances read it at once
            assert same(await figures(a)) and same(await figures(b)), (await figures(a), expected)
            a.kill()
            assert same(await figures(b))
        finally:
            await asyncio.gather(*(n.close() for n in nodes), return_exceptions=True)
            for p in procs:
                p.close()


async def test_sighup_reload_applies_a_new_quota(tmp_path: Path) -> None:
    cfg = tmp_path / "scheduler.toml"
    entry = f'[[auth.tenants]]\ntenant_id = "acme"\nkey_sha256 = "{hash_api_key(KEYS["acme"])}"\n'
    cfg.write_text(entry)
    proc = SchedulerProcess(args=["--config", str(cfg)], jobs={"pending_timeout_ms": 200}).start()
    try:
        async with aiohttp.ClientSession() as http:
            await proc.wait_ready(http)

            async def code() -> str:
                async with http.post(proc.base + TRANSLATE, data=pcm(500), params=EN_ZH, headers=auth()) as r:
                    return str((await r.json())["code"])

            assert await code() == "NO_AVAILABLE_NODE"  # no quota, and no node
            cfg.write_text(entry + "daily_audio_minutes = 0.005\n")  # 0.3 s
            proc.signal(signal.SIGHUP)
            await eventually(lambda: "configuration reloaded" in proc.log_path.read_text(), timeout=10)
            assert await code() == "QUOTA_EXCEEDED"
    finally:
        proc.close()


async def test_silence_only_is_answered_without_a_job(scheduler_factory: Any, node_factory: Any) -> None:
    rs, (node,) = await start(scheduler_factory, node_factory)
    silent = framed([bytes([0xF8]) + b"\x00"] * 25)  # 500 ms of 1-byte (silent) Opus packets
    status, body = await post(rs, silent, params={"audio_format": "opus", **EN_ZH}, **auth())
    assert status == 200, body
    assert (body["job_id"], body["translation"], body["audio_duration_ms"]) == ("", "", 500)
    assert body["utterances"][0]["error"] == "silence_detected" and node.jobs_received == 0


async def test_stream_refusals(scheduler_factory: Any, node_factory: Any) -> None:
    rs, _ = await start(scheduler_factory, node_factory)
    async with rs.http.ws_connect(rs.base + "/v1/stream") as ws:  # no key
        await ws.send_json({"type": "start", "src_lang": "en", "tgt_lang": "zh"})
        err = await ws.receive_json()
        assert (err["type"], err["code"]) == ("error", "UNAUTHORIZED")
        assert (await ws.receive()).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    async with rs.http.ws_connect(rs.base + "/v1/stream", headers=auth()) as ws:
        await ws.send_json({"type": "start", "src_lang": "en", "tgt_lang": "zh", "sample_rate": 11025})
        assert (await ws.receive_json())["code"] == "INVALID_MESSAGE"
        await ws.send_json({"type": "start", "src_lang": "en", "tgt_lang": "zh"})
        assert (await ws.receive_json())["type"] == "started"
        await ws.send_json({"type": "start", "src_lang": "en", "tgt_lang": "zh"})
        assert (await ws.receive_json())["code"] == "INVALID_MESSAGE"
        await ws.send_json({"type": "audio", "chunk": "not base64!"})
        assert (await ws.receive_json())["code"] == "INVALID_MESSAGE"
        await ws.send_json({"type": "nonsense"})
        assert (await ws.receive_json())["code"] == "INVALID_MESSAGE"
    await eventually(lambda: not rs.state.sessions)  # the socket's close ended its session


async def test_a_large_upload_with_or_without_a_length(scheduler_factory: Any, node_factory: Any) -> None:
    rs, _ = await start(scheduler_factory, node_factory, session={"max_duration_ms": 20_000})
    audio = pcm(60_000)  # 1.9 MB: more than a WebSocket frame may carry (server.max_frame_bytes)

    async def chunked() -> AsyncIterator[bytes]:
        for i in range(0, len(audio), 65536):
            yield audio[i : i + 65536]

    for data in (audio, chunked()):
        status, body = await post(rs, data, params=EN_ZH, **auth(**{"Content-Type": "audio/l16"}))
        assert status == 200, body
        utts = body["utterances"]  # cut at session.max_utterance_bytes (512 KiB: 16.384 s of pcm16)
        assert [u["index"] for u in utts] == [0, 1, 2, 3] and utts[0]["duration_ms"] == 16384
        assert sum(u["duration_ms"] for u in utts) == 60_000 == body["audio_duration_ms"]


async def test_a_chunked_upload_passes_the_connection_guard_of_serve() -> None:
    """Through ``serve``'s connection guard: a chunked body may bring the route's own bound, not the
    WebSocket frame limit (1 MiB), before it is charged as unauthenticated bytes."""
    proc = SchedulerProcess(jobs={"pending_timeout_ms": 100}).start()
    audio = pcm(60_000)  # 1.9 MB

    async def chunked() -> AsyncIterator[bytes]:
        for i in range(0, len(audio), 65536):
            yield audio[i : i + 65536]

    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            await proc.wait_ready(http)
            headers = {"Content-Type": "audio/l16"}
            async with http.post(proc.base + TRANSLATE, data=chunked(), params=EN_ZH, headers=headers) as r:
                body = await r.json()
            # read whole and cut (no node serves it here): the body got through
            assert (r.status, body["code"]) == (503, "NO_AVAILABLE_NODE"), body
    finally:
        proc.close()
