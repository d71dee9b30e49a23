"""The recorded scenarios: loading a recording, what was spoken in it, and how its node answered.

Each recording (``recordings/<name>.jsonl``) is one line per frame a real client sent or received, or
per harness event (see ``recordings/README.md``). Loading one gives a :class:`Scenario`: the events in
time order, the audio payloads rebuilt to the recorded shape (:mod:`tests.conformance.plan_a`), the
sentences spoken, and the answer templates of the recorded node (what its results looked like).
"""

from __future__ import annotations

import base64
import json
import signal
import statistics
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from tests.conformance.plan_a import Elided, SpeechWriter, parse_elision, silence

RECORDINGS = Path(__file__).parent / "recordings"

# The two zh sentences and the en one the recording harness synthesised. Which sentence each `speak`
# played is read off the recording: the node's ASR text where it answered, else the audio's size and
# first packet (sentence A: about 21 KB over three 74-client chunks, head 38/3b 00 48 ..; B: about 14 KB,
# head 39/40/43 00 48 ..; C: 8 KB starting with a quiet 17-byte packet).
A = "你好，今天天气很好，我们去公园散步吧。"  # noqa: RUF001 (Chinese punctuation, as spoken)
B = "把这份文件翻译成英文。"
C = "This is a test of the translation system."

SENTENCES: dict[str, list[str]] = {
    "heartbeat_74": [],
    "pairing_74": [],
    "register_74": [],
    "register_head": [],
    "reconnect_74": [B, A],
    "restart_graceful_74": [B, A],
    "rooms_74": [],
    "rooms_head": [],
    "session_74_compat_ack30s": [A, B],
    "session_74_defaults": [A, B],
    "session_head_compat": [A, B],
    "session_head_defaults": [A, B],
    "slownode_74_ack30s": [B, B],
    "ttsmsgs_head": [],
    "twoway_74": [B, C],
    # the first one-shot utterance was never recognised in the recording (its job was failed over while
    # the node warmed up); its audio has B's size
    "utterance_74": [B, A],
    # scenarios of ours, derived from a recording (tests/conformance/ours.py)
    "ours_resume_74": [A, B],
}

#: scenarios not replayed (none now)
SKIPPED: dict[str, str] = {}

#: how the recording harness stopped the scheduler
KILL_SIGNAL: dict[str, signal.Signals] = {
    "reconnect_74": signal.SIGKILL,
    "restart_graceful_74": signal.SIGTERM,
}


@dataclass(frozen=True)
class NodeTiming:
    """How long the emulated node works on a job (from the recorded results' processing_time_ms)."""

    speech_ms: int = 300
    empty_ms: int = 3
    #: 74 nodes spend this long before their first job (lazy start of their pipeline)
    first_job_ms: int = 0
    #: a job waiting longer than this for the node's single GPU is refused ("GPU lease skipped")
    lease_timeout_ms: int = 8_000


SLOW = NodeTiming(speech_ms=7_000, empty_ms=7_000)


@dataclass
class AnswerTemplate:
    """What the recorded node put in its results besides ids and texts."""

    tts_shape: Elided
    tts_format: str
    speech_extra: dict[str, Any]
    speech_more: dict[str, Any]
    empty_extra: dict[str, Any]


@dataclass
class Scenario:
    name: str
    events: list[dict[str, Any]]
    config_env: dict[str, str]
    versions: dict[str, str]
    sentences: list[str]
    #: rebuilt audio, base64, by event index (web `audio_chunk.payload` / `utterance.audio`)
    payloads: dict[int, str]
    #: speech packets per sentence, for the node's ASR
    sentence_packets: list[int]
    templates: dict[str, AnswerTemplate] = field(default_factory=dict)
    timing: dict[str, NodeTiming] = field(default_factory=dict)

    @property
    def duration_ms(self) -> int:
        return int(self.events[-1]["t_ms"]) if self.events else 0

    @property
    def skip_reason(self) -> str | None:
        return SKIPPED.get(self.name)

    @property
    def kill_signal(self) -> signal.Signals:
        return KILL_SIGNAL.get(self.name, signal.SIGKILL)

    def actors(self) -> list[str]:
        return sorted({e["who"] for e in self.events if e["who"] != "harness"})


def recorded_events(name: str) -> list[dict[str, Any]]:
    """The lines of one recording, as recorded."""
    return _read(name)


def scenario_names() -> list[str]:
    return sorted(p.stem for p in RECORDINGS.glob("*.jsonl"))


