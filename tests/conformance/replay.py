"""Replays a recorded scenario against a real scheduler process and keeps what each client saw.

The scheduler is ``python -m lingua_scheduler serve`` with its default configuration plus the
scenario's recorded ``config_env``. The web client's frames are sent again with their recorded timing
(relative to the scheduler's start), the ids the scheduler assigns replacing the recorded ones and the
audio rebuilt to the recorded shape. The node's register and heartbeats are replayed the same way; its
answers to ``job_assign`` are emulated (:class:`RecordedNode`), since they depend on what the scheduler
sends. ``scheduler_kill`` / a later ``scheduler_started`` kill (SIGKILL or SIGTERM, as recorded) and
restart the process on the same port; the clients reconnect at their recorded times, retrying while
the port is still closed, as the real apps do.

Emulated web-client reactions (the only ones): at the head client's ``play`` command it sends
``tts_started`` then ``tts_play_ended`` for each received translation that carries a ``group_id`` (the
real client does this around playing that audio); nothing else is sent that the recording did not send.
The one change to a recorded frame besides ids, clocks and audio: a head node's ``capability_by_type``
lists all seven service types, as a real head node's service discovery does (the recording stubbed it).
Ids are mapped across clients too (a client naming another one's session, as a WebRTC relay does), and
a room code the recording used without any recorded ``room_create_ack`` (the recording harness's
placeholder: the recorded scheduler created no room) means the room the replay's ``room_create_ack``
gave.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tests.conformance.plan_a import SpeechWriter, listen
from tests.conformance.recording import AnswerTemplate, NodeTiming, Scenario, load
from tests.scheduler_process import SchedulerProcess

#: node frames that answer the scheduler; the emulation sends them, never the replay
REACTIVE_NODE_FRAMES = {"job_result", "asr_partial", "job_ack", "job_started"}
#: every type a head node's service discovery lists in capability_by_type (the recordings stubbed
#: discovery and kept four; the replay lists the others as a real head node does: not ready, no impl)
HEAD_SERVICE_TYPES = ("asr", "nmt", "tts", "tone", "semantic", "phonetic", "punctuation")
#: in a scenario of ours (never in a recording): "the resume token of the last session_init_ack"
RESUME_TOKEN = "<resume_token>"
#: fields holding the sender's wall clock: the real apps put Date.now() there
CLOCK_FIELDS = {"timestamp", "ts_start_ms", "ts_end_ms"}
RECONNECT_FOR_S = 20.0
#: after the last recorded event, how long unanswered sentences may still arrive (a client that
#: closed its socket in the recording gets nothing after that close)
DRAIN_S = 15.0
#: after the last recorded event, how long the answers to the last frames may take to arrive
SETTLE_S = 1.0


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Frame:
    t_ms: int
    who: str
    dir: str
    msg: dict[str, Any]


@dataclass
class Transcript:
    """Everything one replay observed, in order, with times relative to the first scheduler start."""

    scenario: str
    frames: list[Frame] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: (t_ms, who, sentence number) of each spoken sentence
    spoken: list[tuple[int, str, int]] = field(default_factory=list)
    error: str | None = None
    scheduler_log: str = ""
    #: set whenever a translation_result arrives
    translated: asyncio.Event = field(default_factory=asyncio.Event)
    #: recorded id -> ours, of every client (a client may name another one's session)
    shared_ids: dict[str, str] = field(default_factory=dict)

    def received(self, who: str, type_: str | None = None) -> list[Frame]:
        return [
            f
            for f in self.frames
            if f.who == who and f.dir == "recv" and (type_ is None or f.msg.get("type") == type_)
        ]

    def sent(self, who: str, type_: str | None = None) -> list[Frame]:
        return [
            f
            for f in self.frames
            if f.who == who and f.dir == "send" and (type_ is None or f.msg.get("type") == type_)
        ]


class Clock:
    def __init__(self) -> None:
        self.start = time.monotonic()
        #: how much later than recorded the replay runs (a restart that took longer than recorded)
        self.lag_ms = 0

    def ms(self) -> int:
        return int((time.monotonic() - self.start) * 1000)

    async def until(self, t_ms: int) -> None:
        delay = (t_ms + self.lag_ms - self.ms()) / 1000
        if delay > 0:
            await asyncio.sleep(delay)


def _substitute(value: Any, ids: dict[str, str]) -> Any:
    if isinstance(value, str):
        return ids.get(value, value)
    if isinstance(value, list):
        return [_substitute(v, ids) for v in value]
    if isinstance(value, dict):
        return {k: (now_ms() if k in CLOCK_FIELDS else _substitute(v, ids)) for k, v in value.items()}
    return value


def _placeholder_room_codes(scenario: Scenario) -> set[str]:
    """Room codes the recording's clients sent that no recorded ``room_create_ack`` gave."""
    given = {
        str(e["msg"].get("room_code"))
        for e in scenario.events
        if e.get("dir") == "recv" and e["msg"].get("type") == "room_create_ack"
    }
    sent = {
        str(e["msg"]["room_code"])
        for e in scenario.events
        if e.get("dir") == "send" and isinstance(e.get("msg"), dict) and "room_code" in e["msg"]
    }
    return sent - given


