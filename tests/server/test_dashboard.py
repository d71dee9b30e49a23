"""The dashboard's HTTP side without a browser: the page and its assets, and the live event stream."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp

from lingua_scheduler.server.http.stats import STATS
from tests.conftest import RunningScheduler, eventually


async def read_frame(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    """The next ``data:`` event of a server-sent event stream."""
    while True:
        line = await asyncio.wait_for(resp.content.readline(), 5)
        assert line, "stream ended"
        if line.startswith(b"data: "):
            frame: dict[str, Any] = json.loads(line[6:])
            return frame


async def test_page_and_assets(scheduler: RunningScheduler) -> None:
    async with scheduler.http.get(scheduler.base + "/dashboard") as r:
        assert r.status == 200 and r.content_type == "text/html"
        html = await r.text()
        csp = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert '<script src="/dashboard/static/dashboard.js"' in html and "<script>" not in html
    assert "http://" not in html and "https://" not in html  # nothing from a CDN
    for name, ctype in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        async with scheduler.http.get(f"{scheduler.base}/dashboard/static/{name}") as r:
            assert r.status == 200 and r.content_type == ctype
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            text = await r.text()
        assert "http://" not in text and "https://" not in text
    for name in ("dashboard.html", "../../config.py", "x.js"):
        async with scheduler.http.get(f"{scheduler.base}/dashboard/static/{name}") as r:
            assert r.status == 404


async def test_stream_pushes_frames(scheduler: RunningScheduler, node_factory: Any) -> None:
    node = node_factory(url=scheduler.node_url)
    await node.start()
    async with scheduler.http.get(scheduler.base + "/api/v1/dashboard/stream") as r:
        assert r.status == 200 and r.content_type == "text/event-stream"
        assert r.headers["Cache-Control"] == "no-cache"
        first = await read_frame(r)
        assert first["nodes_total"] == 1 and first["admin_enabled"] is False
        assert {"t", "created_per_s", "heartbeat_handle_p50", "end_to_end_p99"} <= set(first["series"])
        assert await scheduler.metric("lingua_dashboard_clients") == 1
        second = await read_frame(r)  # the sampler's next tick: anywhere within a second
        t0 = time.monotonic()
        third = await read_frame(r)
        assert 0.5 < time.monotonic() - t0 < 1.5  # then one frame a second
        assert third["computed_at_ms"] >= second["computed_at_ms"] >= first["computed_at_ms"]
        assert len(third["series"]["t"]) > len(first["series"]["t"])
    await eventually(lambda: scheduler.app[STATS].clients == 0)


async def test_stream_client_limit(scheduler_factory: Any) -> None:
    rs: RunningScheduler = await scheduler_factory(admin={"max_dashboard_clients": 1})
    async with rs.http.get(rs.base + "/api/v1/dashboard/stream") as first:
        await read_frame(first)
        async with rs.http.get(rs.base + "/api/v1/dashboard/stream") as second:
            assert second.status == 503 and (await second.json())["code"] == "TOO_MANY_CLIENTS"


async def test_shutdown_ends_streams(scheduler_factory: Any) -> None:
    rs: RunningScheduler = await scheduler_factory()
    async with aiohttp.ClientSession() as http, http.get(rs.base + "/api/v1/dashboard/stream") as r:
        await read_frame(r)
        t0 = time.monotonic()
        await rs.server.close()  # must not wait for the endless stream
        assert time.monotonic() - t0 < 3
