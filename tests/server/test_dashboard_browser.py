"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright (never downloaded).

Starts a scheduler with an admin token, simulated nodes and a session, opens /dashboard, waits for the
live numbers to move, compares the node counts with /api/v1/stats, drains a node through the page with
the admin token and sees it drained in the page and through the API, opens a node's detail (its recent
jobs and their outcomes), looks a job up, switches the charts to the last hour and reads the tenants.
In Redis mode, the cluster panel lists both instances. Leaves a screenshot in tmp_path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lingua_scheduler.sim.nodes import Executor
from lingua_scheduler.sim.profiles import NodeProfile
from tests.conftest import RunningScheduler, eventually
from tests.redis_support import RedisServer, has_redis, instances, ready_in_view

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="/usr/bin/chromium is not installed (.ci/run installs Debian's chromium package)",
)
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "browser-test-token-0123456789"
EN_ZH = NodeProfile(asr_languages=["en", "zh"], tts_languages=["en", "zh"], nmt_languages=["en", "zh"])
EN_DE = NodeProfile(asr_languages=["en", "de"], tts_languages=["en", "de"], nmt_languages=["en", "de"])
STATUSES = ("ready", "registering", "degraded", "draining", "offline")


async def test_dashboard_live_and_drain(
    scheduler_factory: Any, node_factory: Any, session_factory: Any, tmp_path: Path
) -> None:
    from playwright.async_api import async_playwright, expect

    rs: RunningScheduler = await scheduler_factory(
        admin={"token": TOKEN}, scheduler={"fleet_view_interval_ms": 10}, session={"pause_ms": 300}
    )
    nodes = [
        node_factory(profile=p, url=rs.node_url, executor=Executor(latency=0.02))
        for p in (EN_ZH, EN_ZH, EN_ZH, EN_ZH, EN_DE, EN_DE)
    ]
    for n in nodes:
        await n.start()
    await eventually(lambda: rs.state.registry.counts()["ready"] == 6)

    async with async_playwright() as pw:
        browser = await pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=ARGS,
            viewport={"width": 1400, "height": 1200},
        )
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            await page.goto(rs.base + "/dashboard")

            # the stream is live and shows the fleet as the API does
            await expect(page.locator("#conn")).to_have_text("live")
            await expect(page.locator("#status-ready")).to_have_text("6")
            stats = await rs.get_json("/api/v1/stats")
            await expect(page.locator("#fleet-total")).to_have_text(str(stats["nodes_total"]))
            for status in STATUSES:
                await expect(page.locator(f"#status-{status}")).to_have_text(str(stats["nodes"][status]))
            await expect(page.locator("#total-created")).to_have_text("0")

            # traffic: the live numbers change
            s = session_factory(url=rs.session_url)
            await s.start()
            for _ in range(5):
                await s.utterance()
            await eventually(lambda: len(s.of_type("translation_result")) == 5)
            await expect(page.locator("#total-created")).to_have_text("5", timeout=5000)
            await expect(page.locator("#sessions")).to_have_text("1")
            pair = page.locator('#pairs-body tr[data-pair="en->zh"]')
            await expect(pair.locator("td").nth(1)).to_have_text("1")  # sessions
            await expect(pair.locator("td").nth(4)).to_have_text("4")  # ready nodes
            await expect(page.locator("#lat-end_to_end")).not_to_have_text("no samples", timeout=5000)

            # admin: a wrong token is refused and actions stay disabled
            target = nodes[0].node_id
            row = page.locator(f'#nodes-body tr[data-node-id="{target}"]')
            await page.fill("#admin-token", "not-the-token-at-all-0000")
            await page.click("#admin-save")
            await expect(page.locator("#admin-state")).to_have_text("admin: token refused")
            await expect(row.locator("button.act-drain")).to_be_disabled()

            # with the right token, drain a node through the page
            told = nodes[0].wait_for(lambda m: m.get("type") == "node_status" and m["status"] == "draining")
            await page.fill("#admin-token", TOKEN)
            await page.click("#admin-save")
            await expect(page.locator("#admin-state")).to_have_text("admin: ready")
            await expect(row.locator("button.act-drain")).to_be_enabled()
            await row.locator("button.act-drain").click()
            await expect(row.locator("td.status")).to_have_text("draining")
            await expect(row.locator("button.act-drain")).to_have_text("undrain")
            await expect(page.locator("#action-msg")).to_have_text(f"drain {target}: now draining")
            await expect(page.locator("#status-draining")).to_have_text("1", timeout=5000)
            await expect(page.locator("#status-ready")).to_have_text("5")
            await expect(page.locator("#events-body")).to_contain_text("drain → ok by dashboard")

            detail = await rs.get_json(f"/api/v1/nodes/{target}")
            assert detail["status"] == "draining" and detail["drain_requested"] is True
            assert (await told)["node_id"] == target
            stats = await rs.get_json("/api/v1/stats")
            assert stats["nodes"]["draining"] == 1 and stats["nodes"]["ready"] == 5

            # the node detail: a node that ran a job shows it, with its outcome
            job = next(j for j in rs.state.engine.store if j.state.value == "completed")
            ran = page.locator(f'#nodes-body tr[data-node-id="{job.node_id}"] td.node-id')
            await ran.click()
            await expect(page.locator("#node-detail")).to_be_visible()
            await expect(page.locator("#nd-id")).to_have_text(str(job.node_id))
            job_row = page.locator(f'#nd-jobs tr[data-job-id="{job.job_id}"]')
            await expect(job_row.locator("td").nth(1)).to_have_text("completed")
            await expect(page.locator("#nd-outcomes")).to_contain_text("completed")
            await expect(page.locator("#nd-pools")).to_contain_text("en->zh")
            await expect(page.locator("#nd-load")).to_contain_text("%")
            # a job from the node's list opens in the lookup, and so does one typed in the box
            await job_row.locator("button.link").click()
            await expect(page.locator("#job-lookup")).to_be_visible()
            await expect(page.locator('#job-facts dd[data-key="state"]')).to_have_text("completed")
            await expect(page.locator('#job-facts dd[data-key="node"]')).to_have_text(str(job.node_id))
            await page.fill("#job-id", "job-that-does-not-exist")
            await page.click("#job-go")
            await expect(page.locator("#job-result")).to_contain_text("NOT_FOUND")

            # the charts' window: one hour, from the server's ring
            await page.select_option("#window", "3600")
            await expect(page.locator("#throughput .window-label")).to_have_text("last hour")
            points = await page.evaluate("() => { const s = longSeries(); return s ? s.t.length : 0; }")
            assert points >= 1
            assert await page.evaluate("() => longSeries().window_seconds") == 3600

            # tenants: the session has none (open mode), and usage is not metered
            tenant = page.locator('#tenants-body tr[data-tenant=""]')
            await expect(tenant.locator("td").nth(1)).to_have_text("1", timeout=8000)
            await expect(tenant.locator("td").nth(5)).to_have_text("not metered")
            # embedded mode: no cluster panel
            await expect(page.locator("#cluster")).to_be_hidden()

            await page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            # the browser logs the refused token check (401) and the unknown job (404) as errors: both
            # were on purpose
            assert [e for e in errors if "status of 401" not in e and "status of 404" not in e] == []
        finally:
            await browser.close()
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000


