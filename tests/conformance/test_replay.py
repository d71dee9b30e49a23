"""Conformance: the recorded frames of the platform's real web client and node app, replayed.

Every scenario in ``recordings/`` is replayed at once (each against its own scheduler process with the
default configuration plus the recording's ``config_env``) by one module fixture, so the module costs
about as long as the longest recording; each test then judges its scenario's transcript by what the
real apps would have shown (:mod:`tests.conformance.verdict`).
"""

from __future__ import annotations

import asyncio

import pytest

from tests.conformance.recording import load, scenario_names
from tests.conformance.replay import Transcript, replay_all
from tests.conformance.verdict import judge

# the recordings run up to 68 s of real time; replay_all bounds each scenario on its own
pytestmark = pytest.mark.timeout(480)


@pytest.fixture(scope="module")
def transcripts() -> dict[str, Transcript]:
    runnable = [n for n in scenario_names() if load(n).skip_reason is None]
    return asyncio.run(replay_all(runnable))


@pytest.mark.parametrize("name", scenario_names())
def test_scenario(name: str, request: pytest.FixtureRequest) -> None:
    sc = load(name)
    if sc.skip_reason is not None:
        pytest.skip(sc.skip_reason)
    tr: Transcript = request.getfixturevalue("transcripts")[name]
    verdict = judge(sc, tr)
    if not verdict.ok:
        context = "\n".join(tr.notes[-20:])
        pytest.fail(
            "\n".join(verdict.failures)
            + f"\n--- replay notes ---\n{context}\n--- scheduler log ---\n"
            + tr.scheduler_log[-2000:],
            pytrace=False,
        )
