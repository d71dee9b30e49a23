"""Utterance groups: which results of a session belong to one exchange (``group_id``, ``part_index``).

Owns: one session's active group. A result with recognised text joins the active group as its next
part, unless the group is older than ``GROUP_WINDOW_MS`` since it was created or since the client last
reported the end of a TTS playback (``tts_play_ended``); then a new group starts, its parts counted
from 0. The id is ``group_<session_id>_<wall ms>``, as the reference client expects. The client plays a
group's speech and reports ``tts_started`` / ``tts_play_ended`` only for results carrying a group.

The window is measured on the scheduler's monotonic clock (the moment ``tts_play_ended`` arrived, not
the client's ``ts_end_ms``: the client's clock may be skewed against ours); the wall clock only names
the group, since the client reads the id as a timestamp.

Must never: hold more than the active group, or know about sockets and messages.
"""

from __future__ import annotations

from dataclasses import dataclass

#: a group takes new parts this long after its creation or its last reported playback end
GROUP_WINDOW_MS = 2000


@dataclass(slots=True)
class _Group:
    group_id: str
    last_activity_ms: int
    next_part: int = 0


class GroupTracker:
    """The utterance groups of one session."""

    def __init__(self, session_id: str, window_ms: int = GROUP_WINDOW_MS) -> None:
        self._session_id = session_id
        self._window = window_ms
        self._active: _Group | None = None

    @property
    def active_group(self) -> str | None:
        return self._active.group_id if self._active is not None else None

    def part(self, now_ms: int, wall_ms: int | None = None) -> tuple[str, int]:
        """A result with recognised text at monotonic ``now_ms``: its ``(group_id, part_index)``. A new
        group is named after ``wall_ms`` (default ``now_ms``)."""
        group = self._active
        if group is None or now_ms - group.last_activity_ms > self._window:
            name = now_ms if wall_ms is None else wall_ms
            group = self._active = _Group(f"group_{self._session_id}_{name}", now_ms)
        index = group.next_part
        group.next_part += 1
        return group.group_id, index

    def playback_ended(self, group_id: str, now_ms: int) -> bool:
        """The client finished playing ``group_id``'s speech at monotonic ``now_ms``: the group stays
        open a window from now.
        False (nothing changes) for a group that is not the active one."""
        group = self._active
        if group is None or group.group_id != group_id:
            return False
        group.last_activity_ms = max(group.last_activity_ms, now_ms)
        return True
