"""Simulated client sessions speaking the real session protocol over real WebSockets.

``SimulatedSession`` streams synthetic audio (``audio_chunk``) or sends whole ``utterance`` messages and
records what comes back. Like the reference web client it sends Opus in 2-byte length framing and
declares no format (``audio_format="opus"``, the default); ``audio_format="pcm16"`` declares and sends
pcm16 instead; ``outcomes()`` tells, per utterance index, whether it got exactly one result or
one explicit failure. ``run_sessions`` drives many at once (``lingua-scheduler simulate-sessions``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import ssl
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec
import yarl

from lingua_scheduler.core import opus
from lingua_scheduler.sim.reach import Tally, safe_url, start_bounded

_dec = msgspec.json.Decoder()
_enc = msgspec.json.Encoder()

#: 100 ms of 16 kHz mono pcm16
CHUNK_BYTES = 3200


#: TOC byte of the reference client's packets: SILK wideband, 20 ms, one frame
OPUS_TOC_20MS = 0x48


def pcm_chunk(n: int = CHUNK_BYTES, tone: int = 7) -> str:
    return base64.b64encode(bytes((i * tone) & 0xFF for i in range(n))).decode()


def opus_audio(ms: int = 100, packet_bytes: int = 60) -> bytes:
    """``ms`` (a multiple of 20) of synthetic Opus in 2-byte length framing: 20 ms packets of
    ``packet_bytes`` (a TOC byte, then filler; never decoded by the scheduler)."""
    body = bytes([OPUS_TOC_20MS]) + bytes((i * 13) & 0xFF for i in range(packet_bytes - 1))
    return opus.frame([body] * max(1, ms // 20))


def opus_chunk(ms: int = 100) -> str:
    return base64.b64encode(opus_audio(ms)).decode()


class SimulatedSession:
    def __init__(
        self,
        http: aiohttp.ClientSession,
        url: str,
        *,
        src_lang: str = "en",
        tgt_lang: str = "zh",
        tenant_id: str | None = None,
        api_key: str | None = None,
        api_key_via: str = "header",
        audio_format: str = "opus",
    ) -> None:
        self.http = http
        #: "opus": undeclared length-prefixed Opus (the reference client); "pcm16": declared pcm16
        self.audio_format = audio_format
        #: tenant API key (docs/security.md), sent as ``api_key_via``: "header" (Authorization: Bearer),
        #: "x-api-key", "query" (?api_key=) or "init" (session_init.api_key)
        self.api_key = api_key
        self.api_key_via = api_key_via
        self.url = url
        self.src_lang = src_lang
        self.tgt_lang = tgt_lang
        self.tenant_id = tenant_id
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.session_id: str | None = None
        self.messages: list[dict[str, Any]] = []
        self.sent_at: dict[int, float] = {}
        self.latencies: list[float] = []
        self.utterances_sent = 0
        self._seq = 0
        self._waiters: list[tuple[Callable[[dict[str, Any]], bool], asyncio.Future[dict[str, Any]]]] = []
        self._reader_task: asyncio.Task[None] | None = None
        #: called whenever a message arrives (after it is recorded)
        self.on_arrival: Callable[[], None] | None = None

    async def connect(self) -> None:
        url, headers = self.url, {}
        if self.api_key is not None and self.api_key_via == "header":
            headers["Authorization"] = f"Bearer {self.api_key}"
        elif self.api_key is not None and self.api_key_via == "x-api-key":
            headers["X-Api-Key"] = self.api_key
        elif self.api_key is not None and self.api_key_via == "query":
            url = str(yarl.URL(url).update_query(api_key=self.api_key))
        self.ws = await self.http.ws_connect(url, headers=headers, max_msg_size=64 * 1024 * 1024)
        self._reader_task = asyncio.create_task(self._reader())

    async def init(self, **extra: Any) -> dict[str, Any]:
        waiter = self.wait_for(lambda m: m.get("type") in ("session_init_ack", "error"))
        await self.send(
            {
                "type": "session_init",
                "client_version": "sim-1.0",
                "platform": "web",
                "src_lang": self.src_lang,
                "tgt_lang": self.tgt_lang,
                "tenant_id": self.tenant_id,
                "api_key": self.api_key if self.api_key_via == "init" else None,
                "audio_format": "pcm16" if self.audio_format == "pcm16" else None,
                **extra,
            }
        )
        ack = await waiter
        if ack["type"] == "session_init_ack":
            self.session_id = ack["session_id"]
        return ack

    async def start(self) -> dict[str, Any]:
        await self.connect()
        return await self.init()

    async def send(self, msg: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send_str(_enc.encode({k: v for k, v in msg.items() if v is not None}).decode())

    async def chunk(self, payload: str | None = None, is_final: bool = False) -> None:
        self._seq += 1
        await self.send(
            {
                "type": "audio_chunk",
                "session_id": self.session_id,
                "seq": self._seq,
                "is_final": is_final,
                "payload": payload if payload is not None else self.default_chunk(),
                "client_timestamp_ms": int(time.time() * 1000),
            }
        )

    def default_chunk(self) -> str:
        """100 ms of audio in the session's format."""
        return pcm_chunk() if self.audio_format == "pcm16" else opus_chunk(100)

    async def speak(self, chunks: int = 3, gap: float = 0.0) -> int:
        """Stream one utterance of ``chunks`` chunks, the last flagged ``is_final``; returns its index."""
        index = self.utterances_sent
        for i in range(chunks):
            if i == chunks - 1:
                self.sent_at[index] = time.perf_counter()
            await self.chunk(is_final=i == chunks - 1)
            if gap:
                await asyncio.sleep(gap)
        self.utterances_sent += 1
        return index

    async def utterance(self, n_bytes: int = CHUNK_BYTES * 5) -> int:
        """Send one complete ``utterance`` message (``n_bytes`` of pcm16, or as many 20 ms Opus
        packets of 60 bytes); returns the index it should get."""
        index = self.utterances_sent
        self.sent_at[index] = time.perf_counter()
        await self.send(
            {
                "type": "utterance",
                "session_id": self.session_id,
                "utterance_index": index,
                "manual_cut": True,
                "src_lang": self.src_lang,
                "tgt_lang": self.tgt_lang,
                "audio": pcm_chunk(n_bytes)
                if self.audio_format == "pcm16"
                else base64.b64encode(opus_audio(max(20, n_bytes // 62 * 20))).decode(),
                "audio_format": self.audio_format,
                "sample_rate": 16000,
            }
        )
        self.utterances_sent += 1
        return index

    async def close(self, reason: str = "done", timeout: float = 30.0) -> dict[str, Any]:
        waiter = self.wait_for(lambda m: m.get("type") == "session_close_ack", timeout)
        await self.send({"type": "session_close", "session_id": self.session_id, "reason": reason})
        return await waiter

    def stop_reading(self) -> None:
        """The client hangs: nothing reads what the scheduler sends any more, while it can still send.
        Once the WebSocket client's buffer is full it stops reading the TCP connection, and the
        kernel buffers fill (backpressure tests)."""
        if self._reader_task is not None:
            self._reader_task.cancel()

    async def disconnect(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task
        if self.ws is not None:
            await self.ws.close()

    async def _reader(self) -> None:
        assert self.ws is not None
        async for frame in self.ws:
            if frame.type is not aiohttp.WSMsgType.TEXT:
                continue
            msg = _dec.decode(frame.data)
            self.messages.append(msg)
            if self.on_arrival is not None:
                self.on_arrival()
            if msg.get("type") == "translation_result":
                sent = self.sent_at.get(msg["utterance_index"])
                if sent is not None:
                    self.latencies.append(time.perf_counter() - sent)
            for pred, fut in list(self._waiters):
                if not fut.done() and pred(msg):
                    fut.set_result(msg)
                    self._waiters.remove((pred, fut))

    def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> asyncio.Future[dict[str, Any]]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.append((pred, fut))
        return asyncio.ensure_future(asyncio.wait_for(fut, timeout))

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == kind]

    def outcomes(self, speaker: str | None = None) -> dict[int, list[str]]:
        """Per utterance index, what ended it: 'result', 'missing:<reason>' (one entry each); of this
        session's own utterances, or (``speaker``) of another room member's."""
        out: dict[int, list[str]] = defaultdict(list)
        for m in self.messages:
            if m.get("speaker_session_id") != speaker:
                continue
            if m.get("type") == "translation_result":
                out[m["utterance_index"]].append("result")
            elif m.get("type") == "missing_result":
                out[m["utterance_index"]].append(f"missing:{m['reason']}")
        return dict(out)

    def settled(self) -> bool:
        """Every utterance sent has exactly one outcome."""
        outcomes = self.outcomes()
        return all(len(outcomes.get(i, ())) >= 1 for i in range(self.utterances_sent))


async def run_sessions(
    url: str,
    count: int,
    utterances: int,
    *,
    src_lang: str = "en",
    tgt_lang: str = "zh",
    pause: float = 0.2,
    report: Callable[[str], None] | None = None,
    api_key: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 10.0,
    room_size: int = 1,
    room_langs: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Drive ``count`` sessions each speaking ``utterances`` utterances; summarise what came back.

    ``room_size`` > 1: the opened sessions form rooms of that many members (the first creates it, the
    others join; member i asks for ``room_langs[i % len]``, default its target language) before they
    talk; the summary then also counts, per utterance, the results every other member of the room
    should hear (``room``: expected, heard, missing, unanswered).

    Each ``session_init`` is bounded by ``timeout``, and so is the wait for each session's close ack;
    the first session is opened alone, and if it cannot reach the scheduler at all ``Unreachable`` is
    raised with the reason. Refused sessions (their error code and message are counted) do not talk.
    The summary (also given to ``report`` as one JSON line) counts, per utterance sent, exactly one
    outcome: a result, a failure (``missing_result``, by reason), or nothing (unanswered)."""
    connector = aiohttp.TCPConnector(ssl=ssl_context if ssl_context is not None else True)
    async with aiohttp.ClientSession(connector=connector) as http:
        sessions = [
            SimulatedSession(http, url, src_lang=src_lang, tgt_lang=tgt_lang, api_key=api_key)
            for _ in range(count)
        ]
        tally = Tally()
        opened: list[SimulatedSession] = []
        lost = 0
        try:

            async def start(s: SimulatedSession, probe: bool = False) -> None:
                if await start_bounded(url, timeout, tally, s.start, probe=probe):
                    opened.append(s)
                else:
                    await s.disconnect()

            if sessions:
                await start(sessions[0], probe=True)
            await asyncio.gather(*(start(s) for s in sessions[1:]))
            rooms = await form_rooms(opened, room_size, room_langs, timeout) if room_size > 1 else []

            async def talk(s: SimulatedSession, close: bool) -> None:
                nonlocal lost
                try:
                    for _ in range(utterances):
                        await s.speak()
                        await asyncio.sleep(pause)
                    if close:
                        await s.close(timeout=timeout)
                except TimeoutError:
                    pass  # no close ack in time: what is missing shows as unanswered
                except (ConnectionError, RuntimeError, aiohttp.ClientError):
                    lost += 1  # the scheduler closed the connection mid-session

            # A room member stays until the others' outcomes reached it (closing leaves the room).
            await asyncio.gather(*(talk(s, close=not rooms) for s in opened))
            if rooms:
                await heard_all(rooms, timeout)

                async def close(s: SimulatedSession) -> None:
                    nonlocal lost
                    try:
                        await s.close(timeout=timeout)
                    except TimeoutError:
                        pass
                    except (ConnectionError, RuntimeError, aiohttp.ClientError):
                        lost += 1

                await asyncio.gather(*(close(s) for s in opened))
            summary: dict[str, Any] = {
                "url": safe_url(url),
                "sessions": count,
                **tally.as_dict("opened"),
                "connections_lost": lost,
                "utterances": sum(s.utterances_sent for s in opened),
                "results": 0,
                "failures": 0,
                "failure_reasons": {},
                "unanswered": 0,
                "duplicates": 0,
                "error_codes": {},
            }
            if rooms:
                summary["room"] = room_tally(rooms)
            for s in opened:
                outcomes = s.outcomes()
                for i in range(s.utterances_sent):
                    got = outcomes.get(i, [])
                    if not got:
                        summary["unanswered"] += 1
                    elif len(got) > 1:
                        summary["duplicates"] += 1
                    elif got[0] == "result":
                        summary["results"] += 1
                    else:
                        summary["failures"] += 1
                        reason = got[0].removeprefix("missing:")
                        summary["failure_reasons"][reason] = summary["failure_reasons"].get(reason, 0) + 1
                for m in s.of_type("error"):
                    code = str(m.get("code"))
                    summary["error_codes"][code] = summary["error_codes"].get(code, 0) + 1
            if report:
                report(json.dumps(summary))
            return summary
        finally:
            await asyncio.gather(*(s.disconnect() for s in sessions), return_exceptions=True)


async def form_rooms(
    opened: list[SimulatedSession], size: int, langs: tuple[str, ...], timeout: float
) -> list[list[SimulatedSession]]:
    """Group ``opened`` into rooms of ``size`` (the last one may be smaller): the first member creates
    the room, the others join it. Rooms whose creation or join was refused are left out."""
    rooms: list[list[SimulatedSession]] = []

    async def one(members: list[SimulatedSession]) -> None:
        def lang(i: int, s: SimulatedSession) -> str:
            return langs[i % len(langs)] if langs else s.tgt_lang

        head = members[0]
        acked = head.wait_for(lambda m: m.get("type") in ("room_create_ack", "room_error"), timeout)
        await head.send({"type": "room_create", "client_ts": 0, "preferred_lang": lang(0, head)})
        ack = await acked
        if ack["type"] != "room_create_ack":
            return
        joined = [head]
        for i, s in enumerate(members[1:], 1):
            answer = s.wait_for(lambda m: m.get("type") in ("room_members", "room_error"), timeout)
            await s.send({"type": "room_join", "room_code": ack["room_code"], "preferred_lang": lang(i, s)})
            if (await answer)["type"] == "room_members":
                joined.append(s)
        rooms.append(joined)

    groups = [opened[i : i + size] for i in range(0, len(opened), size)]
    await asyncio.gather(*(one(g) for g in groups if len(g) > 1), return_exceptions=True)
    return rooms


async def heard_all(rooms: list[list[SimulatedSession]], timeout: float) -> None:
    """Until every member heard every other one's utterances (or ``timeout``): re-checked whenever a
    member receives a message."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    members = [s for room in rooms for s in room]
    arrived = asyncio.Event()
    for s in members:
        s.on_arrival = arrived.set
    while room_tally(rooms)["unanswered"] and (left := deadline - loop.time()) > 0:
        arrived.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(arrived.wait(), left)


def room_tally(rooms: list[list[SimulatedSession]]) -> dict[str, Any]:
    """Per utterance of a room member, each other member of its room should hear one outcome."""
    out = {
        "rooms": len(rooms),
        "members": sum(len(r) for r in rooms),
        "expected": 0,
        "heard": 0,
        "missing": 0,
        "unanswered": 0,
        "duplicates": 0,
    }
    for room in rooms:
        for speaker in room:
            for listener in room:
                if listener is speaker or speaker.session_id is None:
                    continue
                got = listener.outcomes(speaker.session_id)
                for i in range(speaker.utterances_sent):
                    out["expected"] += 1
                    entries = got.get(i, [])
                    if not entries:
                        out["unanswered"] += 1
                    elif len(entries) > 1:
                        out["duplicates"] += 1
                    elif entries[0] == "result":
                        out["heard"] += 1
                    else:
                        out["missing"] += 1
    return out
