"""What a node can do, derived by value from what it reported.

``Capabilities`` is immutable and compared with ``==``: the registry rebuilds it only when the reported
capability fields differ from the previous report, and counts a capability change only when the derived
value differs too. Load figures are not part of it. Pools and selection read nothing else.

Service types and device kinds are open on the wire: the ones this scheduler does not know are kept in
``unknown_types`` / ``unknown_devices`` (shown by the API, counted by a metric) and never take part in
routing. ``supported_language_pairs``, when a node reports it, is the node's own statement of which
directed pairs it translates: it replaces what would be inferred from its translation models.

Without declared pairs, a node translates between its semantic languages (the published node app
reports as those the languages every one of its running services handles, its translation model
included), and by its translation models: ``nmt_capabilities`` when reported, else the app's summary
strings ``nmt`` (``"nmt-m2m100:any_to_any:37 langs"``: model, rule, how many languages). A summary
does not list its languages, so its rule is applied to the languages the node hears and speaks (its
ASR and TTS languages): a pair outside those could not be served end to end anyway. A summary whose
rule needs its own list of pairs (``specific_pairs``), or that is not of that shape, is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lingua_scheduler.core.languages import AUTO, normalize, normalize_set
from lingua_scheduler.protocol.common import CORE_SERVICE_TYPES, DeviceType, ServiceStatus, ServiceType
from lingua_scheduler.protocol.node import (
    CapabilityByType,
    InstalledModel,
    InstalledService,
    LanguagePair,
    NodeLanguageCapabilities,
)

NMT_RULES = frozenset({"any_to_any", "any_to_en", "en_to_any", "specific_pairs"})
_SERVICE_TYPES: dict[str, ServiceType] = {t.value: t for t in ServiceType}
_DEVICE_KINDS = frozenset(d.value for d in DeviceType)


def service_type(kind: str) -> ServiceType | None:
    """The known service type named ``kind``, or None for a kind this scheduler does not route on."""
    return _SERVICE_TYPES.get(kind)


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
    #: the node's ``supported_language_pairs``; None when it did not report any
    declared_pairs: frozenset[tuple[str, str]] | None = None
    #: reported service types / device kinds this scheduler does not know (kept, not routed on)
    unknown_types: frozenset[str] = frozenset()
    unknown_devices: frozenset[str] = frozenset()

    def translates(self, src: str, tgt: str) -> bool:
        if src == tgt:
            return True
        if self.declared_pairs is not None:
            return (src, tgt) in self.declared_pairs
        if src in self.semantic_languages and tgt in self.semantic_languages:
            return True
        return any(e.translates(src, tgt) for e in self.nmt)

    def translates_into(self, tgt: str) -> bool:
        """Speech in some ASR language can end up in ``tgt`` (for ``src_lang = auto``). With declared
        pairs only the pairs stated count, not speech that is already in ``tgt``."""
        if self.declared_pairs is not None:
            return any(s in self.asr_languages and t == tgt for s, t in self.declared_pairs)
        return any(self.translates(s, tgt) for s in self.asr_languages)

    def serves_pair(self, src: str, tgt: str) -> bool:
        """End to end: ASR in ``src`` (or language identification for ``auto``), src->tgt, TTS in tgt."""
        if tgt not in self.tts_languages:
            return False
        if src == AUTO:
            return self.language_id and self.translates_into(tgt)
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


#: rules a summary string can carry without its own pair list
SUMMARY_RULES = NMT_RULES - {"specific_pairs"}


def parse_nmt_summary(entry: object) -> tuple[str, str] | None:
    """(model_id, rule) of a ``"<model_id>:<rule>:<count> langs"`` summary, else None."""
    if not isinstance(entry, str) or len(entry) > 256:
        return None
    parts = entry.split(":")
    if len(parts) != 3 or not parts[0]:
        return None
    model_id, rule, count = parts
    words = count.split()
    if rule not in SUMMARY_RULES or len(words) != 2 or not words[0].isdigit() or words[1] != "langs":
        return None
    return model_id, rule


def _pairs(pairs: list[LanguagePair] | None) -> frozenset[tuple[str, str]]:
    return frozenset((normalize(p.src), normalize(p.tgt)) for p in pairs or ())


def derive(
    services: list[InstalledService],
    by_type: list[CapabilityByType],
    models: list[InstalledModel] | None,
    languages: NodeLanguageCapabilities | None,
    features: frozenset[str],
) -> Capabilities:
    """Build the capability value from the reported fields. Pure; called only when a report differs."""
    known = [(s, t) for s in services if (t := service_type(s.type)) is not None]
    installed = frozenset(t for _, t in known)
    running = {t for s, t in known if s.status is ServiceStatus.RUNNING}
    reported_ready = {c.type: c.ready for c in by_type}
    unknown_types = frozenset(s.type for s in services if s.type not in _SERVICE_TYPES) | frozenset(
        c.type for c in by_type if c.type not in _SERVICE_TYPES
    )
    unknown_devices = frozenset(s.device for s in services if s.device not in _DEVICE_KINDS) | frozenset(
        d for c in by_type for d in (c.devices or ()) if d not in _DEVICE_KINDS
    )
    # A type is ready when a service of it runs and the node does not say otherwise.
    ready = frozenset(t for t in running if reported_ready.get(t, True))
    lang = languages or NodeLanguageCapabilities()
    asr_raw = [normalize(c) for c in (lang.asr_languages or [])]
    nmt = tuple(
        NmtEntry(
            model_id=c.model_id,
            rule=c.rule,
            languages=normalize_set(c.languages),
            supported=_pairs(c.supported_pairs),
            blocked=_pairs(c.blocked_pairs),
        )
        for c in (lang.nmt_capabilities or [])
        if c.rule in NMT_RULES
    )
    asr_langs = normalize_set(lang.asr_languages)
    tts_langs = normalize_set(lang.tts_languages)
    if not nmt:
        summaries = (parse_nmt_summary(e) for e in (lang.nmt or ()))
        heard_and_spoken = (asr_langs | tts_langs) - {AUTO}
        nmt = tuple(
            NmtEntry(model_id=s[0], rule=s[1], languages=heard_and_spoken) for s in summaries if s is not None
        )
    return Capabilities(
        asr_languages=asr_langs,
        tts_languages=tts_langs,
        semantic_languages=normalize_set(lang.semantic_languages),
        nmt=nmt,
        # Multilingual ASR (several languages) or an explicit "auto" entry means language identification.
        language_id=AUTO in asr_raw or len(asr_langs) >= 2,
        installed_types=installed,
        ready_types=ready,
        service_types=tuple(sorted((s.service_id, t) for s, t in known)),
        models=frozenset(m.model_id for m in (models or ()) if m.enabled is not False),
        features=features,
        # an empty list says nothing (older clients send one before their models are known)
        declared_pairs=_pairs(lang.supported_language_pairs) if lang.supported_language_pairs else None,
        unknown_types=unknown_types,
        unknown_devices=unknown_devices,
    )


def core_ready(caps: Capabilities) -> bool:
    return caps.ready_types >= CORE_SERVICE_TYPES
