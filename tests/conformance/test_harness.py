"""The replay harness itself: rebuilt audio has the recorded shape, and the emulated ASR hears it right.

If these fail, a conformance verdict means nothing; they run in milliseconds.
"""

from __future__ import annotations

import base64

import pytest

from tests.conformance.plan_a import listen, parse_elision, silence
from tests.conformance.recording import load, scenario_names
from tests.conformance.replay import Clock, RecordedNode, Transcript


@pytest.mark.parametrize("name", scenario_names())
def test_rebuilt_audio_has_the_recorded_size_and_head(name: str) -> None:
    sc = load(name)
    for i, payload in sc.payloads.items():
        msg = sc.events[i]["msg"]
        shape = parse_elision(msg.get("payload", msg.get("audio")))
        assert shape is not None
        raw = base64.b64decode(payload)
        assert len(raw) == shape.size
        assert raw[: len(shape.head)] == shape.head
        assert listen(raw).valid


def _node(name: str) -> RecordedNode:
    sc = load(name)
    return RecordedNode("node", sc, Transcript(name), Clock())


def _speech_of(name: str, sentence: int) -> list[bytes]:
    sc = load(name)
    chunks = []
    for _, payload in sorted(sc.payloads.items()):
        raw = base64.b64decode(payload)
        if any(s == sentence for s, _ in listen(raw).speech):
            chunks.append(raw)
    return chunks


@pytest.mark.parametrize(
    "name", ["session_74_defaults", "session_head_defaults", "twoway_74", "utterance_74"]
)
def test_the_emulated_asr_hears_whole_sentences_and_only_parts_of_cut_ones(name: str) -> None:
    node = _node(name)
    quiet = silence(1280)
    for k, text in enumerate(node.scenario.sentences):
        chunks = _speech_of(name, k)
        whole = b"".join(chunks) + quiet
        assert node.hear(base64.b64encode(whole).decode()) == text
        if len(chunks) > 1:
            part = node.hear(base64.b64encode(chunks[0]).decode())
            assert part and part != text and text.startswith(part)
    assert node.hear(base64.b64encode(quiet).decode()) == ""
    # two sentences in one job: both heard, in order
    first, second = node.scenario.sentences
    both = b"".join(_speech_of(name, 0) + _speech_of(name, 1))
    assert node.hear(base64.b64encode(both).decode()) == f"{first} {second}"
