"""The HTTP API's edge: answers encoded from their Structs, query strings decoded into theirs, and the
one error boundary.

``json_response`` encodes a ``protocol.http`` Struct with msgspec. ``parse_query`` reads a query string
into a query Struct, refusing a bad value with ``INVALID_REQUEST`` and a message in our words naming the
parameter. ``error_boundary`` (the app's middleware) turns every ``SchedulerError`` a handler raises
into ``{"code", "message", "details"}`` with the status ``protocol.http.HTTP_STATUS`` gives its code,
answers unknown ``/api/`` routes and wrong methods the same way, and any other exception with a logged
500 ``INTERNAL_ERROR``: a handler never formats an error itself.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import cache
from typing import Any, TypeVar, get_type_hints

import msgspec
from aiohttp import web
from multidict import MultiMapping

from lingua_scheduler.errors import ErrorCode, RequestError, SchedulerError
from lingua_scheduler.protocol.http import HTTP_STATUS, ErrorBody

log = logging.getLogger(__name__)

JSON = "application/json"
_encode = msgspec.json.Encoder().encode
S = TypeVar("S", bound=msgspec.Struct)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(
    body: msgspec.Struct, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(body=_encode(body), status=status, content_type=JSON, headers=headers)


def build(cls: type[S], data: Any) -> S:
    """A response Struct from a dict built elsewhere (the stats aggregate, the core's listings). A key the
    Struct does not declare, or a value of the wrong type, is a bug here: it raises (a 500)."""
    return msgspec.convert(data, cls)


def status_of(code: ErrorCode) -> int:
    return HTTP_STATUS.get(code, 500)


def error_response(exc: SchedulerError) -> web.Response:
    status = HTTP_STATUS.get(exc.code) or (400 if exc.peer_fault else 500)
    details = exc.details if exc.details is not None else msgspec.UNSET
    headers = exc.headers if isinstance(exc, RequestError) else None
    return json_response(ErrorBody(code=exc.code, message=exc.message, details=details), status, headers)


@web.middleware
async def error_boundary(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except SchedulerError as exc:
        return error_response(exc)
    except web.HTTPNotFound:
        if request.path.startswith("/api/"):
            return error_response(RequestError(f"no route {request.path}", code=ErrorCode.NOT_FOUND))
        raise
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        return error_response(
            RequestError(
                f"{request.method} is not allowed here ({allowed})",
                code=ErrorCode.METHOD_NOT_ALLOWED,
                headers={"Allow": allowed},  # required with a 405 (RFC 9110 15.5.6)
            )
        )
    except web.HTTPException:
        raise  # redirects and aiohttp's own answers
    except Exception:
        log.exception("request failed", extra={"path": request.path, "method": request.method})
        return error_response(SchedulerError(f"{request.method} {request.path} failed: see the server log"))


# --- query strings ------------------------------------------------------------------------------------


def _describe(t: msgspec.inspect.Type) -> str:
    if isinstance(t, msgspec.inspect.Metadata):
        t = t.type
    if isinstance(t, msgspec.inspect.IntType | msgspec.inspect.FloatType):
        kind = "an integer" if isinstance(t, msgspec.inspect.IntType) else "a number"
        lo, hi = t.ge, t.le
        if lo is not None and hi is not None:
            return f"{kind} in {lo:g}..{hi:g}"
        if lo is not None:
            return f"{kind} >= {lo:g}"
        return kind
    if isinstance(t, msgspec.inspect.BoolType):
        return "true or false"
    if isinstance(t, msgspec.inspect.StrType) and t.min_length:
        return "a non-empty string"
    return "valid"


def _choices(t: msgspec.inspect.Type) -> list[str]:
    if isinstance(t, msgspec.inspect.EnumType):
        return [m.value for m in t.cls]
    if isinstance(t, msgspec.inspect.LiteralType):
        return [str(v) for v in t.values]
    return []


@cache
def _fields(cls: type[msgspec.Struct]) -> list[tuple[msgspec.inspect.Field, Any]]:
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    hints = get_type_hints(cls, include_extras=True)
    return [(f, hints[f.name]) for f in info.fields]


def parse_query(query: MultiMapping[str], cls: type[S]) -> S:
    """``query`` as a ``cls`` (a query Struct of ``protocol.http``): list fields take every value of
    their parameter, split at commas, blanks dropped; other fields take the first value. Raises
    ``RequestError`` (INVALID_REQUEST) naming the parameter and what it must be."""
    values: dict[str, Any] = {}
    for f, hint in _fields(cls):
        t = f.type
        extra = (t.extra or {}) if isinstance(t, msgspec.inspect.Metadata) else {}
        inner = t.type if isinstance(t, msgspec.inspect.Metadata) else t
        if isinstance(inner, msgspec.inspect.ListType):
            items = [
                v.strip() for raw in query.getall(f.encode_name, []) for v in raw.split(",") if v.strip()
            ]
            if extra.get("fold_case"):
                items = [v.lower() for v in items]
            choices = _choices(inner.item_type)
            for v in items:
                if choices and v not in choices:
                    noun = extra.get("noun", f"value of query parameter {f.encode_name!r}")
                    raise RequestError(f"unknown {noun} {v!r} (one of {', '.join(choices)})")
            values[f.name] = msgspec.convert(items, hint)
            continue
        raw = query.get(f.encode_name)  # the parameter's name on the wire (``from`` for ``from_``)
        if raw is None:
            if f.required:
                raise RequestError(f"query parameter {f.encode_name!r} is required")
            continue
        try:
            values[f.name] = msgspec.convert(raw, hint, strict=False)
        except msgspec.ValidationError:
            raise RequestError(
                f"query parameter {f.encode_name!r} must be {_describe(t)}, got {raw!r}"
            ) from None
    return cls(**values)
