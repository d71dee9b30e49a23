"""Scenarios of ours, NOT recordings of the real apps: a recording's frames with events the recordings
do not cover added, replayed by the same harness and judged by the same rules.

- ``ours_resume_74``: ``session_74_defaults`` (the 74 web client, default configuration plus a resume
  window of 10 s), where the client's connection drops between the second and the third chunk of its
  first sentence and it reconnects 0.6 s later with a ``session_init`` carrying the ``resume_token`` of
  its first ack. The real client never resumes (it reconnects with a fresh ``session_init``); this is
  what a client that does would get: the same session, the sentence whole, no popup.
"""

from __future__ import annotations

import copy
from typing import Any

from tests.conformance.recording import Scenario, build, recorded_events
from tests.conformance.replay import RESUME_TOKEN

RESUME_WINDOW_MS = 10_000
#: after the 74 client's second chunk of sentence A (7.7 s), before its third (10.2 s)
DROP_AT_MS = 8_000
RECONNECT_AT_MS = 8_600


def resume_74() -> Scenario:
    events = copy.deepcopy(recorded_events("session_74_defaults"))
    first = events[0]
    first["config_env"] = {
        **first.get("config_env", {}),
        "LINGUA_SESSION__RESUME_WINDOW_MS": str(RESUME_WINDOW_MS),
    }
    init = next(e for e in events if e["who"] == "web" and e.get("msg", {}).get("type") == "session_init")
    added: list[dict[str, Any]] = [
        {"t_ms": DROP_AT_MS, "who": "web", "ev": "ws_close", "code": 1000, "reason": "", "ours": True},
        {"t_ms": RECONNECT_AT_MS, "who": "web", "ev": "ws_open", "ours": True},
        {
            "t_ms": RECONNECT_AT_MS,
            "who": "web",
            "dir": "send",
            "binary": False,
            "msg": {**init["msg"], "resume_token": RESUME_TOKEN},
            "ours": True,
        },
    ]
    return build("ours_resume_74", events + added)


__all__ = ["resume_74"]
