"""Fleet builders for the pool and selection tests: a real Registry and FleetViewPublisher fed with real
``NodeRegister`` / ``NodeHeartbeat`` structs, on a ``ManualClock``."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from lingua_scheduler.clock import ManualClock
from lingua_scheduler.config import NodeHealthConfig, PoolsConfig
from lingua_scheduler.core.fleet_view import FleetView, FleetViewPublisher
from lingua_scheduler.core.registry import Registry
from lingua_scheduler.core.selection import SelectionRequest, SelectionResult, Selector
from lingua_scheduler.core.unavailable import UnavailableMarks
from lingua_scheduler.protocol.common import DeviceType, FeatureFlags, ServiceStatus, ServiceType
from lingua_scheduler.protocol.node import (
    CapabilityByType,
    GpuInfo,
    HardwareInfo,
    InstalledService,
    NmtCapability,
    NodeHeartbeat,
    NodeLanguageCapabilities,
    NodeRegister,
    ResourceUsage,
)

CORE = (ServiceType.ASR, ServiceType.NMT, ServiceType.TTS)
SERVICE_IDS = {
    ServiceType.ASR: "asr-whisper",
    ServiceType.NMT: "nmt-m2m100",
    ServiceType.TTS: "tts-piper",
    ServiceType.TONE: "tone-1",
    ServiceType.SEMANTIC: "semantic-1",
}


@dataclass(frozen=True)
class Spec:
    """What a test node reports. ``langs`` is the shorthand for asr = tts = nmt languages."""

    langs: tuple[str, ...] = ("en", "zh")
    asr: tuple[str, ...] | None = None
    tts: tuple[str, ...] | None = None
    nmt: tuple[str, ...] | None = None
    nmt_rule: str = "any_to_any"
    services: tuple[ServiceType, ...] = CORE
    #: installed types whose readiness the node reports as false
    not_ready: frozenset[ServiceType] = frozenset()
    accept_public: bool = True
    features: frozenset[str] = frozenset({"emotion_detection"})

    def installed(self) -> list[InstalledService]:
        return [
            InstalledService(
                service_id=SERVICE_IDS[t], type=t, device=DeviceType.GPU, status=ServiceStatus.RUNNING
            )
            for t in self.services
        ]

    def by_type(self) -> list[CapabilityByType]:
        return [CapabilityByType(type=t, ready=t not in self.not_ready) for t in self.services]

    def languages(self) -> NodeLanguageCapabilities:
        return NodeLanguageCapabilities(
            asr_languages=list(self.asr if self.asr is not None else self.langs),
            tts_languages=list(self.tts if self.tts is not None else self.langs),
            nmt_capabilities=[
                NmtCapability(
                    model_id="m2m",
                    languages=list(self.nmt if self.nmt is not None else self.langs),
                    rule=self.nmt_rule,
                )
            ],
        )

    def register(self, node_id: str) -> NodeRegister:
        return NodeRegister(
            node_id=node_id,
            version="test",
            capability_schema_version="2.0",
            platform="linux",
            hardware=HardwareInfo(cpu_cores=8, memory_gb=32.0, gpus=[GpuInfo(name="T4", memory_gb=16.0)]),
            installed_models=[],
            installed_services=self.installed(),
            capability_by_type=self.by_type(),
            features_supported=FeatureFlags(**dict.fromkeys(self.features, True)),
            accept_public_jobs=self.accept_public,
            language_capabilities=self.languages(),
        )


@dataclass
class Fleet:
    """A registry + publisher + selector on a manual clock, driven through the real messages."""

    pools: PoolsConfig = field(default_factory=PoolsConfig)
    max_jobs: int = 4
    seed: int = 0
    clock: ManualClock = field(default_factory=ManualClock)

    def __post_init__(self) -> None:
        self.registry = Registry(NodeHealthConfig(health_check_count=1), self.clock)
        self.publisher = FleetViewPublisher(self.registry, self.clock, self.max_jobs, pools_config=self.pools)
        self.marks = UnavailableMarks(self.clock, self.pools.unavailable_ttl_seconds)
        self.selector = Selector(rng=random.Random(self.seed), marks=self.marks)
        self.conns: dict[str, object] = {}
        self.specs: dict[str, Spec] = {}
        #: (node id, service id) marked through ``mark``, for oracles
        self.marked: set[tuple[str, str]] = set()

    @property
    def view(self) -> FleetView:
        return self.publisher.view

    def add(
        self, node_id: str, spec: Spec | None = None, *, ready: bool = True, publish: bool = True, **load: Any
    ) -> str:
        spec = spec or Spec()
        conn = object()
        self.registry.register(spec.register(node_id), conn)
        self.conns[node_id], self.specs[node_id] = conn, spec
        if ready:  # one healthy heartbeat promotes registering -> ready (health_check_count = 1)
            self.heartbeat(node_id, **load)
        if publish:
            self.publish()
        return node_id

    def add_many(self, prefix: str, n: int, spec: Spec | None = None, **kw: Any) -> list[str]:
        ids = [self.add(f"{prefix}{i}", spec, publish=False, **kw) for i in range(n)]
        self.publish()
        return ids

    def heartbeat(
        self,
        node_id: str,
        spec: Spec | None = None,
        *,
        running: int = 0,
        cpu: float = 10.0,
        mem: float = 30.0,
        gpu: float | None = 20.0,
    ) -> None:
        if spec is not None:
            self.specs[node_id] = spec
        spec = self.specs[node_id]
        self.registry.heartbeat(
            self.conns[node_id],
            NodeHeartbeat(
                node_id=node_id,
                timestamp=self.clock.wall_ms(),
                resource_usage=ResourceUsage(
                    cpu_percent=cpu, mem_percent=mem, running_jobs=running, gpu_percent=gpu
                ),
                installed_services=spec.installed(),
                capability_by_type=spec.by_type(),
                language_capabilities=spec.languages(),
            ),
        )

    def mark(self, node_id: str, service_id: str) -> None:
        self.marked.add((node_id, service_id))
        self.marks.mark(node_id, service_id)

    def disconnect(self, node_id: str) -> None:
        self.registry.disconnect(node_id, self.conns[node_id])

    def reconnect(self, node_id: str) -> None:
        conn = object()
        self.registry.register(self.specs[node_id].register(node_id), conn)
        self.conns[node_id] = conn
        self.heartbeat(node_id)

    def publish(self) -> FleetView:
        self.publisher.publish()
        return self.view

    def select(self, src: str, tgt: str, **kw: Any) -> SelectionResult:
        return self.selector.select(self.view, SelectionRequest(src, tgt, **kw))

    def validate(self) -> None:
        self.registry.validate()
        self.publisher.validate()


FleetFactory = Callable[..., Fleet]


@pytest.fixture
def make_fleet() -> FleetFactory:
    """``make_fleet(mode="hash", pool_count=4, ...)``: keyword arguments go to ``PoolsConfig``."""

    def factory(*, max_jobs: int = 4, seed: int = 0, **pools: Any) -> Fleet:
        return Fleet(pools=PoolsConfig(**pools), max_jobs=max_jobs, seed=seed)

    return factory


def spec(langs: Iterable[str] = ("en", "zh"), **kw: Any) -> Spec:
    return replace(Spec(), langs=tuple(langs), **kw)
