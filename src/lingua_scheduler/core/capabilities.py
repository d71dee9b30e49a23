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

A report's cost is bounded before anything is built (``CapabilityLimits``, from ``[limits]``): every list
has a length limit, and the pairs a node serves end to end (the pools it joins) are computed once, in
``derive``, by set operations per source language -- at most ``|asr| x (models + 2)`` operations on sets
of at most ``max_languages`` codes -- and refused past ``max_served_pairs`` rather than cut short (a
truncated set would route some pairs and silently drop others). The refusal is
``INVALID_CAPABILITY_SCHEMA`` naming the field, the limit and the configuration key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Sized
from dataclasses import dataclass, field, replace

from lingua_scheduler.config import LimitsConfig
from lingua_scheduler.core.languages import AUTO, normalize, normalize_set
from lingua_scheduler.errors import ErrorCode, RegistrationError
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
class CapabilityLimits:
    """Bounds on one node's capability report (the ``[limits]`` keys of the same names)."""

    max_languages: int = 64
    max_pairs_per_list: int = 1024
    max_models: int = 32
    max_services: int = 256
    max_served_pairs: int = 1024

    @classmethod
    def from_config(cls, config: LimitsConfig) -> CapabilityLimits:
        return cls(
            max_languages=config.max_languages_per_list,
            max_pairs_per_list=config.max_language_pairs_per_list,
            max_models=config.max_translation_models,
            max_services=config.max_services_per_node,
            max_served_pairs=config.max_served_pairs_per_node,
        )


DEFAULT_LIMITS = CapabilityLimits()


class CapabilityLimitError(RegistrationError):
    """A capability report over one of ``CapabilityLimits``: ``INVALID_CAPABILITY_SCHEMA`` with the
    field, the limit and the configuration key in ``details``."""

    def __init__(self, field: str, got: int, limit: int, key: str, what: str = "entries") -> None:
        super().__init__(
            f"{field} has {got} {what}, more than the limit of {limit} (limits.{key}); report fewer",
            code=ErrorCode.INVALID_CAPABILITY_SCHEMA,
            details={"field": field, "limit": limit, "got": got, "key": f"limits.{key}"},
        )
        self.field = field
        self.limit = limit


def _bounded(field: str, items: Sized | None, limit: int, key: str) -> None:
    if items is not None and len(items) > limit:
        raise CapabilityLimitError(field, len(items), limit, key)


def check_report(
    services: Sequence[InstalledService],
    by_type: Sequence[CapabilityByType],
    models: Sequence[InstalledModel] | None,
    languages: NodeLanguageCapabilities | None,
    limits: CapabilityLimits,
) -> None:
    """Refuse a report with a list over its limit. O(number of lists): only lengths are read."""
    n = limits.max_services
    _bounded("installed_services", services, n, "max_services_per_node")
    _bounded("capability_by_type", by_type, n, "max_services_per_node")
    _bounded("installed_models", models, n, "max_services_per_node")
    if languages is None:
        return
    lang, pairs = limits.max_languages, limits.max_pairs_per_list
    at = "language_capabilities."
    _bounded(at + "asr_languages", languages.asr_languages, lang, "max_languages_per_list")
    _bounded(at + "tts_languages", languages.tts_languages, lang, "max_languages_per_list")
    _bounded(at + "semantic_languages", languages.semantic_languages, lang, "max_languages_per_list")
    _bounded(
        at + "supported_language_pairs",
        languages.supported_language_pairs,
        pairs,
        "max_language_pairs_per_list",
    )
    nmt = languages.nmt_capabilities or []
    _bounded(at + "nmt_capabilities", nmt, limits.max_models, "max_translation_models")
    # the published app's summary strings: one model each, bounded like the structured entries
    _bounded(at + "nmt", languages.nmt, limits.max_models, "max_translation_models")
    for i, c in enumerate(nmt):
        where = f"{at}nmt_capabilities[{i}]."
        _bounded(where + "languages", c.languages, lang, "max_languages_per_list")
        _bounded(where + "supported_pairs", c.supported_pairs, pairs, "max_language_pairs_per_list")
        _bounded(where + "blocked_pairs", c.blocked_pairs, pairs, "max_language_pairs_per_list")