@pytest.mark.skipif(not has_redis(), reason="no redis-server binary")
async def test_cluster_panel_in_redis_mode(
    redis_server: RedisServer, scheduler_factory: Any, node_factory: Any, tmp_path: Path
) -> None:
    from playwright.async_api import async_playwright, expect

    a, b = await instances(scheduler_factory, redis_server.url, tag="dash")
    node = node_factory(url=b.node_url, interval=0.2)
    await node.start()
    await eventually(lambda: ready_in_view(a, node.node_id), timeout=5)
    a_id, b_id = (rs.state.cluster.instance_id for rs in (a, b))
    async with async_playwright() as pw:
        browser = await pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=ARGS
        )
        try:
            page = await browser.new_page()
            await page.goto(a.base + "/dashboard")
            await expect(page.locator("#conn")).to_have_text("live")
            await expect(page.locator("#cluster")).to_be_visible(timeout=10_000)
            row_b = page.locator(f'#cluster-body tr[data-instance-id="{b_id}"]')
            await expect(row_b.locator("td").nth(4)).to_have_text("1", timeout=10_000)  # B's ready node
            await expect(
                page.locator(f'#cluster-body tr[data-instance-id="{a_id}"] td').first
            ).to_contain_text("(this one)")
            await expect(page.locator("#cluster-summary")).to_contain_text("2 instances")
            # the node's detail names the instance holding it
            await page.locator(f'#nodes-body tr[data-node-id="{node.node_id}"] td.node-id').click()
            await expect(page.locator("#nd-summary")).to_contain_text(f"on {b_id}")
            await page.screenshot(path=str(tmp_path / "cluster.png"), full_page=True)
        finally:
            await browser.close()
