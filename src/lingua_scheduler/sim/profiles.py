"""Realistic node capability mixes for simulated fleets (deterministic for a given seed)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from lingua_scheduler.protocol.common import DeviceType, FeatureFlags, ServiceStatus, ServiceType
from lingua_scheduler.protocol.node import (
    FEATURE_JOB_ACK,
    FEATURE_TURN_JOBS,
    CapabilityByType,
    GpuInfo,
    HardwareInfo,
    InstalledService,
    LanguagePair,
    NmtCapability,
    NodeLanguageCapabilities,
    NodeRegister,
)

LANGUAGES = ("en", "zh", "de", "fr", "es", "ja", "ko", "ru", "pt", "it")
GPUS = (("NVIDIA RTX 4090", 24.0), ("NVIDIA RTX 3060", 12.0), ("NVIDIA A10", 24.0), ("NVIDIA T4", 15.8))


@dataclass(slots=True)
class NodeProfile:
    asr_languages: list[str]
    tts_languages: list[str]
    nmt_languages: list[str]
    semantic_languages: list[str] = field(default_factory=list)
    gpu: tuple[str, float] = GPUS[0]
    accept_public_jobs: bool = True
    services_running: bool = True
    with_semantic: bool = False
    #: declare ``job_ack`` and acknowledge every job; False behaves like the published node clients,
    #: which never send job_ack nor job_started (only asr_partial when asked for, and job_result)
    sends_acks: bool = True
    #: declare the turn dialect of job_assign (``turn_jobs``)
    turn_dialect: bool = False
    #: the node's own ``supported_language_pairs`` (None: not reported)
    supported_pairs: list[tuple[str, str]] | None = None

    def services(self) -> list[InstalledService]:
        status = ServiceStatus.RUNNING if self.services_running else ServiceStatus.STOPPED
        out = [
            InstalledService(
                service_id="faster-whisper-vad",
                type=ServiceType.ASR,
                device=DeviceType.GPU,
                status=status,
                version="1.0.0",
            ),
            InstalledService(
                service_id="nmt-m2m100",
                type=ServiceType.NMT,
                device=DeviceType.GPU,
                status=status,
                version="1.0.0",
            ),
            InstalledService(
                service_id="piper-tts",
                type=ServiceType.TTS,
                device=DeviceType.GPU,
                status=status,
                version="1.0.0",
            ),
        ]
        if self.with_semantic:
            out.append(
                InstalledService(
                    service_id="semantic-repair",
                    type=ServiceType.SEMANTIC,
                    device=DeviceType.GPU,
                    status=status,
                )
            )
        return out

    def capability_by_type(self) -> list[CapabilityByType]:
        return [CapabilityByType(type=s.type, ready=self.services_running) for s in self.services()]

    def languages(self) -> NodeLanguageCapabilities:
        return NodeLanguageCapabilities(
            asr_languages=list(self.asr_languages),
            tts_languages=list(self.tts_languages),
            nmt_capabilities=[
                NmtCapability(model_id="m2m100", languages=list(self.nmt_languages), rule="any_to_any")
            ],
            semantic_languages=list(self.semantic_languages) or None,
            supported_language_pairs=(
                None
                if self.supported_pairs is None
                else [LanguagePair(src=s, tgt=t) for s, t in self.supported_pairs]
            ),
        )

    def protocol_features(self) -> list[str] | None:
        out = ([FEATURE_JOB_ACK] if self.sends_acks else []) + (
            [FEATURE_TURN_JOBS] if self.turn_dialect else []
        )
        return out or None

    def register_message(self, node_id: str | None = None) -> NodeRegister:
        return NodeRegister(
            node_id=node_id,
            version="sim-1.0",
            capability_schema_version="2.0",
            platform="linux",
            hardware=HardwareInfo(
                cpu_cores=16, memory_gb=63.8, gpus=[GpuInfo(name=self.gpu[0], memory_gb=self.gpu[1])]
            ),
            installed_models=[],
            installed_services=self.services(),
            capability_by_type=self.capability_by_type(),
            features_supported=FeatureFlags(emotion_detection=True, speech_rate_detection=True),
            accept_public_jobs=self.accept_public_jobs,
            language_capabilities=self.languages(),
            protocol_features=self.protocol_features(),
        )


def random_profile(rng: random.Random) -> NodeProfile:
    """A node speaking 2-4 languages, English almost always among them (as real fleets are)."""
    k = rng.randint(2, 4)
    langs = rng.sample(LANGUAGES[1:], k - 1)
    langs.insert(0, "en" if rng.random() < 0.9 else rng.choice(LANGUAGES[1:]))
    langs = list(dict.fromkeys(langs))
    return NodeProfile(
        asr_languages=langs,
        tts_languages=langs,
        nmt_languages=langs,
        semantic_languages=langs if rng.random() < 0.5 else [],
        gpu=rng.choice(GPUS),
        accept_public_jobs=rng.random() < 0.95,
    )
