"""Language-code normalisation, with the aliases the reference scheduler and its nodes use.

Codes are lower-cased and trimmed; regional variants fold onto their base language so that a node
reporting ``zh-CN`` serves a session asking for ``zh``. ``auto`` means "detect the source language".
"""

from __future__ import annotations

AUTO = "auto"

_ALIASES = {
    "zh-cn": "zh",
    "zh-tw": "zh",
    "zh-hans": "zh",
    "zh-hant": "zh",
    "pt-br": "pt",
    "pt-pt": "pt",
    "en-us": "en",
    "en-gb": "en",
    "in": "id",
    "iw": "he",
}


def normalize(code: str) -> str:
    c = code.strip().lower().replace("_", "-")
    return _ALIASES.get(c, c)


def normalize_set(codes: list[str] | None) -> frozenset[str]:
    """Normalised set of concrete languages; ``auto`` is dropped (it is a capability, not a language)."""
    if not codes:
        return frozenset()
    return frozenset(n for n in (normalize(c) for c in codes) if n and n != AUTO)
