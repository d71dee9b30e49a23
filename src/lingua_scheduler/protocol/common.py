"""Value types shared by the node and session protocols: the wire's enumerations and nested types."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import msgspec

#: an integer a peer may set freely (timestamps, timings, counts): bounded to what a JavaScript client
#: reads exactly (2^53). Unbounded, msgspec would accept integers of thousands of digits.
SafeInt = Annotated[int, msgspec.Meta(ge=-(2**53), le=2**53)]


class ServiceType(StrEnum):
    ASR = "asr"
    NMT = "nmt"
    TTS = "tts"
    TONE = "tone"
    SEMANTIC = "semantic"


CORE_SERVICE_TYPES: frozenset[ServiceType] = frozenset({ServiceType.ASR, ServiceType.NMT, ServiceType.TTS})


class DeviceType(StrEnum):
    GPU = "gpu"
    CPU = "cpu"


class ServiceStatus(StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"
    ERROR = "error"


class Struct(msgspec.Struct, omit_defaults=True, gc=False):
    """Base of every wire message: optional fields left at their default are not serialised.

    ``gc=False``: wire structs never form reference cycles, and the registry keeps many of them alive,
    so keeping them out of the cyclic garbage collector shortens its full collections."""


class FrozenStruct(msgspec.Struct, omit_defaults=True, frozen=True, gc=False):
    """Base of immutable wire values (compared by value, hashable)."""


class FeatureFlags(FrozenStruct, frozen=True):
    emotion_detection: bool | None = None
    voice_style_detection: bool | None = None
    speech_rate_detection: bool | None = None
    speech_rate_control: bool | None = None
    speaker_identification: bool | None = None
    persona_adaptation: bool | None = None

    def enabled(self) -> frozenset[str]:
        return frozenset(f for f in self.__struct_fields__ if getattr(self, f) is True)


class ServiceTimings(FrozenStruct, frozen=True):
    asr_ms: SafeInt | None = None
    nmt_ms: SafeInt | None = None
    tts_ms: SafeInt | None = None
    total_ms: SafeInt | None = None


class ExtraResult(FrozenStruct, frozen=True):
    emotion: str | None = None
    speech_rate: float | None = None
    voice_style: str | None = None
    service_timings: ServiceTimings | None = None
    language_probability: float | None = None
    language_probabilities: dict[str, float] | None = None
    reason: str | None = None


class SegmentsMeta(FrozenStruct, frozen=True):
    count: SafeInt | None = None
    max_gap: float | None = None
    avg_duration: float | None = None


class JobError(FrozenStruct, frozen=True):
    code: str
    message: str
    details: Any = None


class ErrorMessage(Struct, tag="error", tag_field="type"):
    """``error`` frame sent to nodes and sessions: a code and a message naming what was wrong."""

    code: str
    message: str
    details: Any = None