def _read(name: str) -> list[dict[str, Any]]:
    with (RECORDINGS / f"{name}.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _is_speak(e: dict[str, Any]) -> bool:
    return e.get("ev") == "cmd" and e.get("cmd") in ("speak", "utterance")


def _rebuild_audio(events: list[dict[str, Any]]) -> tuple[dict[int, str], list[int]]:
    payloads: dict[int, str] = {}
    writers: list[SpeechWriter] = []
    for i, e in enumerate(events):
        if e["who"].startswith("web") and _is_speak(e):
            writers.append(SpeechWriter(len(writers)))
        if e.get("dir") != "send" or not e["who"].startswith("web"):
            continue
        msg = e["msg"]
        key = {"audio_chunk": "payload", "utterance": "audio"}.get(msg.get("type", ""))
        if key is None or not isinstance(msg.get(key), str):
            continue
        shape = parse_elision(msg[key])
        if shape is None:
            continue
        raw = writers[-1].chunk(shape) if shape.is_speech and writers else silence(shape.size)
        assert len(raw) == shape.size, (i, len(raw), shape.size)
        payloads[i] = base64.b64encode(raw).decode()
    return payloads, [w.packets for w in writers]


def _node_results(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        e["msg"]
        for e in events
        if e["who"] == "node" and e.get("dir") == "send" and e["msg"].get("type") == "job_result"
    ]


def _template_from(results: list[dict[str, Any]]) -> AnswerTemplate | None:
    speech = [r for r in results if r.get("success") and r.get("text_asr")]
    empty = [r for r in results if r.get("success") and not r.get("text_asr")]
    if not speech or not empty:
        return None
    s = speech[0]
    shape = parse_elision(s.get("tts_audio") or "")
    if shape is None:
        return None
    more: dict[str, Any] = {k: s[k] for k in ("rerun_count", "segments_meta") if k in s}
    return AnswerTemplate(
        tts_shape=shape,
        tts_format=str(s.get("tts_format") or "opus"),
        speech_extra=dict(s.get("extra") or {}),
        speech_more=more,
        empty_extra=dict(empty[-1].get("extra") or {}),
    )


def _versions(events: list[dict[str, Any]]) -> dict[str, str]:
    return {e["who"]: str(e["version"]) for e in events if e.get("ev") in ("node_started", "web_started")}


@cache
def _template_for_version(version: str) -> AnswerTemplate | None:
    """A scenario whose node never answered a sentence borrows the answers of the same node version."""
    for name in scenario_names():
        events = _read(name)
        if _versions(events).get("node") == version:
            t = _template_from(_node_results(events))
            if t is not None:
                return t
    return None


def _timing(name: str, version: str, results: list[dict[str, Any]]) -> NodeTiming:
    if name.startswith("slownode"):
        base = SLOW
    else:
        # later speech jobs: the recorded median (the first one also carries the start-up delay)
        times = [int(r["processing_time_ms"]) for r in results if r.get("text_asr")][1:]
        base = NodeTiming(speech_ms=int(statistics.median(times))) if times else NodeTiming()
    if version == "74":
        return NodeTiming(base.speech_ms, base.empty_ms, 5_000, base.lease_timeout_ms)
    return base


def load(name: str) -> Scenario:
    return build(name, _read(name))


def build(name: str, raw_events: list[dict[str, Any]]) -> Scenario:
    """A scenario from its events (a recording's lines, or a scenario of ours derived from one)."""
    events = sorted(enumerate(raw_events), key=lambda p: (int(p[1]["t_ms"]), p[0]))
    ordered = [e for _, e in events]
    first = ordered[0]
    assert first.get("ev") == "scheduler_started", name
    payloads, packets = _rebuild_audio(ordered)
    versions = _versions(ordered)
    sc = Scenario(
        name=name,
        events=ordered,
        config_env=dict(first.get("config_env") or {}),
        versions=versions,
        sentences=list(SENTENCES.get(name, [])),
        payloads=payloads,
        sentence_packets=packets,
    )
    spoken = sum(1 for e in ordered if e["who"].startswith("web") and _is_speak(e))
    assert spoken == len(sc.sentences), f"{name}: {spoken} sentences spoken, {len(sc.sentences)} texts"
    results = _node_results(ordered)
    for who, version in versions.items():
        if not who.startswith("node"):
            continue
        template = _template_from(results) or _template_for_version(version)
        assert template is not None, f"no recorded answers for a {version} node"
        sc.templates[who] = template
        sc.timing[who] = _timing(name, version, results)
    return sc


__all__ = [
    "SENTENCES",
    "AnswerTemplate",
    "NodeTiming",
    "Scenario",
    "build",
    "load",
    "recorded_events",
    "scenario_names",
]