@dataclass(frozen=True, slots=True)
class NmtEntry:
    """One translation model: which directed pairs its rule covers; a blocked pair never."""

    model_id: str
    rule: str
    languages: frozenset[str]
    supported: frozenset[tuple[str, str]] = frozenset()
    blocked: frozenset[tuple[str, str]] = frozenset()
    #: the two pair sets grouped by source (derived from them; not part of the value)
    supported_by: Mapping[str, frozenset[str]] = field(default_factory=dict, compare=False, repr=False)
    blocked_by: Mapping[str, frozenset[str]] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.supported and not self.supported_by:
            object.__setattr__(self, "supported_by", by_source(self.supported))
        if self.blocked and not self.blocked_by:
            object.__setattr__(self, "blocked_by", by_source(self.blocked))

    def targets(self, src: str, tts: frozenset[str]) -> frozenset[str]:
        """The languages of ``tts`` this model translates ``src`` into: one set operation per rule
        (the same answer as ``translates`` for each of them)."""
        if self.rule == "any_to_any":
            out = self.languages & tts if src in self.languages else frozenset()
        elif self.rule == "any_to_en":
            out = _EN & tts if src in self.languages else frozenset()
        elif self.rule == "en_to_any":
            out = self.languages & tts if src == "en" else frozenset()
        elif self.rule == "specific_pairs":
            out = self.supported_by.get(src, _NONE) & tts
        else:
            out = frozenset()
        if out and self.blocked:
            out = out - self.blocked_by.get(src, _NONE)
        return out

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
    #: every directed pair served end to end (``auto -> tgt`` included), computed once by ``derive``;
    #: None for a value built by hand (then ``served_pairs`` computes it)
    served: frozenset[tuple[str, str]] | None = None

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
        if self.served is not None:
            return self.served
        return served_pairs(self, None)

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


_EN = frozenset({"en"})
_AUTO = frozenset({AUTO})
_NONE: frozenset[str] = frozenset()


def by_source(pairs: frozenset[tuple[str, str]]) -> Mapping[str, frozenset[str]]:
    """Directed pairs grouped by source language: source -> targets."""
    grouped: dict[str, set[str]] = {}
    for s, t in pairs:
        grouped.setdefault(s, set()).add(t)
    return {s: frozenset(ts) for s, ts in grouped.items()}


def served_pairs(caps: Capabilities, limit: int | None) -> frozenset[tuple[str, str]]:
    """The directed pairs ``caps`` serves end to end (what ``serves_pair`` says of every candidate),
    by one set operation per (source language, model) instead of a test per (source, target) pair.
    With ``limit``, raises ``CapabilityLimitError`` as soon as more pairs than that are found."""
    tts, asr = caps.tts_languages, caps.asr_languages
    declared = by_source(caps.declared_pairs) if caps.declared_pairs is not None else None
    per_source: list[tuple[str, frozenset[str]]] = []
    count = 0
    for s in asr - _AUTO:  # auto -> tgt pairs come from language identification, below
        if declared is not None:
            targets = declared.get(s, _NONE) & tts
        else:
            found: set[str] = set()
            if s in caps.semantic_languages:
                found |= caps.semantic_languages & tts
            for e in caps.nmt:
                found |= e.targets(s, tts)
            targets = frozenset(found)
        targets = targets - {s}
        per_source.append((s, targets))
        count += len(targets)
        if limit is not None and count > limit:
            raise _too_many_pairs(count, limit)
    auto: frozenset[str] = frozenset()
    if caps.language_id:
        reached = frozenset().union(*(t for _, t in per_source)) if per_source else frozenset()
        if declared is not None:
            # with declared pairs only the pairs stated count, not speech already in the target
            auto = frozenset().union(*(declared.get(s, _NONE) for s in asr)) & tts
        else:
            auto = reached | (asr & tts)  # translating s -> s is no translation: speech in tgt counts
        count += len(auto)
        if limit is not None and count > limit:
            raise _too_many_pairs(count, limit)
    out = [(s, t) for s, targets in per_source for t in targets]
    out.extend((AUTO, t) for t in auto)
    return frozenset(out)


def _too_many_pairs(count: int, limit: int) -> CapabilityLimitError:
    return CapabilityLimitError(
        "language_capabilities",
        count,
        limit,
        "max_served_pairs_per_node",
        what="or more directed language pairs served end to end (auto included)",
    )


def _pairs(pairs: list[LanguagePair] | None) -> frozenset[tuple[str, str]]:
    return frozenset((normalize(p.src), normalize(p.tgt)) for p in pairs or ())


def derive(
    services: list[InstalledService],
    by_type: list[CapabilityByType],
    models: list[InstalledModel] | None,
    languages: NodeLanguageCapabilities | None,
    features: frozenset[str],
    limits: CapabilityLimits = DEFAULT_LIMITS,
) -> Capabilities:
    """Build the capability value from the reported fields. Pure; called only when a report differs.

    Raises ``CapabilityLimitError`` for a report over ``limits``: its cost is bounded by them whatever
    the node sends (lengths are checked before anything is built)."""
    check_report(services, by_type, models, languages, limits)
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
    caps = Capabilities(
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
    return replace(caps, served=served_pairs(caps, limits.max_served_pairs))


def core_ready(caps: Capabilities) -> bool:
    return caps.ready_types >= CORE_SERVICE_TYPES
