"""HTTP media types and ``multipart/form-data`` bodies (RFC 9110 section 8.3.1, RFC 7578), parsed from
bytes already read and bounded by the caller.

Owns ``media_type`` (a Content-Type value as its lower-cased ``type/subtype`` and parameters) and
``form_parts`` (the parts of a form body: name, file name, content type, bytes). Parsing is strict
where a lenient reading would guess (a part without a name, a body with no closing delimiter, a
parameter with an unterminated quote) and bounded (``max_parts``, header block size). Errors are
``RequestError(INVALID_REQUEST)`` naming what was wrong; arbitrary bytes raise nothing else.

Must never: log or echo part contents (messages name part numbers and field names only).
"""

from __future__ import annotations

from dataclasses import dataclass

from lingua_scheduler.errors import ErrorCode, RequestError

#: most parts a form may have (the translate form has five fields; a few more are tolerated)
MAX_PARTS = 16
#: most bytes of one part's header block
MAX_PART_HEADERS = 4096
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _invalid(message: str, field: str) -> RequestError:
    return RequestError(message, code=ErrorCode.INVALID_REQUEST, details={"field": field, "reason": "form"})


def _params(text: str, field: str) -> dict[str, str]:
    """``; name=value; name="quoted \\" value"`` as a dict (names lower-cased, first one wins)."""
    out: dict[str, str] = {}
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t;":
            i += 1
        if i >= n:
            break
        start = i
        while i < n and text[i] not in "=;":
            i += 1
        name = text[start:i].strip().lower()
        value = ""
        if i < n and text[i] == "=":
            i += 1
            while i < n and text[i] in " \t":
                i += 1
            if i < n and text[i] == '"':
                i += 1
                chars: list[str] = []
                while i < n and text[i] != '"':
                    if text[i] == "\\" and i + 1 < n:
                        i += 1
                    chars.append(text[i])
                    i += 1
                if i >= n:
                    raise _invalid(f"{field}: a quoted parameter value is not closed", field)
                i += 1
                value = "".join(chars)
            else:
                start = i
                while i < n and text[i] != ";":
                    i += 1
                value = text[start:i].strip()
        if name:
            out.setdefault(name, value)
    return out


def media_type(value: str | None, field: str = "Content-Type") -> tuple[str, dict[str, str]]:
    """``("type/subtype", params)``, lower-cased; ``("", {})`` for an absent or blank value."""
    if value is None or not value.strip():
        return "", {}
    main, _, rest = value.partition(";")
    kind = main.strip().lower()
    top, slash, sub = kind.partition("/")
    if not slash or not top or not sub or not set(top) <= _TOKEN_CHARS or not set(sub) <= _TOKEN_CHARS:
        raise _invalid(f"{field}: not a media type of the form type/subtype", field)
    return kind, _params(rest, field)


@dataclass(frozen=True, slots=True)
class FormPart:
    name: str
    filename: str | None
    #: the part's Content-Type value as sent (None when it has none)
    content_type: str | None
    data: bytes


def form_parts(body: bytes, boundary: str, max_parts: int = MAX_PARTS) -> list[FormPart]:
    """The parts of a ``multipart/form-data`` body delimited by ``boundary``."""
    if not 1 <= len(boundary) <= 70:
        raise _invalid("Content-Type: the multipart boundary must have 1 to 70 characters", "Content-Type")
    delimiter = b"--" + boundary.encode("latin-1", "replace")
    # the first delimiter may open the body; every later one follows a CRLF
    data = b"\r\n" + body
    marker = b"\r\n" + delimiter
    pos = data.find(marker)
    if pos < 0:
        raise _invalid("body: no multipart delimiter with the declared boundary", "body")
    parts: list[FormPart] = []
    pos += len(marker)
    while True:
        if data[pos : pos + 2] == b"--":
            return parts
        # transport padding (RFC 2046 5.1.1) before the line break
        while data[pos : pos + 1] in (b" ", b"\t"):
            pos += 1
        if data[pos : pos + 2] != b"\r\n":
            raise _invalid(f"body: part {len(parts)} does not start on a new line", "body")
        pos += 2
        if data.startswith(b"\r\n", pos):  # a part with no header lines
            block, content_start = b"", pos + 2
        else:
            head_end = data.find(b"\r\n\r\n", pos, pos + MAX_PART_HEADERS + 4)
            if head_end < 0:
                raise _invalid(f"body: the headers of part {len(parts)} are not ended or too long", "body")
            block, content_start = data[pos:head_end], head_end + 4
        headers = _headers(block, len(parts))
        end = data.find(marker, content_start)
        if end < 0:
            raise _invalid("body: the multipart body has no closing delimiter", "body")
        disposition, params = media_disposition(headers.get("content-disposition"), len(parts))
        if disposition != "form-data" or not params.get("name"):
            raise _invalid(f"body: part {len(parts)} is not a named form-data part", "body")
        if len(parts) >= max_parts:
            raise _invalid(f"body: more than {max_parts} form parts", "body")
        parts.append(
            FormPart(
                params["name"], params.get("filename"), headers.get("content-type"), data[content_start:end]
            )
        )
        pos = end + len(marker)


def _headers(block: bytes, index: int) -> dict[str, str]:
    out: dict[str, str] = {}
    for raw in block.split(b"\r\n"):
        if not raw:
            continue
        name, colon, value = raw.decode("utf-8", "replace").partition(":")
        if not colon or not name.strip():
            raise _invalid(f"body: part {index} has a header line without a name", "body")
        out.setdefault(name.strip().lower(), value.strip())
    return out


def media_disposition(value: str | None, index: int) -> tuple[str, dict[str, str]]:
    if value is None:
        raise _invalid(f"body: part {index} has no Content-Disposition header", "body")
    main, _, rest = value.partition(";")
    return main.strip().lower(), _params(rest, "body")