class Actor:
    """One recorded client connection (it may reconnect); records every frame it sends and receives."""

    def __init__(self, who: str, scenario: Scenario, transcript: Transcript, clock: Clock) -> None:
        self.who = who
        self.scenario = scenario
        self.transcript = transcript
        self.clock = clock
        self.version = scenario.versions.get(who, "")
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.reader: asyncio.Task[None] | None = None
        self.ids: dict[str, str] = {}
        self.recorded_ids = self._recorded_ids()
        self.acks = 0
        self.closed_by_client = False
        #: the last session_init_ack's resume_token (scenarios of ours resume with it)
        self.resume_token: str | None = None

    def _recorded_ids(self) -> list[str]:
        """The ids the recorded scheduler handed out, in order, to map onto the ones ours hands out."""
        out: list[str] = []
        for e in self.scenario.events:
            if e["who"] == self.who and e.get("dir") == "recv":
                m = e["msg"]
                if m.get("type") == "session_init_ack":
                    out.append(m["session_id"])
                elif m.get("type") == "node_register_ack":
                    out.append(m["node_id"])
        return out

    def url(self, sched: SchedulerProcess) -> str:
        return sched.session_url if self.who.startswith("web") else sched.node_url

    async def connect(self, http: aiohttp.ClientSession, sched: SchedulerProcess) -> None:
        await self.close()
        self.closed_by_client = False
        deadline = time.monotonic() + RECONNECT_FOR_S
        while True:
            try:
                self.ws = await http.ws_connect(self.url(sched), max_msg_size=0, autoping=True)
                break
            except (aiohttp.ClientError, OSError) as exc:
                if time.monotonic() > deadline:
                    self.note(f"could not connect: {exc!r}")
                    return
                await asyncio.sleep(0.5)
        self.reader = asyncio.create_task(self._read(self.ws))

    def note(self, text: str) -> None:
        self.transcript.notes.append(f"{self.clock.ms()} {self.who}: {text}")

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for raw in ws:
            if raw.type == aiohttp.WSMsgType.TEXT:
                try:
                    msg = json.loads(raw.data)
                except ValueError:
                    msg = {"type": "<not json>"}
            elif raw.type == aiohttp.WSMsgType.BINARY:
                msg = {"type": "<binary>", "size": len(raw.data)}
            else:
                continue
            if not isinstance(msg, dict):
                msg = {"type": "<not an object>"}
            self.transcript.frames.append(Frame(self.clock.ms(), self.who, "recv", msg))
            if msg.get("type") == "translation_result":
                self.transcript.translated.set()
            await self.on_message(msg)
        if not self.closed_by_client:
            self.note(f"connection closed by the scheduler (code {ws.close_code})")

    async def on_message(self, msg: dict[str, Any]) -> None:
        if msg.get("type") == "room_create_ack":
            for code in _placeholder_room_codes(self.scenario):
                self.transcript.shared_ids.setdefault(code, str(msg.get("room_code")))
        if msg.get("type") == "session_init_ack" and msg.get("resume_token"):
            self.resume_token = str(msg["resume_token"])
        if msg.get("type") in ("session_init_ack", "node_register_ack"):
            new = str(msg.get("session_id") or msg.get("node_id"))
            if self.acks < len(self.recorded_ids):
                self.ids[self.recorded_ids[self.acks]] = new
                self.transcript.shared_ids[self.recorded_ids[self.acks]] = new
            # a later reconnect that sends the recorded (persisted) id means this one
            for old in self.recorded_ids:
                self.ids.setdefault(old, new)
            self.acks += 1

    async def send(self, msg: dict[str, Any]) -> bool:
        ws = self.ws
        if ws is None or ws.closed:
            self.note(f"not connected: {msg.get('type')} not sent")
            return False
        try:
            await ws.send_str(json.dumps(msg, ensure_ascii=False))
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
            self.note(f"send {msg.get('type')} failed: {exc!r}")
            return False
        self.transcript.frames.append(Frame(self.clock.ms(), self.who, "send", msg))
        return True

    async def replay(self, event_index: int, msg: dict[str, Any]) -> None:
        out = _substitute(msg, {**self.transcript.shared_ids, **self.ids})
        if out.get("resume_token") == RESUME_TOKEN:
            out["resume_token"] = self.resume_token
        payload = self.scenario.payloads.get(event_index)
        if payload is not None:
            out["payload" if out.get("type") == "audio_chunk" else "audio"] = payload
        caps = out.get("capability_by_type")
        if self.version == "head" and isinstance(caps, list):
            listed = {c.get("type") for c in caps if isinstance(c, dict)}
            caps += [
                {"type": t, "ready": False, "reason": "no_impl"}
                for t in HEAD_SERVICE_TYPES
                if t not in listed
            ]
        await self.send(out)

    async def close(self) -> None:
        self.closed_by_client = True
        if self.ws is not None and not self.ws.closed:
            await self.ws.close()
        if self.reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.reader, 5)
        self.ws = None
        self.reader = None


