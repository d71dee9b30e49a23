"""Rooms in the core: membership, refusals, expiry, fan-out plans, the WebRTC relay decision and TURN
credentials, on a manual clock and a seeded randomness; then what the reference web client sent and
reads, against the message types."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from lingua_scheduler.clock import ManualClock
from lingua_scheduler.config import RoomsConfig
from lingua_scheduler.core.randomness import SYSTEM_RANDOMNESS, digits
from lingua_scheduler.core.rooms import (
    CODE_ATTEMPTS,
    RelayLimiter,
    RelayOutcome,
    Rooms,
    turn_credentials,
)
from lingua_scheduler.errors import ErrorCode
from lingua_scheduler.protocol.codec import FrameDecoder, encode
from lingua_scheduler.protocol.session import (
    RoomCreate,
    RoomCreateAck,
    RoomError,
    RoomExpired,
    RoomJoin,
    RoomMembers,
    RoomRawVoicePreference,
    SessionInbound,
    WebRtcAnswer,
    WebRtcIce,
    WebRtcIceRelayed,
    WebRtcOffer,
    WebRtcOfferRelayed,
)

RECORDINGS = Path(__file__).resolve().parents[1] / "conformance" / "recordings"
SECRET = "a-turn-secret-of-16+"


class Seeded:
    """A deterministic ``Randomness`` for tests."""

    def __init__(self, seed: int = 7) -> None:
        self._r = random.Random(seed)

    def randbelow(self, n: int) -> int:
        return self._r.randrange(n)

    def token_bytes(self, n: int) -> bytes:
        return self._r.randbytes(n)


class Scripted(Seeded):
    """Draws the given integers first (to force collisions), then seeded ones."""

    def __init__(self, draws: list[int]) -> None:
        super().__init__()
        self._draws: Iterator[int] = iter(draws)

    def randbelow(self, n: int) -> int:
        return next(self._draws, None) or super().randbelow(n)


def make(**config: Any) -> tuple[Rooms, ManualClock]:
    clock = ManualClock()
    return Rooms(RoomsConfig(**config), clock, Seeded()), clock


def kinds(change: Any) -> list[tuple[str, str]]:
    return [(n.to, type(n.message).__name__) for n in change.notices]


def created(rooms: Rooms, sid: str = "s-A", lang: str = "en") -> str:
    change = rooms.create(sid, preferred_lang=lang, display_name=sid)
    assert change.error is None
    ack = change.notices[0].message
    assert isinstance(ack, RoomCreateAck)
    return ack.room_code


# --- membership --------------------------------------------------------------------------------------


def test_create_acks_then_lists_the_creator() -> None:
    rooms, clock = make()
    change = rooms.create("s-A", preferred_lang="EN-us", display_name="Alice")
    assert kinds(change) == [("s-A", "RoomCreateAck"), ("s-A", "RoomMembers")]
    ack, members = (n.message for n in change.notices)
    assert isinstance(ack, RoomCreateAck) and isinstance(members, RoomMembers)
    assert len(ack.room_code) == 6 and ack.room_code.isdigit()
    assert change.opened is not None and change.opened.room_id == ack.room_id
    [m] = members.members
    assert (m.participant_id, m.session_id, m.display_name, m.preferred_lang) == ("s-A", "s-A", "Alice", "en")
    assert m.joined_at == clock.wall_ms() and m.raw_voice_preferences == {}
    assert ack.ice_servers is None and members.ice_servers is None  # none configured


def test_join_tells_every_member_once() -> None:
    rooms, _ = make()
    code = created(rooms)
    change = rooms.join("s-B", code, preferred_lang="zh", display_name="Bob")
    assert sorted(kinds(change)) == [("s-A", "RoomMembers"), ("s-B", "RoomMembers")]
    lists = {n.to: [m.session_id for m in n.message.members] for n in change.notices}  # type: ignore[union-attr]
    assert lists == {"s-A": ["s-A", "s-B"], "s-B": ["s-A", "s-B"]}


@pytest.mark.parametrize(
    ("setup", "session", "code", "error"),
    [
        ("none", "s-B", "12345", ErrorCode.INVALID_ROOM_CODE),
        ("none", "s-B", "12345a", ErrorCode.INVALID_ROOM_CODE),
        ("none", "s-B", "１２３４５６", ErrorCode.INVALID_ROOM_CODE),  # noqa: RUF001 (fullwidth digits)
        ("none", "s-B", "1234567", ErrorCode.INVALID_ROOM_CODE),
        ("none", "s-B", "000000", ErrorCode.ROOM_NOT_FOUND),
        ("room", "s-A", "ROOM", ErrorCode.ALREADY_IN_ROOM),  # the creator joining its own room
        ("two rooms", "s-A", "OTHER", ErrorCode.ALREADY_IN_ROOM),  # a session is in one room
        ("full", "s-Z", "ROOM", ErrorCode.ROOM_FULL),
    ],
)
def test_join_refusals_change_nothing(setup: str, session: str, code: str, error: ErrorCode) -> None:
    rooms, _ = make(max_members=3)
    room = created(rooms) if setup != "none" else ""
    other = created(rooms, "s-O") if setup == "two rooms" else ""
    if setup == "full":
        rooms.join("s-B", room, preferred_lang="zh")
        rooms.join("s-C", room, preferred_lang="zh")
    before = {r.code: list(r.members) for r in rooms}
    code = {"ROOM": room, "OTHER": other}.get(code, code)
    change = rooms.join(session, code, preferred_lang="en")
    assert change.error is error and len(change.notices) == 1
    notice = change.notices[0]
    assert notice.to == session and isinstance(notice.message, RoomError)
    assert notice.message.code == error.value and notice.message.message
    assert {r.code: list(r.members) for r in rooms} == before


def test_create_while_in_a_room_is_refused() -> None:
    rooms, _ = make()
    code = created(rooms)
    change = rooms.create("s-A", preferred_lang="en")
    assert change.error is ErrorCode.ALREADY_IN_ROOM and change.opened is None
    assert len(rooms) == 1 and rooms.room_of("s-A") is rooms.get(code)


def test_leave_tells_the_rest_and_the_last_one_closes_the_room() -> None:
    rooms, _ = make()
    code = created(rooms)
    rooms.join("s-B", code, preferred_lang="zh")
    rooms.set_raw_voice("s-A", code, "s-B", False)
    change = rooms.leave("s-B", code)
    assert kinds(change) == [("s-A", "RoomMembers")]
    [members] = [n.message for n in change.notices]
    assert isinstance(members, RoomMembers)
    # the preference about the member that left is gone with it
    assert [(m.session_id, m.raw_voice_preferences) for m in members.members] == [("s-A", {})]
    last = rooms.leave("s-A", code)
    assert last.notices == [] and [r.code for r in last.closed] == [code]
    assert len(rooms) == 0 and rooms.room_of("s-A") is None


@pytest.mark.parametrize(
    ("code", "error"),
    [
        ("abc", ErrorCode.INVALID_ROOM_CODE),
        ("999999", ErrorCode.ROOM_NOT_FOUND),
        ("OTHER", ErrorCode.NOT_IN_ROOM),
    ],
)
def test_leave_and_preference_refusals(code: str, error: ErrorCode) -> None:
    rooms, _ = make()
    mine = created(rooms)
    other = created(rooms, "s-O")
    code = other if code == "OTHER" else code
    assert rooms.leave("s-A", code).error is error
    assert rooms.set_raw_voice("s-A", code, "s-O", False).error is error
    assert rooms.room_of("s-A") is rooms.get(mine)


def test_disconnect_leaves_no_ghost() -> None:
    rooms, _ = make()
    code = created(rooms)
    rooms.join("s-B", code, preferred_lang="zh")
    change = rooms.disconnect("s-A")
    assert kinds(change) == [("s-B", "RoomMembers")]
    room = rooms.get(code)
    assert room is not None and list(room.members) == ["s-B"]
    assert rooms.disconnect("s-A").notices == []  # not in a room any more: nothing to do
    assert rooms.join("s-A", code, preferred_lang="en").error is None  # and free to join again


def test_raw_voice_preference_is_shown_to_everyone() -> None:
    rooms, _ = make()
    code = created(rooms)
    rooms.join("s-B", code, preferred_lang="zh")
    change = rooms.set_raw_voice("s-B", code, "s-A", False)
    assert sorted(n.to for n in change.notices) == ["s-A", "s-B"]
    for n in change.notices:
        assert isinstance(n.message, RoomMembers)
        prefs = {m.session_id: m.raw_voice_preferences for m in n.message.members}
        assert prefs == {"s-A": {}, "s-B": {"s-A": False}}
    assert rooms.set_raw_voice("s-B", code, "s-B", False).error is ErrorCode.PEER_NOT_IN_ROOM
    assert rooms.set_raw_voice("s-B", code, "s-X", False).error is ErrorCode.PEER_NOT_IN_ROOM


# --- codes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [4, 6, 9, 12])
def test_codes_have_the_configured_length(length: int) -> None:
    rooms, _ = make(code_length=length)
    code = created(rooms)
    assert len(code) == length and code.isdigit() and rooms.valid_code(code)
    assert not rooms.valid_code(code + "0")


def test_a_code_taken_here_or_in_the_cluster_is_never_given() -> None:
    taken_elsewhere = {"000002"}
    clock = ManualClock()
    rooms = Rooms(RoomsConfig(), clock, Scripted([1, 1, 2, 3]), code_taken=taken_elsewhere.__contains__)
    assert created(rooms, "s-A") == "000001"
    assert created(rooms, "s-B") == "000003"  # 000001 is live here, 000002 in the cluster


def test_no_free_code_is_a_clear_refusal() -> None:
    rooms = Rooms(RoomsConfig(), ManualClock(), Seeded(), code_taken=lambda code: True)
    change = rooms.create("s-A", preferred_lang="en")
    assert change.error is ErrorCode.INTERNAL_ERROR and len(rooms) == 0 and rooms.room_of("s-A") is None
    assert CODE_ATTEMPTS >= 16


def test_a_claimed_code_is_used_as_proposed() -> None:
    rooms, _ = make()
    code = rooms.propose_code()
    assert code is not None
    change = rooms.create("s-A", preferred_lang="en", code=code)
    assert change.opened is not None and change.opened.code == code
    assert rooms.create("s-B", preferred_lang="en", code=code).error is ErrorCode.INTERNAL_ERROR


def test_default_codes_come_from_the_csprng_over_the_whole_space() -> None:
    codes = {digits(SYSTEM_RANDOMNESS, 6) for _ in range(2000)}
    assert len(codes) > 1990  # 2000 draws of 10^6 codes: a handful of repeats at most
    assert any(c.startswith("0") for c in codes)  # leading zeros are codes too


# --- expiry ------------------------------------------------------------------------------------------


def test_a_room_nobody_spoke_in_expires_and_every_member_is_told() -> None:
    rooms, clock = make(expire_after_seconds=1800)
    code = created(rooms)
    rooms.join("s-B", code, preferred_lang="zh")
    other = created(rooms, "s-C")
    assert rooms.next_expiry() == clock.monotonic() + 1800
    clock.advance(1000)
    rooms.spoke("s-C")  # speech keeps the other room alive
    clock.advance(800)
    change = rooms.expire()
    assert sorted(kinds(change)) == [("s-A", "RoomExpired"), ("s-B", "RoomExpired")]
    for n in change.notices:
        assert (
            isinstance(n.message, RoomExpired)
            and n.message.room_code == code
            and "30 minutes" in n.message.message
        )
    assert [r.code for r in change.closed] == [code]
    assert rooms.get(code) is None and rooms.room_of("s-A") is None and rooms.room_of("s-B") is None
    assert rooms.get(other) is not None
    assert rooms.expire().notices == []  # told once


def test_a_join_keeps_the_room_alive() -> None:
    rooms, clock = make(expire_after_seconds=60)
    code = created(rooms)
    clock.advance(59)
    rooms.join("s-B", code, preferred_lang="zh")
    clock.advance(59)
    assert rooms.expire().closed == []
    clock.advance(1)
    assert [r.code for r in rooms.expire().closed] == [code]


# --- fan-out -----------------------------------------------------------------------------------------


def test_alone_or_outside_a_room_one_job_to_the_own_target() -> None:
    rooms, _ = make()
    plan = rooms.plan("s-X", src_lang="zh", tgt_lang="en")
    assert [(g.tgt_lang, g.recipients) for g in plan.groups] == [("en", ())]
    assert plan.room_id is None and rooms.recipients(plan, 0) == ("s-X",)
    created(rooms, "s-A", "fr")
    plan = rooms.plan("s-A", src_lang="zh", tgt_lang="en")
    assert [g.tgt_lang for g in plan.groups] == ["en"] and not plan.speaker_transcript_only


def test_one_job_per_language_of_the_others() -> None:
    rooms, _ = make()
    code = created(rooms, "s-A", "zh")
    for sid, lang in (("s-B", "en"), ("s-C", "fr"), ("s-D", "en-GB"), ("s-E", "zh")):
        rooms.join(sid, code, preferred_lang=lang)
    plan = rooms.plan("s-A", src_lang="zh", tgt_lang="en")
    assert [(g.tgt_lang, g.recipients, g.same_language) for g in plan.groups] == [
        ("en", ("s-B", "s-D"), False),
        ("fr", ("s-C",), False),
        ("zh", ("s-E",), True),
    ]
    # the speaker gets the result in its own target language, once
    assert plan.speaker_group == 0 and not plan.speaker_transcript_only
    assert [rooms.recipients(plan, i) for i in range(3)] == [("s-A", "s-B", "s-D"), ("s-C",), ("s-E",)]
    every = [r for i in range(3) for r in rooms.recipients(plan, i)]
    assert sorted(every) == sorted(set(every))  # nobody twice


def test_the_speaker_gets_a_transcript_when_nobody_shares_its_target() -> None:
    rooms, _ = make()
    code = created(rooms, "s-A", "en")
    rooms.join("s-B", code, preferred_lang="fr")
    plan = rooms.plan("s-A", src_lang="zh", tgt_lang="en")
    assert plan.speaker_transcript_only and plan.speaker_group == 0
    assert rooms.recipients(plan, 0) == ("s-A", "s-B")


def test_a_member_that_leaves_mid_utterance_is_dropped_from_the_recipients() -> None:
    rooms, _ = make()
    code = created(rooms, "s-A", "zh")
    rooms.join("s-B", code, preferred_lang="en")
    rooms.join("s-C", code, preferred_lang="en")
    plan = rooms.plan("s-A", src_lang="zh", tgt_lang="zh")
    assert plan.speaker_transcript_only  # nobody else receives zh: the speaker's copy is its transcript
    rooms.leave("s-B", code)
    assert rooms.recipients(plan, 0) == ("s-A", "s-C")
    # the room ends and a new one takes its code: nobody of the new room gets the old utterance, the
    # speaker still gets its own
    rooms.leave("s-C", code)
    rooms.leave("s-A", code)
    assert rooms.create("s-Q", preferred_lang="en", code=code).opened is not None
    rooms.join("s-C", code, preferred_lang="en")
    assert rooms.recipients(plan, 0) == ("s-A",)


# --- relay -------------------------------------------------------------------------------------------


def pair(**config: Any) -> tuple[Rooms, str, RelayLimiter, ManualClock]:
    rooms, clock = make(**config)
    code = created(rooms, "s-A", "zh")
    rooms.join("s-B", code, preferred_lang="en")
    return rooms, code, RelayLimiter(rooms.config, clock), clock


def sdp(size: int = 20) -> msgspec.Raw:
    return msgspec.Raw(msgspec.json.encode({"type": "offer", "sdp": "v" * size}))


def test_relays_reach_the_receiver_with_to_naming_the_sender() -> None:
    rooms, code, limiter, _ = pair()
    offer = rooms.relay("s-B", WebRtcOffer(room_code=code, to="s-A", sdp=sdp()), limiter)
    assert offer.outcome is RelayOutcome.DELIVER and offer.notice.to == "s-A"
    assert isinstance(offer.notice.message, WebRtcOfferRelayed) and offer.notice.message.to == "s-B"
    wire = json.loads(encode(offer.notice.message))
    assert wire == {
        "type": "webrtc_offer",
        "room_code": code,
        "to": "s-B",
        "sdp": {"type": "offer", "sdp": "v" * 20},
    }
    cand = msgspec.Raw(b'{"candidate":"candidate:1 1 udp 1 127.0.0.1 9 typ host","sdpMid":"0"}')
    ice = rooms.relay("s-A", WebRtcIce(room_code=code, to="s-B", candidate=cand), limiter)
    assert ice.outcome is RelayOutcome.DELIVER and isinstance(ice.notice.message, WebRtcIceRelayed)
    assert bytes(ice.notice.message.candidate) == bytes(cand)
    answer = rooms.relay("s-A", WebRtcAnswer(room_code=code, to="s-B", sdp=sdp()), limiter)
    assert (
        answer.outcome is RelayOutcome.DELIVER
        and json.loads(encode(answer.notice.message))["type"] == "webrtc_answer"
    )


@pytest.mark.parametrize(
    ("sender", "code", "to", "error"),
    [
        ("s-B", "ROOM", "s-X", ErrorCode.PEER_NOT_IN_ROOM),  # someone not in the room
        ("s-B", "ROOM", "s-B", ErrorCode.PEER_NOT_IN_ROOM),  # itself
        ("s-B", "ROOM", "s-O", ErrorCode.PEER_NOT_IN_ROOM),  # a member of another room
        ("s-X", "ROOM", "s-A", ErrorCode.NOT_IN_ROOM),  # a sender outside the room
        ("s-O", "ROOM", "s-A", ErrorCode.NOT_IN_ROOM),  # a sender of another room
        ("s-B", "42", "s-A", ErrorCode.INVALID_ROOM_CODE),
        ("s-B", "999999", "s-A", ErrorCode.ROOM_NOT_FOUND),
    ],
)
def test_a_relay_that_cannot_be_delivered_is_answered(
    sender: str, code: str, to: str, error: ErrorCode
) -> None:
    rooms, room, limiter, _ = pair()
    created(rooms, "s-O", "en")
    code = room if code == "ROOM" else code
    decision = rooms.relay(sender, WebRtcOffer(room_code=code, to=to, sdp=sdp()), limiter)
    assert decision.outcome is RelayOutcome.REFUSED and decision.error is error
    assert decision.notice.to == sender and isinstance(decision.notice.message, RoomError)
    assert decision.notice.message.code == error.value


def test_the_receivers_raw_voice_preference_is_honoured() -> None:
    rooms, code, limiter, _ = pair()
    rooms.set_raw_voice("s-A", code, "s-B", False)  # A does not want B's voice
    declined = rooms.relay("s-B", WebRtcOffer(room_code=code, to="s-A", sdp=sdp()), limiter)
    assert declined.outcome is RelayOutcome.DECLINED and declined.notice.to == "s-B"
    assert declined.error is ErrorCode.RAW_VOICE_DECLINED
    # the other way round is B's choice, and B did not decline
    assert (
        rooms.relay("s-A", WebRtcOffer(room_code=code, to="s-B", sdp=sdp()), limiter).outcome
        is RelayOutcome.DELIVER
    )
    rooms.set_raw_voice("s-A", code, "s-B", True)
    assert (
        rooms.relay("s-B", WebRtcOffer(room_code=code, to="s-A", sdp=sdp()), limiter).outcome
        is RelayOutcome.DELIVER
    )


def test_relay_size_bounds() -> None:
    rooms, code, limiter, _ = pair(max_sdp_bytes=100, max_candidate_bytes=50)
    ok = sdp(100 - len(b'{"type":"offer","sdp":""}'))
    assert len(ok) == 100
    assert (
        rooms.relay("s-B", WebRtcOffer(room_code=code, to="s-A", sdp=ok), limiter).outcome
        is RelayOutcome.DELIVER
    )
    big = rooms.relay("s-B", WebRtcAnswer(room_code=code, to="s-A", sdp=sdp(101)), limiter)
    assert big.error is ErrorCode.MESSAGE_TOO_LARGE
    cand = msgspec.Raw(msgspec.json.encode("c" * 49))
    assert rooms.relay("s-B", WebRtcIce(room_code=code, to="s-A", candidate=cand), limiter).error is (
        ErrorCode.MESSAGE_TOO_LARGE
    )


def test_relay_rate_per_connection() -> None:
    rooms, code, limiter, clock = pair(relay_messages_per_second=2, relay_burst=3)
    other = RelayLimiter(rooms.config, clock)

    def send(lim: RelayLimiter) -> RelayOutcome:
        return rooms.relay(
            "s-B", WebRtcIce(room_code=code, to="s-A", candidate=msgspec.Raw(b"{}")), lim
        ).outcome

    assert [send(limiter) for _ in range(4)] == [RelayOutcome.DELIVER] * 3 + [RelayOutcome.REFUSED]
    assert send(other) is RelayOutcome.DELIVER  # another connection has its own budget
    clock.advance(0.5)
    assert [send(limiter) for _ in range(2)] == [RelayOutcome.DELIVER, RelayOutcome.REFUSED]


# --- ICE servers and TURN credentials ----------------------------------------------------------------


def test_turn_credentials_are_what_coturn_use_auth_secret_checks() -> None:
    # the password was computed independently, with openssl:
    # printf '1700043200:s-ALICE' | openssl dgst -sha1 -hmac SECRET -binary | base64
    assert turn_credentials(SECRET, "s-ALICE", 1_700_043_200) == (
        "1700043200:s-ALICE",
        "fs/AaDyE46Df5KxpLIPu9+g37fg=",
    )


def test_ice_servers_are_handed_out_per_member() -> None:
    rooms, clock = make(
        stun_urls=["stun:stun.example.org:3478"],
        turn_urls=["turn:turn.example.org:3478?transport=udp", "turns:turn.example.org:5349"],
        turn_secret=SECRET,
        turn_credential_ttl_seconds=600,
    )
    change = rooms.create("s-A", preferred_lang="en")
    ack = change.notices[0].message
    assert isinstance(ack, RoomCreateAck) and ack.ice_servers is not None
    stun, turn = ack.ice_servers
    assert stun.urls == ["stun:stun.example.org:3478"] and stun.username is None
    expiry = clock.wall_ms() // 1000 + 600
    assert (turn.username, turn.credential) == turn_credentials(SECRET, "s-A", expiry)
    assert ack.ice_expires_at_ms == expiry * 1000
    code = ack.room_code
    joined = rooms.join("s-B", code, preferred_lang="zh")
    users = {n.to: n.message.ice_servers[1].username for n in joined.notices}  # type: ignore[union-attr,index]
    assert users == {"s-A": f"{expiry}:s-A", "s-B": f"{expiry}:s-B"}


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"turn_urls": ["turn:t.example.org"]}, "turn_secret"),
        ({"turn_urls": ["turn:t.example.org"], "turn_secret": "short"}, "turn_secret"),
        ({"stun_urls": ["http://stun.example.org"]}, "stun_urls"),
        ({"code_length": 3}, "code_length"),
        ({"max_members": 1}, "max_members"),
        ({"relay_burst": 0}, "relay_burst"),
    ],
)
def test_bad_rooms_config_names_the_key(config: dict[str, Any], key: str) -> None:
    from lingua_scheduler.config import load_config
    from lingua_scheduler.errors import ConfigError

    env = {f"LINGUA_ROOMS__{k.upper()}": json.dumps(v) for k, v in config.items()}
    with pytest.raises(ConfigError) as exc:
        load_config(None, env=env)
    assert exc.value.key == f"rooms.{key}"


# --- the reference client --------------------------------------------------------------------------

ROOM_TYPES = {
    "room_create",
    "room_join",
    "room_leave",
    "room_raw_voice_preference",
    "webrtc_offer",
    "webrtc_answer",
    "webrtc_ice",
}


def _sent(file: str) -> list[dict[str, Any]]:
    out = []
    for line in (RECORDINGS / file).read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        msg = event.get("msg")
        if event.get("dir") == "send" and isinstance(msg, dict) and msg.get("type") in ROOM_TYPES:
            out.append(msg)
    return out


@pytest.mark.parametrize("file", ["rooms_74.jsonl", "rooms_head.jsonl"])
def test_recorded_room_frames_decode(file: str) -> None:
    decoder: FrameDecoder[Any] = FrameDecoder(SessionInbound, 1 << 20)
    frames = _sent(file)
    assert {f["type"] for f in frames} == {
        "room_create",
        "room_join",
        "webrtc_offer",
        "webrtc_ice",
        "room_raw_voice_preference",
    }
    for frame in frames:
        msg = decoder.decode(json.dumps(frame))
        assert msg.__struct_config__.tag == frame["type"]
        if isinstance(msg, RoomJoin):
            assert (msg.room_code, msg.display_name) == ("123456", "Bob")
        if isinstance(msg, WebRtcOffer):
            assert json.loads(bytes(msg.sdp)) == frame["sdp"]  # relayed byte for byte
        if isinstance(msg, RoomRawVoicePreference):
            assert msg.receive_raw_voice is False
        if isinstance(msg, RoomCreate):
            assert msg.client_ts > 0


def test_recorded_pairing_request_decodes() -> None:
    from lingua_scheduler.protocol.node import NodeInbound, RequestPairingCode

    lines = [json.loads(x) for x in (RECORDINGS / "pairing_74.jsonl").read_text().splitlines()]
    [frame] = [
        e["msg"] for e in lines if e.get("dir") == "send" and e["msg"].get("type") == "request_pairing_code"
    ]
    assert isinstance(FrameDecoder[Any](NodeInbound, 1 << 20).decode(json.dumps(frame)), RequestPairingCode)


#: what the reference web client reads of each message (types.ts, its message handler and room code)
CLIENT_READS: dict[str, set[str]] = {
    "room_create_ack": {"room_code"},
    "room_members": {"room_code", "members"},
    "room_error": {"code", "message"},
    "room_expired": {"room_code", "message"},
    "webrtc_offer": {"room_code", "to", "sdp"},
    "webrtc_answer": {"to", "sdp"},
    "webrtc_ice": {"to", "candidate"},
}
#: RoomMember as types.ts declares it, with the JSON type of each field
CLIENT_MEMBER = {
    "participant_id": str,
    "session_id": str,
    "display_name": str,
    "preferred_lang": str,
    "raw_voice_preferences": dict,
    "joined_at": int,
}


def test_outbound_messages_carry_what_the_client_reads() -> None:
    rooms, code, limiter, _ = pair()
    seen: dict[str, dict[str, Any]] = {}
    for change in (
        rooms.create("s-N", preferred_lang="en", display_name="Nina"),
        rooms.join("s-X", "000000", preferred_lang="en"),
        rooms.set_raw_voice("s-A", code, "s-B", False),
    ):
        for n in change.notices:
            wire = json.loads(encode(n.message))
            seen[wire["type"]] = wire
    for msg in (
        WebRtcOffer(room_code=code, to="s-B", sdp=sdp()),
        WebRtcAnswer(room_code=code, to="s-B", sdp=sdp()),
        WebRtcIce(room_code=code, to="s-B", candidate=msgspec.Raw(b"{}")),
    ):
        wire = json.loads(encode(rooms.relay("s-A", msg, limiter).notice.message))
        seen[wire["type"]] = wire
    clock = ManualClock()
    short = Rooms(RoomsConfig(expire_after_seconds=1), clock, Seeded())
    created(short)
    clock.advance(1)
    seen["room_expired"] = json.loads(encode(short.expire().notices[0].message))
    for tag, fields in CLIENT_READS.items():
        assert fields <= set(seen[tag]), tag
    members = seen["room_members"]["members"]
    for member in members:
        assert {k: type(v) for k, v in member.items()} == {k: CLIENT_MEMBER[k] for k in member}
        assert set(CLIENT_MEMBER) - {"display_name"} <= set(member)  # a name only when one was given
        assert member["participant_id"] == member["session_id"]
    assert any("display_name" in m for m in members)
    prefs = {m["session_id"]: m["raw_voice_preferences"] for m in members}
    # the client reads another member's map at its own id: false means that member does not want it
    assert prefs["s-A"] == {"s-B": False}
