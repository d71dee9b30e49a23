"""Value types shared by the node and session protocols: the wire's enumerations and nested types."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import msgspec

#: an integer a peer may set freely (timestamps, timings, counts): bounded to what a JavaScript client
#: reads exactly (2^53). Unbounded, msgspec would accept integers of thousands of digits.
SafeInt = Annotated[int, msgspec.Meta(ge=-(2**53), le=2**53)]
#: most entries, longest key and longest value of a job's ``metadata``
MAX_METADATA_ENTRIES = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 256
#: an integrator's per-job metadata (domain, glossary id, customer reference, ...): string to string,
#: bounded (at most 16 entries of a 64-character key and a 256-character value), passed through as is
Metadata = Annotated[
    dict[
        Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_METADATA_KEY)],
        Annotated[str, msgspec.Meta(max_length=MAX_METADATA_VALUE)],
    ],
    msgspec.Meta(max_length=MAX_METADATA_ENTRIES),
]


def doc(text: str) -> msgspec.Meta:
    """A field's meaning, carried into the protocol documents generated from these types
    (``protocol/asyncapi.py``); decoding is unaffected."""
    return msgspec.Meta(description=text)


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
    """Optional features: on a node what it supports, on a session or job what is asked for. A feature
    is on only when its value is true; absent, null and false mean off."""

    emotion_detection: Annotated[bool | None, doc("detect the speaker's emotion")] = None
    voice_style_detection: Annotated[bool | None, doc("detect the voice style")] = None
    speech_rate_detection: Annotated[bool | None, doc("measure the speech rate")] = None
    speech_rate_control: Annotated[bool | None, doc("match the synthesized speech rate")] = None
    speaker_identification: Annotated[bool | None, doc("tell speakers apart")] = None
    persona_adaptation: Annotated[bool | None, doc("adapt the synthesized voice to a persona")] = None

    def enabled(self) -> frozenset[str]:
        return frozenset(f for f in self.__struct_fields__ if getattr(self, f) is True)


class ServiceTimings(FrozenStruct, frozen=True):
    """How long each stage of a job took on the node, in milliseconds."""

    asr_ms: Annotated[SafeInt | None, doc("speech recognition")] = None
    nmt_ms: Annotated[SafeInt | None, doc("translation")] = None
    tts_ms: Annotated[SafeInt | None, doc("speech synthesis")] = None
    total_ms: Annotated[SafeInt | None, doc("the whole job")] = None


class ExtraResult(FrozenStruct, frozen=True):
    """What a node found beyond the text: passed on to the client unchanged."""

    emotion: Annotated[str | None, doc("detected emotion (emotion_detection)")] = None
    speech_rate: Annotated[float | None, doc("measured speech rate (speech_rate_detection)")] = None
    voice_style: Annotated[str | None, doc("detected voice style (voice_style_detection)")] = None
    service_timings: Annotated[ServiceTimings | None, doc("per-stage timings on the node")] = None
    language_probability: Annotated[float | None, doc("confidence of the detected source language")] = None
    language_probabilities: Annotated[
        dict[str, float] | None, doc("confidence per candidate source language, by language code")
    ] = None
    reason: Annotated[str | None, doc("why the result is as it is (a node's own words, e.g. empty text)")] = (
        None
    )


class SegmentsMeta(FrozenStruct, frozen=True):
    """How the node's recognizer segmented the audio (passed on to the client unchanged)."""

    count: Annotated[SafeInt | None, doc("number of recognized segments")] = None
    max_gap: Annotated[float | None, doc("longest gap between segments, in seconds")] = None
    avg_duration: Annotated[float | None, doc("mean segment duration, in seconds")] = None


class JobError(FrozenStruct, frozen=True):
    """Why a node could not do a job. A ``code`` among the scheduler's error codes is acted on (model
    and capacity codes move the job to another node); any other string is passed on as is."""

    code: Annotated[str, doc("an error code (see the error codes of this document) or the node's own")]
    message: Annotated[str, doc("what went wrong, in words")]
    details: Annotated[Any, doc("anything else the node reports (passed on, never interpreted)")] = None


class ErrorMessage(Struct, tag="error", tag_field="type"):
    """``error`` frame sent to nodes and sessions: a code and a message naming what was wrong."""

    code: Annotated[str, doc("one of the error codes of this document")]
    message: Annotated[str, doc("what was wrong, in words (for people: do not parse it)")]
    details: Annotated[
        Any,
        doc(
            "with INVALID_MESSAGE and MESSAGE_TOO_LARGE: ``reason`` (one of the reasons of this document), "
            "``field`` (the path of the value at fault, ``$`` for the whole frame) and ``expected`` (what "
            "would have been accepted) when known; for a failed job (sessions): ``job_id`` and "
            "``utterance_index``; omitted otherwise"
        ),
    ] = None
