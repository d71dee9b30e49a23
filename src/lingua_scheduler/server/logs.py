"""Structured logging: one JSON object per line, with per-module levels from config.

Fields given through ``extra=`` (node_id, session_id, job_id, trace_id, ...) become keys of the object.
Never pass audio or transcript text to a log call at INFO.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import msgspec

_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
_enc = msgspec.json.Encoder(enc_hook=str)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _RESERVED and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _enc.encode(out).decode("utf-8", "replace")


def setup_logging(level: str = "info", per_module: dict[str, str] | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name, lvl in (per_module or {}).items():
        logging.getLogger(name).setLevel(lvl.upper())
    logging.getLogger("aiohttp.access").setLevel("WARNING")
