"""Conformance cases of ours (``tests/conformance/ours.py``), NOT recordings of the real apps: the
replay harness and the verdict's rules applied to situations the recordings do not cover."""

from __future__ import annotations

import asyncio

import pytest

from tests.conformance.ours import RECONNECT_AT_MS, resume_74
from tests.conformance.replay import replay
from tests.conformance.verdict import judge

pytestmark = pytest.mark.timeout(240)


def test_reconnect_within_the_resume_window_mid_sentence() -> None:
    sc = resume_74()
    tr = asyncio.run(replay(sc))
    assert tr.error is None, tr.error
    verdict = judge(sc, tr)
    assert verdict.ok, (
        "\n".join(verdict.failures) + "\n" + "\n".join(tr.notes[-20:]) + tr.scheduler_log[-2000:]
    )
    first, again = tr.received("web", "session_init_ack")
    assert first.msg["resumed"] is False and first.msg["resume_token"]
    assert again.t_ms >= RECONNECT_AT_MS - 100
    assert again.msg["resumed"] is True and again.msg["session_id"] == first.msg["session_id"]
    # sentence A came whole as utterance 0 of the same session: nothing was cut or lost at the drop
    results = tr.received("web", "translation_result")
    assert results[0].msg["utterance_index"] == 0 and results[0].msg["session_id"] == first.msg["session_id"]
    assert not [f for f in tr.received("web", "missing_result") if f.msg["utterance_index"] == 0]
