"""The delivery of a room member's fan-out: the engine's ``SendToRoomGroup`` actions carried out.

Owns the last step of the fan-out and its figures. The engine (core/engine.py with core/fanout.py)
decides which jobs a member's utterance gets, which group each outcome is for and what the group's
members see; this relay resolves the group to the members still in the planned room when the outcome
is released (``RoomDirectory.recipients``: a member that left is dropped), encodes the message once and
sends it to each of them, here or, in multi-instance mode, through the inbox of the instance they are
connected to. It also keeps the fan-out counters: jobs created for rooms' utterances, and the overhead
of each fanned-out utterance (its frame's arrival to the last of its groups' ``job_assign``).

Must never: decide a recipient the plan does not name, send to the speaker (its copy goes through its
own session), or log text.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from lingua_scheduler.core.rooms import FanoutPlan
from lingua_scheduler.protocol.session import MissingResult, TranslationResult
from lingua_scheduler.server.latency import LatencyWindow
from lingua_scheduler.server.room_directory import RoomDirectory

#: sends an encoded message, already in its receiver's view, to a member by session id
Send = Callable[[str, bytes], None]


class RoomRelay:
    __slots__ = ("_encoder", "_rooms", "_send", "fanout_jobs", "fanout_window")

    def __init__(self, rooms: RoomDirectory, send: Send) -> None:
        self._rooms = rooms
        self._send = send
        #: per fan-out utterance: its arrival to the last of its jobs' job_assign written (seconds)
        self.fanout_window = LatencyWindow(65536)
        self._encoder = msgspec.json.Encoder()
        #: jobs created for rooms' utterances since start
        self.fanout_jobs = 0

    def send_group(self, plan: FanoutPlan, group: int, message: TranslationResult | MissingResult) -> None:
        """``message`` to the members of ``group`` still in the planned room (never the speaker)."""
        members = [m for m in self._rooms.recipients(plan, group) if m != plan.speaker]
        if not members:
            return
        data = self._encoder.encode(message)
        for member in members:
            self._send(member, data)
