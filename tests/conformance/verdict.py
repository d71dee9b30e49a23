"""What the real apps would have shown, judged from a replay's transcript.

Only outside truth: frames the web client and the node received. A spoken sentence counts as
translated when a ``translation_result`` reached the web client whose ``text_asr`` holds the whole
sentence (a result holding a fragment means the scheduler cut the sentence apart), with a non-empty
``text_translated`` and TTS audio, after the results that translated the sentences before it.

Error popups follow the web client's own rule for an ``error`` frame: it shows
``alert("服务器错误: ...")`` unless the error's ``trace_id`` is that of the last translation shown, or its
code is ``PROCESSING_ERROR``, ``NMT_TIMEOUT`` or ``TTS_TIMEOUT`` and a translation with text for
utterance 0 or 1 was already shown. ``missing_result``, ``ui_event`` and the rest never pop up.
"""

from __future__ import annotations

from dataclasses import dataclass

from tests.conformance.recording import Scenario
from tests.conformance.replay import Frame, Transcript

NON_CRITICAL = {"PROCESSING_ERROR", "NMT_TIMEOUT", "TTS_TIMEOUT"}


@dataclass
class Verdict:
    spoken: int
    translated: int
    popups: list[str]
    failures: list[str]

    @property
    def ok(self) -> bool:
        return not self.failures


def _short(text: str, n: int = 24) -> str:
    return text if len(text) <= n else text[:n] + "…"


def popups(tr: Transcript, who: str) -> list[str]:
    shown: list[str] = []
    last_trace: str | None = None
    early_result = False
    for f in tr.received(who):
        t = f.msg.get("type")
        if t == "translation_result" and (f.msg.get("text_asr") or f.msg.get("text_translated")):
            last_trace = f.msg.get("trace_id")
            if f.msg.get("utterance_index") in (0, 1):
                early_result = True
        elif t == "error":
            code = str(f.msg.get("code"))
            if f.msg.get("trace_id") and f.msg.get("trace_id") == last_trace:
                continue
            if code in NON_CRITICAL and early_result:
                continue
            shown.append(f"{f.t_ms} ms {code}: {_short(str(f.msg.get('message')), 90)}")
    return shown


def _results(tr: Transcript) -> list[Frame]:
    return [
        f
        for f in tr.frames
        if f.dir == "recv" and f.who.startswith("web") and f.msg.get("type") == "translation_result"
    ]


def translations(sc: Scenario, tr: Transcript) -> tuple[int, list[str]]:
    """How many sentences were translated in order, and the first one that was not (as a message)."""
    results = _results(tr)
    pos = 0
    for k, sentence in enumerate(sc.sentences):
        match = next(
            (
                i
                for i in range(pos, len(results))
                if sentence in str(results[i].msg.get("text_asr") or "")
                and str(results[i].msg.get("text_translated") or "").strip()
                and results[i].msg.get("tts_audio")
            ),
            None,
        )
        if match is None:
            seen = [
                f"#{r.msg.get('utterance_index')} {_short(str(r.msg.get('text_asr') or ''), 12)!r}"
                + ("" if r.msg.get("tts_audio") else " (no tts)")
                for r in results
            ]
            return k, [
                f"sentence {k + 1}/{len(sc.sentences)} ({_short(sentence, 12)!r}) never reached the web "
                f"client whole as a translation_result with text and TTS; "
                f"translation_results seen: {seen or 'none'}"
            ]
        pos = match
    return len(sc.sentences), []


def node_accepted(tr: Transcript, who: str = "node", *, no_errors: bool = False) -> list[str]:
    if not tr.sent(who, "node_register"):
        return [f"{who} never sent node_register"]
    errors = [
        f"{f.msg.get('code')}: {_short(str(f.msg.get('message')), 120)}" for f in tr.received(who, "error")
    ]
    if not tr.received(who, "node_register_ack"):
        return [f"{who}'s node_register was not accepted: {errors[:1] or 'no answer'}"]
    if no_errors and errors:
        return [f"{who} received errors: {errors}"]
    return []


def heartbeats_answered(tr: Transcript) -> list[str]:
    out: list[str] = []
    sent, got = len(tr.sent("web", "client_heartbeat")), len(tr.received("web", "server_heartbeat"))
    if got < sent:
        out.append(f"web: {sent} client_heartbeat, {got} server_heartbeat")
    sent, got = len(tr.sent("node", "node_heartbeat")), len(tr.received("node", "node_heartbeat_ack"))
    if got < sent:
        out.append(f"node: {sent} node_heartbeat, {got} node_heartbeat_ack")
    return out


def rooms_worked(tr: Transcript) -> list[str]:
    """webA created a room, webB joined it, and webB's offer and candidate reached webA from webB
    (``to`` naming the sender, as the client reads it); every request was answered in room terms."""
    out: list[str] = []
    acks = tr.received("webA", "room_create_ack")
    if not acks:
        return ["webA's room_create was not answered with room_create_ack"]
    b_session = next((f.msg.get("session_id") for f in tr.received("webB", "session_init_ack")), None)
    members = tr.received("webB", "room_members")
    if not any(len(f.msg.get("members") or []) == 2 for f in members):
        out.append("webB never saw itself and webA in room_members (its room_join did not work)")
    for kind in ("webrtc_offer", "webrtc_ice"):
        if not any(f.msg.get("to") == b_session for f in tr.received("webA", kind)):
            out.append(f"webB's {kind} never reached webA naming webB")
    refused = [
        f"{f.msg.get('code')}: {f.msg.get('message')}"
        for w in ("webA", "webB")
        for f in tr.received(w, "room_error")
    ]
    if refused:
        out.append(f"room requests refused: {refused}")
    return out


def pairing_answered(tr: Transcript) -> list[str]:
    """The node's request_pairing_code got a code it can show (it reads ``code`` within 5 s)."""
    codes = tr.received("node", "pairing_code")
    if not codes or not str(codes[0].msg.get("code") or "").isdigit():
        return ["the node's request_pairing_code was not answered with a pairing_code"]
    return []


def judge(sc: Scenario, tr: Transcript) -> Verdict:
    failures: list[str] = []
    if tr.error:
        failures.append(tr.error)
    if "node" in sc.actors():
        # without a registered node nothing else can work: say so first
        failures += node_accepted(tr, no_errors=sc.name.startswith(("register", "heartbeat")))
    translated, missing = translations(sc, tr)
    failures += missing
    shown: list[str] = []
    for who in sc.actors():
        if who.startswith("web"):
            shown += popups(tr, who)
    if shown:
        failures.append(f"{len(shown)} error popup(s) at the web client, first: {shown[0]}")
    if sc.name.startswith("heartbeat"):
        failures += heartbeats_answered(tr)
    if sc.name.startswith("rooms"):
        failures += rooms_worked(tr)
    if sc.name.startswith("pairing"):
        failures += pairing_answered(tr)
    return Verdict(len(sc.sentences), translated, shown, failures)


__all__ = ["Verdict", "judge", "popups", "translations"]
