"""``lingua-scheduler loadtest`` as a user runs it, against a real scheduler process.

The scheduler runs in its own process (so the test can read its ``/metrics`` after the load test has
gone); the load test runs as the CLI command and writes its JSON report. The report's fields are
checked, and its client-side counts against the server's own counters.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lingua_scheduler.loadtest.metrics import Scrape, histogram_quantiles, percentiles
from lingua_scheduler.loadtest.runner import local_scheduler
from lingua_scheduler.loadtest.workers import served_pairs, session_plans, split
from lingua_scheduler.sim.profiles import NodeProfile

REPORT_KEYS = {
    "machine",
    "config",
    "server",
    "window_seconds",
    "registration",
    "heartbeats",
    "selection_us",
    "dispatch_overhead_ms",
    "end_to_end_ms",
    "jobs",
    "failovers",
    "event_loop_lag_ms",
    "server_process",
    "totals",
}


def test_small_loadtest_report_matches_the_servers_counters(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    env = {
        "LINGUA_NODE_HEALTH__HEARTBEAT_INTERVAL_SECONDS": "0.5",
        "LINGUA_SCHEDULER__FLEET_VIEW_INTERVAL_MS": "20",
    }
    with local_scheduler(env) as (base, proc):
        before = Scrape.fetch(base)
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "lingua_scheduler",
                "loadtest",
                "--url",
                base,
                "--server-pid",
                str(proc.pid),
                "--nodes",
                "12",
                "--sessions",
                "4",
                "--duration",
                "3",
                "--warmup",
                "1",
                "--rate",
                "12",
                "--utterance-ms",
                "300",
                "--job-latency-ms",
                "20",
                "--failure-rate",
                "0.2",
                "--crash-rate",
                "0",
                "--no-progress",
                "--report",
                str(report_path),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr + run.stdout
        after = Scrape.fetch(base)
    assert "heartbeat RTT" in run.stdout and "report written" in run.stdout

    report = json.loads(report_path.read_text())
    assert set(report) >= REPORT_KEYS
    assert report["registration"]["nodes"] == 12 and report["registration"]["errors"] == 0
    hb = report["heartbeats"]
    assert hb["interval_told_s"] == 0.5
    assert hb["rtt_ms"]["count"] > 0 and hb["rtt_ms"]["p50"] <= hb["rtt_ms"]["p99"] <= hb["rtt_ms"]["max"]
    assert hb["per_second"] > 0 and hb["server_per_second"] > 0
    # the window's client and server rates agree within measurement error (window edges)
    assert abs(hb["per_second"] - hb["server_per_second"]) <= 0.25 * hb["server_per_second"] + 2
    assert report["selection_us"]["count"] > 0 and report["selection_us"]["p50"] is not None
    assert report["dispatch_overhead_ms"]["count"] > 0
    assert report["end_to_end_ms"]["client"]["count"] > 0
    assert report["jobs"]["completed_in_window"] > 0
    assert report["jobs"]["unanswered_at_end"] == 0
    assert report["server_process"]["cpu_percent_of_one_core"] is not None
    assert report["server_process"]["rss_mb"] > 0
    assert report["event_loop_lag_ms"]["server_max"] is not None

    # totals over the whole run against what the server counted (only this load test talked to it)
    totals = report["totals"]
    server_hb = after.value("lingua_heartbeats_total") - before.value("lingua_heartbeats_total")
    assert totals["heartbeats_acked"]["client"] == server_hb == totals["heartbeats_acked"]["server"]
    completed = after.value("lingua_jobs_total", outcome="completed") - before.value(
        "lingua_jobs_total", outcome="completed"
    )
    assert totals["jobs_completed"]["client"] == completed > 0
    failovers = after.value("lingua_failovers_total") - before.value("lingua_failovers_total")
    assert report["failovers"]["total"] == failovers
    failed = after.value("lingua_jobs_total", outcome="failed") - before.value(
        "lingua_jobs_total", outcome="failed"
    )
    assert totals["jobs_failed"]["client"] == failed
    # an injected NODE_OVERLOADED answer is retried on another node (a failover) when there is one
    assert 0 < failovers <= report["failovers"]["injected_job_failures"]
    assert totals["agree"] is True


def test_histogram_quantiles_interpolate_within_buckets() -> None:
    text = (
        "# HELP h_seconds x\n# TYPE h_seconds histogram\n"
        'h_seconds_bucket{le="0.001"} 50.0\nh_seconds_bucket{le="0.002"} 90.0\n'
        'h_seconds_bucket{le="0.005"} 100.0\nh_seconds_bucket{le="+Inf"} 100.0\n'
        "h_seconds_count 100.0\nh_seconds_sum 0.1\n"
    )
    q = histogram_quantiles(Scrape.parse(text), None, "h_seconds", (0.5, 0.7, 0.99))
    assert q["count"] == 100
    assert abs(q["p50"] - 0.001) < 1e-12
    assert abs(q["p70"] - 0.0015) < 1e-12
    assert 0.002 < q["p99"] <= 0.005
    assert percentiles([3.0, 1.0, 2.0])["p50"] == 2.0


def test_sessions_only_ask_for_pairs_the_fleet_serves() -> None:
    fleet = [NodeProfile(asr_languages=["en", "de"], tts_languages=["en", "de"], nmt_languages=["en", "de"])]
    assert served_pairs(fleet) == {("en", "de"): 1, ("de", "en"): 1}
    plans = session_plans(10, fleet, mode="mixed", total_rate=5.0, utterance_ms=500, seed=1)
    assert {(p.src_lang, p.tgt_lang) for p in plans} <= {("en", "de"), ("de", "en")}
    assert {p.mode for p in plans} == {"stream", "utterance"}
    assert abs(sum(p.rate for p in plans) - 5.0) < 1e-9
    assert [len(s) for s in split(list(range(7)), 3)] == [3, 2, 2]


def test_loadtest_in_rooms_counts_what_the_other_members_heard(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    env = {"LINGUA_SCHEDULER__FLEET_VIEW_INTERVAL_MS": "20"}
    with local_scheduler(env) as (base, proc):
        before = Scrape.fetch(base)
        run = subprocess.run(
            [
                *(sys.executable, "-m", "lingua_scheduler", "loadtest", "--url", base),
                *("--server-pid", str(proc.pid), "--nodes", "12", "--sessions", "6", "--room-size", "3"),
                *("--duration", "3", "--warmup", "1", "--rate", "12", "--utterance-ms", "300"),
                *("--job-latency-ms", "20", "--failure-rate", "0", "--crash-rate", "0", "--no-progress"),
                *("--report", str(report_path)),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr + run.stdout
        after = Scrape.fetch(base)
    assert "rooms / heard / missing" in run.stdout
    report = json.loads(report_path.read_text())
    rooms = report["rooms"]
    assert (rooms["room_size"], rooms["rooms"]) == (3, 2)
    # every outcome of a member's utterance reaches the 2 others of its room
    totals = report["totals"]
    outcomes = totals["jobs_completed"]["client"] + totals["jobs_failed"]["client"]
    assert rooms["heard"] + rooms["missing"] == 2 * outcomes > 0
    # one job per utterance: the client's totals still agree with the server's counters
    fanout = after.value("lingua_fanout_jobs_total") - before.value("lingua_fanout_jobs_total")
    assert fanout == outcomes and totals["agree"] is True
