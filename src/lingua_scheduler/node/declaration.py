"""What a node declares about itself, and the ``node_register`` / heartbeat parts built from it.

An author names the service types it runs, the directed language pairs it serves, its GPUs and its
capacity; the SDK turns that into the wire structs of ``protocol/node.py`` (services running on the GPU,
every type ready, the pairs as ``supported_language_pairs`` with the languages recognized and
synthesized they need). Built once: heartbeats repeat the same capability values, which the scheduler
compares by value at no cost.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from lingua_scheduler.protocol.common import DeviceType, FeatureFlags, ServiceStatus
from lingua_scheduler.protocol.node import (
    FEATURE_JOB_ACK,
    MAX_DECLARED_SLOTS,
    CapabilityByType,
    GpuInfo,
    HardwareInfo,
    InstalledService,
    LanguagePair,
    NmtCapability,
    NodeLanguageCapabilities,
    NodeRegister,
)

#: the capability schema the scheduler requires
SCHEMA_VERSION = "2.0"
SDK_VERSION = "lingua-node-sdk-1"


@dataclass(frozen=True, slots=True)
class Declaration:
    """A node's self-description. ``languages``: directed (source, target) pairs; ``gpus``: (name,
    memory in GB) -- a node needs at least one; ``max_concurrent_jobs``: the jobs it runs at once;
    ``load_threshold``: at or above this own load (0..1) it takes no new job."""

    languages: Sequence[tuple[str, str]]
    gpus: Sequence[tuple[str, float]]
    services: Sequence[str] = ("asr", "nmt", "tts")
    max_concurrent_jobs: int = 1
    load_threshold: float | None = None
    accept_public_jobs: bool = True
    features: FeatureFlags = field(default_factory=FeatureFlags)
    version: str = SDK_VERSION

    def __post_init__(self) -> None:
        if not self.languages:
            raise ValueError("a node declares at least one language pair, e.g. languages=[('en', 'zh')]")
        if not self.gpus:
            raise ValueError("a node declares at least one GPU, e.g. gpus=[('NVIDIA RTX 4090', 24.0)]")
        if not 1 <= self.max_concurrent_jobs <= MAX_DECLARED_SLOTS:
            raise ValueError(
                f"max_concurrent_jobs must be 1..{MAX_DECLARED_SLOTS}, got {self.max_concurrent_jobs}"
            )
        if self.load_threshold is not None and not 0.0 <= self.load_threshold <= 1.0:
            raise ValueError(f"load_threshold must be 0..1, got {self.load_threshold}")

    def services_report(self) -> list[InstalledService]:
        return [
            InstalledService(
                service_id=f"{kind}-{i}",
                type=kind,
                device=DeviceType.GPU,
                status=ServiceStatus.RUNNING,
                version=self.version,
            )
            for i, kind in enumerate(self.services)
        ]

    def by_type(self) -> list[CapabilityByType]:
        return [CapabilityByType(type=kind, ready=True) for kind in dict.fromkeys(self.services)]

    def language_report(self) -> NodeLanguageCapabilities:
        pairs = [LanguagePair(src=s, tgt=t) for s, t in dict.fromkeys(self.languages)]
        sources = list(dict.fromkeys(p.src for p in pairs))
        targets = list(dict.fromkeys(p.tgt for p in pairs))
        return NodeLanguageCapabilities(
            asr_languages=sources,
            tts_languages=targets,
            nmt_capabilities=[
                NmtCapability(
                    model_id="node",
                    languages=list(dict.fromkeys([*sources, *targets])),
                    rule="specific_pairs",
                    supported_pairs=pairs,
                )
            ],
            supported_language_pairs=pairs,
        )

    def register_message(
        self,
        node_id: str | None,
        *,
        node_token: str | None = None,
        enrollment_secret: str | None = None,
        protocol_features: Iterable[str] = (FEATURE_JOB_ACK,),
    ) -> NodeRegister:
        memory_gb = 0.0
        if hasattr(os, "sysconf"):
            try:
                memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
            except (ValueError, OSError):
                memory_gb = 0.0
        return NodeRegister(
            node_id=node_id,
            version=self.version,
            capability_schema_version=SCHEMA_VERSION,
            platform=platform.system().lower() or "unknown",
            hardware=HardwareInfo(
                cpu_cores=os.cpu_count() or 1,
                memory_gb=memory_gb,
                gpus=[GpuInfo(name=name, memory_gb=float(mem)) for name, mem in self.gpus],
            ),
            installed_models=[],
            installed_services=self.services_report(),
            capability_by_type=self.by_type(),
            features_supported=self.features,
            accept_public_jobs=self.accept_public_jobs,
            language_capabilities=self.language_report(),
            node_token=node_token if node_id is not None else None,
            enrollment_secret=enrollment_secret if node_id is None else None,
            protocol_features=list(protocol_features) or None,
            max_concurrent_jobs=self.max_concurrent_jobs,
            load_threshold=self.load_threshold,
        )
