"""The text log format: one readable line per record, values quoted only when they must be."""

from __future__ import annotations

import io
import json
import logging
import sys

from lingua_scheduler.server.logs import JsonFormatter, TextFormatter, resolve_format


def _record(msg: str, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("lingua_scheduler.server.dispatcher", logging.WARNING, __file__, 1, msg, (), None)
    rec.__dict__.update(extra)
    return rec


def test_text_line_is_one_line_with_quoted_values() -> None:
    rec = _record(
        "job failover",
        job_id="job-1",
        reason="node gone: closed",
        empty="",
        note='say "hi"\nbye',
        count=3,
        ok=True,
        pools=["core", "zh"],
    )
    line = TextFormatter().format(rec)
    assert "\n" not in line
    head, _, fields = line.partition(" server.dispatcher: job failover ")
    assert head.endswith(" WARNING")
    assert fields == (
        'job_id=job-1 reason="node gone: closed" empty="" note="say \\"hi\\"\\nbye" count=3 ok=true '
        'pools=["core","zh"]'
    )


def test_text_traceback_follows_the_line() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    first, *rest = TextFormatter().format(rec).splitlines()
    assert first.endswith(" ERROR   x: failed") and rest[0].startswith("Traceback")


def test_auto_is_text_on_a_terminal_only() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert resolve_format("auto", Tty()) == "text"
    assert resolve_format("auto", io.StringIO()) == "json"
    assert resolve_format("json", Tty()) == "json" and resolve_format("text", io.StringIO()) == "text"


def test_json_keeps_its_fields() -> None:
    out = json.loads(JsonFormatter().format(_record("job failover", job_id="job-1")))
    assert set(out) == {"ts", "level", "logger", "msg", "job_id"}
