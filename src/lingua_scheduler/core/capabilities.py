"""What a node can do, derived by value from what it reported.

``Capabilities`` is immutable and compared with ``==``: the registry rebuilds it only when the reported
capability fields differ from the previous report, and counts a capability change only when the derived
value differs too. Load figures are not part of it. Pools and selection read nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lingua_scheduler.core.languages import AUTO, normalize, normalize_set
from lingua_scheduler.protocol.common import CORE_SERVICE_TYPES, ServiceStatus, ServiceType
from lingua_scheduler.protocol.node import (
    CapabilityByType,
    InstalledModel,
    InstalledService,
    NodeLanguageCapabilities,
)

NMT_RULES = frozenset({"any_to_any", "any_to_en", "en_to_any", "specific_pairs"})


@dataclass(frozen=True, slots=True)
class NmtEntry:
    """One translation model: which directed pairs its rule covers; a blocked pair never."""

    model_id: str
    rule: str
    languages: frozenset[str]
    supported: frozenset[tuple[str, str]] = frozenset()
    blocked: frozenset[tuple[str, str]] = frozenset()

    def translates(self, src: str, tgt: str) -> bool:
        if (src, tgt) in self.blocked:
            return False
        if self.rule == "any_to_any":
            return src in self.languages and tgt in self.languages
        if self.rule == "any_to_en":
            return src in self.languages and tgt == "en"
        if self.rule == "en_to_any":
            return src == "en" and tgt in self.languages
        if self.rule == "specific_pairs":
            return (src, tgt) in self.supported
        return False


@dataclass(frozen=True, slots=True)
class Capabilities:
    asr_languages: frozenset[str] = frozenset()
    tts_languages: frozenset[str] = frozenset()
    semantic_languages: frozenset[str] = frozenset()
    nmt: tuple[NmtEntry, ...] = ()
    #: the node can identify the spoken language (routable for ``src_lang = auto``)
    language_id: bool = False
    installed_types: frozenset[ServiceType] = frozenset()
    ready_types: frozenset[ServiceType] = frozenset()
    #: service_id -> type, for marks such as MODEL_NOT_AVAILABLE that name a service
    service_types: tuple[tuple[str, ServiceType], ...] = ()
    models: frozenset[str] = frozenset()
    features: frozenset[str] = field(default_factory=frozenset)

    def translates(self, src: str, tgt: str) -> bool:
        if src == tgt:
            return True
        if src in self.semantic_languages and tgt in self.semantic_languages:
            return True
        return any(e.translates(src, tgt) for e in self.nmt)

    def serves_pair(self, src: str, tgt: str) -> bool:
        """End to end: ASR in ``src`` (or language identification for ``auto``), src->tgt, TTS in tgt."""
        if tgt not in self.tts_languages:
            return False
        if src == AUTO:
            return self.language_id and any(self.translates(s, tgt) for s in self.asr_languages)
        return src in self.asr_languages and self.translates(src, tgt)

    def served_pairs(self) -> frozenset[tuple[str, str]]:
        """Every directed pair this node serves end to end, ``auto -> tgt`` included."""
        pairs = {
            (s, t)
            for s in self.asr_languages
            for t in self.tts_languages
            if s != t and self.serves_pair(s, t)
        }
        if self.language_id:
            pairs.update((AUTO, t) for t in self.tts_languages if self.serves_pair(AUTO, t))
        return frozenset(pairs)

    def service_type(self, service_id: str) -> ServiceType | None:
        for sid, st in self.service_types:
            if sid == service_id:
                return st
        return None


def _pairs(pairs: list[object] | None) -> frozenset[tuple[str, str]]:
    out: set[tuple[str, str]] = set()
    for p in pairs or ():
        out.add((normalize(p.src), normalize(p.tgt)))  # type: ignore[attr-defined]
    return frozenset(out)


def derive(
    services: list[InstalledService],
    by_type: list[CapabilityByType],
    models: list[InstalledModel] | None,
    languages: NodeLanguageCapabilities | None,
    features: frozenset[str],
) -> Capabilities:
    """Build the capability value from the reported fields. Pure; called only when a report differs."""
    installed = frozenset(s.type for s in services)
    running = {s.type for s in services if s.status is ServiceStatus.RUNNING}
    reported_ready = {c.type: c.ready for c in by_type}
    # A type is ready when a service of it runs and the node does not say otherwise.
    ready = frozenset(t for t in running if reported_ready.get(t, True))
    lang = languages or NodeLanguageCapabilities()
    asr_raw = [normalize(c) for c in (lang.asr_languages or [])]
    nmt = tuple(
        NmtEntry(
            model_id=c.model_id,
            rule=c.rule,
            languages=normalize_set(c.languages),
            supported=_pairs(c.supported_pairs),  # type: ignore[arg-type]
            blocked=_pairs(c.blocked_pairs),  # type: ignore[arg-type]
        )
        for c in (lang.nmt_capabilities or [])
        if c.rule in NMT_RULES
    )
    asr_langs = normalize_set(lang.asr_languages)
    return Capabilities(
        asr_languages=asr_langs,
        tts_languages=normalize_set(lang.tts_languages),
        semantic_languages=normalize_set(lang.semantic_languages),
        nmt=nmt,
        # Multilingual ASR (several languages) or an explicit "auto" entry means language identification.
        language_id=AUTO in asr_raw or len(asr_langs) >= 2,
        installed_types=installed,
        ready_types=ready,
        service_types=tuple(sorted((s.service_id, s.type) for s in services)),
        models=frozenset(m.model_id for m in (models or ()) if m.enabled is not False),
        features=features,
    )


def core_ready(caps: Capabilities) -> bool:
    return caps.ready_types >= CORE_SERVICE_TYPES
