"""Logging: JSON lines for machines, one readable line per record for terminals; per-module levels.

``server.log_format`` (``serve --log-format``) chooses: ``json`` (one object per line: ``ts``,
``level``, ``logger``, ``msg`` and every ``extra=`` field), ``text`` (``time LEVEL logger: message
key=value ...``), or ``auto``: text when stderr is a terminal, JSON otherwise (a file, a pipe, a
container's log collector).

Fields given through ``extra=`` (node_id, session_id, job_id, trace_id, ...) become keys of the object
(JSON) or ``key=value`` pairs (text). Never pass audio or transcript text to a log call at INFO.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

import msgspec

_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
_enc = msgspec.json.Encoder(enc_hook=str)
#: logger names shortened in text lines (the package prefix says nothing on a terminal)
_PACKAGE = "lingua_scheduler."


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _RESERVED and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(_fields(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _enc.encode(out).decode("utf-8", "replace")


class TextFormatter(logging.Formatter):
    """``08:41:19.531 WARNING server.auth: message key=value key="two words"`` (local time).

    A value with a space, a quote or an ``=`` is JSON-quoted so the line stays one unambiguous
    line; an exception's traceback follows on its own lines."""

    def format(self, record: logging.LogRecord) -> str:
        name = record.name.removeprefix(_PACKAGE)
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        parts = [f"{stamp} {record.levelname:<7} {name}: {record.getMessage()}"]
        parts += [f"{k}={_text_value(v)}" for k, v in _fields(record).items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else _enc.encode(value).decode("utf-8", "replace")
    if isinstance(value, str) and (not text or any(c in text for c in ' ="\n\t')):
        return _enc.encode(text).decode("utf-8", "replace")
    return text


def resolve_format(fmt: str, stream: TextIO) -> str:
    """``auto`` becomes ``text`` on a terminal and ``json`` anywhere else."""
    if fmt != "auto":
        return fmt
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


def setup_logging(level: str = "info", per_module: dict[str, str] | None = None, fmt: str = "json") -> None:
    """Log to stderr at ``level`` (and ``per_module`` levels) in ``fmt``: json, text or auto."""
    handler = logging.StreamHandler(sys.stderr)
    formatter = TextFormatter() if resolve_format(fmt, sys.stderr) == "text" else JsonFormatter()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name, lvl in (per_module or {}).items():
        logging.getLogger(name).setLevel(lvl.upper())
    logging.getLogger("aiohttp.access").setLevel("WARNING")