class WebClient(Actor):
    async def play(self) -> None:
        """The head client's playback: tts_started / tts_play_ended for results carrying a group_id."""
        if self.version != "head":
            return
        for f in self.transcript.received(self.who, "translation_result"):
            group = f.msg.get("group_id")
            if not group or not f.msg.get("tts_audio") or f.msg.get("_played"):
                continue
            f.msg["_played"] = True
            base = {
                "session_id": f.msg.get("session_id"),
                "trace_id": f.msg.get("trace_id"),
                "group_id": group,
            }
            await self.send({"type": "tts_started", **base, "ts_start_ms": now_ms()})
            await asyncio.sleep(1.0)
            await self.send({"type": "tts_play_ended", **base, "ts_end_ms": now_ms()})


class RecordedNode(Actor):
    """Answers job_assign the way the recorded node app did.

    Never sends job_ack or job_started. A 74 node spends ``first_job_ms`` before its first job,
    refuses a job whose ``audio_format`` is not opus, and ignores a job_id it has seen; a head node
    refuses a repeated job_id or (session, utterance_index) and decodes a non-opus label as that format
    (it hears noise: empty ASR). Jobs share one GPU lease; a job waiting longer than the lease timeout
    is refused. job_cancel is ignored (the recorded node finished cancelled jobs anyway).
    """

    def __init__(self, who: str, scenario: Scenario, transcript: Transcript, clock: Clock) -> None:
        super().__init__(who, scenario, transcript, clock)
        self.template: AnswerTemplate = scenario.templates[who]
        self.timing: NodeTiming = scenario.timing[who]
        self.gpu = asyncio.Lock()
        self.seen_jobs: set[str] = set()
        self.seen_utterances: set[tuple[str, int]] = set()
        self.started_jobs = 0
        self.jobs: set[asyncio.Task[None]] = set()
        self._tts = base64.b64encode(SpeechWriter(255).chunk(self.template.tts_shape)).decode()

    async def on_message(self, msg: dict[str, Any]) -> None:
        await super().on_message(msg)
        if msg.get("type") == "job_assign":
            task = asyncio.create_task(self._job(msg))
            self.jobs.add(task)
            task.add_done_callback(self.jobs.discard)

    @property
    def node_id(self) -> str:
        return next(iter(self.ids.values()), "")

    def _result(self, job: dict[str, Any], started: float, **fields: Any) -> dict[str, Any]:
        return {
            "type": "job_result",
            "job_id": job.get("job_id"),
            "attempt_id": job.get("attempt_id"),
            "node_id": self.node_id,
            "session_id": job.get("session_id"),
            "utterance_index": job.get("utterance_index"),
            **fields,
            "processing_time_ms": int((time.monotonic() - started) * 1000),
            "trace_id": job.get("trace_id"),
        }

    def _error(self, job: dict[str, Any], started: float, message: str) -> dict[str, Any]:
        return self._result(
            job, started, success=False, error={"code": "PROCESSING_ERROR", "message": message}
        )

    def hear(self, audio_b64: str) -> str:
        """The "ASR": the part of each spoken sentence whose packets the job's audio holds."""
        try:
            raw = base64.b64decode(audio_b64, validate=True)
        except ValueError:
            return ""
        heard = listen(raw)
        by_sentence: dict[int, set[int]] = {}
        for sentence, packet in heard.speech:
            if sentence < len(self.scenario.sentences):
                by_sentence.setdefault(sentence, set()).add(packet)
        parts: list[str] = []
        for sentence in sorted(by_sentence):
            text = self.scenario.sentences[sentence]
            total = self.scenario.sentence_packets[sentence]
            got = by_sentence[sentence]
            if len(got) >= total:
                parts.append(text)
                continue
            lo = min(got) * len(text) // total
            hi = max(lo + 1, -(-(max(got) + 1) * len(text) // total))
            parts.append(text[lo:hi])
        return " ".join(parts)

    async def _job(self, job: dict[str, Any]) -> None:
        started = time.monotonic()
        job_id = str(job.get("job_id"))
        utterance = (str(job.get("session_id")), int(job.get("utterance_index") or 0))
        if job_id in self.seen_jobs or (self.version == "head" and utterance in self.seen_utterances):
            if self.version == "head":
                await self.send(self._error(job, started, "duplicate job: already processed"))
            return
        self.seen_jobs.add(job_id)
        self.seen_utterances.add(utterance)
        self.started_jobs += 1
        if self.started_jobs == 1 and self.timing.first_job_ms:
            await asyncio.sleep(self.timing.first_job_ms / 1000)
        audio_format = job.get("audio_format") or "opus"
        if self.version == "74" and audio_format != "opus":
            message = (
                f"Audio format must be 'opus', but received '{audio_format}'. "
                "Three-end communication only uses Opus format."
            )
            await self.send(self._error(job, started, message))
            return
        try:
            await asyncio.wait_for(self.gpu.acquire(), self.timing.lease_timeout_ms / 1000)
        except TimeoutError:
            await self.send(self._error(job, started, "GPU lease skipped: TIMEOUT"))
            return
        try:
            text = self.hear(str(job.get("audio") or "")) if audio_format == "opus" else ""
            if text and job.get("enable_streaming_asr"):
                await self.send(
                    {
                        "type": "asr_partial",
                        "job_id": job_id,
                        "node_id": self.node_id,
                        "session_id": job.get("session_id"),
                        "utterance_index": job.get("utterance_index"),
                        "text": text[: max(1, len(text) // 2)],
                        "is_final": False,
                        "trace_id": job.get("trace_id"),
                    }
                )
            await asyncio.sleep((self.timing.speech_ms if text else self.timing.empty_ms) / 1000)
        finally:
            self.gpu.release()
        t = self.template
        if text:
            src, tgt = job.get("src_lang"), job.get("tgt_lang")
            fields: dict[str, Any] = {
                "success": True,
                "text_asr": text,
                "text_translated": f"[{src}->{tgt}] {text}",
                "tts_audio": self._tts,
                "tts_format": t.tts_format,
                "extra": dict(t.speech_extra),
                **t.speech_more,
            }
        else:
            fields = {
                "success": True,
                "text_asr": "",
                "text_translated": "",
                "tts_audio": "",
                "tts_format": t.tts_format,
                "extra": dict(t.empty_extra),
            }
        await self.send(self._result(job, started, **fields))

    async def close(self) -> None:
        await super().close()


def _make_actor(who: str, sc: Scenario, tr: Transcript, clock: Clock) -> Actor:
    if who.startswith("node"):
        return RecordedNode(who, sc, tr, clock)
    return WebClient(who, sc, tr, clock)


async def _stop(sched: SchedulerProcess, sig: signal.Signals) -> None:
    if sched.proc is None or sched.proc.poll() is not None:
        return
    if sig == signal.SIGKILL:
        sched.proc.kill()
    else:
        sched.signal(sig)
    with contextlib.suppress(AssertionError):
        await sched.wait_exit(30)
    if sched.proc.poll() is None:
        sched.proc.kill()


def _all_translated(sc: Scenario, tr: Transcript) -> bool:
    texts = [str(f.msg.get("text_asr") or "") for f in tr.frames if f.msg.get("type") == "translation_result"]
    return all(any(s in t for t in texts) for s in sc.sentences)


async def replay(sc: Scenario, *, ready_timeout: float = 60.0) -> Transcript:
    """Run one scenario from its recording; never raises (a harness failure lands in ``error``)."""
    tr = Transcript(sc.name)
    sched = SchedulerProcess()
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    clock = Clock()
    actors = {who: _make_actor(who, sc, tr, clock) for who in sc.actors()}
    try:
        await _start(sched, sc, http, ready_timeout)
        clock.start = time.monotonic()
        for i, e in enumerate(sc.events):
            t = int(e["t_ms"])
            if i == 0:
                continue
            await clock.until(t)
            who = e["who"]
            if who == "harness":
                if e.get("ev") == "scheduler_kill":
                    tr.notes.append(f"{clock.ms()} harness: scheduler stopped with {sc.kill_signal.name}")
                    await _stop(sched, sc.kill_signal)
                elif e.get("ev") == "scheduler_started":
                    await _start(sched, sc, http, ready_timeout)
                    clock.lag_ms = max(clock.lag_ms, clock.ms() - t)
                    tr.notes.append(f"{clock.ms()} harness: scheduler restarted")
                continue
            actor = actors[who]
            ev = e.get("ev")
            if ev == "ws_open":
                await actor.connect(http, sched)
            elif ev == "ws_close" and e.get("code") == 1000:
                await actor.close()
            elif ev == "cmd" and e.get("cmd") in ("speak", "utterance"):
                tr.spoken.append((clock.ms(), who, len(tr.spoken)))
            elif ev == "cmd" and e.get("cmd") == "play" and isinstance(actor, WebClient):
                await actor.play()
            elif e.get("dir") == "send":
                msg = e["msg"]
                if who.startswith("node") and msg.get("type") in REACTIVE_NODE_FRAMES:
                    continue
                await actor.replay(i, msg)
        await asyncio.sleep(SETTLE_S)  # the answers to the last frames sent
        deadline = time.monotonic() + DRAIN_S
        while not _all_translated(sc, tr) and (remaining := deadline - time.monotonic()) > 0:
            tr.translated.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(tr.translated.wait(), remaining)
    except Exception as exc:
        tr.error = f"harness: {exc!r}"
    finally:
        for actor in actors.values():
            with contextlib.suppress(Exception):
                await actor.close()
        tr.scheduler_log = sched.log_tail(60)
        sched.close()
        await http.close()
    return tr


async def _start(sched: SchedulerProcess, sc: Scenario, http: aiohttp.ClientSession, timeout: float) -> None:
    """Start (or restart, same port) the scheduler process: default configuration + config_env."""
    sched.extra_env = dict(sc.config_env)
    sched.start()
    await sched.wait_ready(http, timeout)


async def replay_all(names: list[str], *, timeout_s: float = 240.0) -> dict[str, Transcript]:
    """Every named scenario at once, each against its own scheduler, each bounded by ``timeout_s``."""

    async def one(name: str) -> Transcript:
        sc = load(name)
        try:
            return await asyncio.wait_for(replay(sc), timeout_s + sc.duration_ms / 1000)
        except TimeoutError:
            tr = Transcript(name)
            tr.error = f"harness: replay did not finish in {timeout_s + sc.duration_ms / 1000:.0f} s"
            return tr

    results = await asyncio.gather(*(one(n) for n in names))
    return dict(zip(names, results, strict=True))


__all__ = ["Frame", "RecordedNode", "Transcript", "WebClient", "replay", "replay_all"]
