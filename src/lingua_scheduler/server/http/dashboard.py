"""The live dashboard: one page served by the scheduler itself, fed by server-sent events.

Owns ``GET /dashboard`` (the page), ``GET /dashboard/static/{name}`` (its hand-written script and style
sheet, shipped in the package: no CDN, no build step) and ``GET /api/v1/dashboard/stream``, an
event stream that pushes one frame a second. A frame is the server-side aggregate of ``stats.py``
(counts, rates, last-minute latencies, language pairs, recent events): its size does not depend on the
fleet, it is encoded once and shared by every dashboard, and it is built only while one is connected.
The page asks the read API for individual nodes only when the operator looks at them, and sends
admin actions with the token the operator typed (kept in the tab's session storage).

Must never: ship the fleet each second, queue frames for a slow browser (it gets the newest frame when
it catches up, or is cut off after ``WRITE_TIMEOUT``), or inline script (the page's CSP forbids it).
"""

from __future__ import annotations

import asyncio
import contextlib
from functools import cache
from importlib import resources

from aiohttp import web

from lingua_scheduler.errors import ErrorCode, RequestError
from lingua_scheduler.server.http import routes
from lingua_scheduler.server.http.stats import STATS
from lingua_scheduler.server.state import STATE

#: assets the page loads, name -> content type; nothing else is served from the package
ASSETS: dict[str, str] = {
    "dashboard.js": "text/javascript",
    "dashboard-ops.js": "text/javascript",
    "dashboard.css": "text/css",
}
#: a browser that has not taken a frame within this long is disconnected (it reconnects by itself)
WRITE_TIMEOUT = 10.0
_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_PAGE_HEADERS = {
    **_HEADERS,
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
}


@cache
def _asset(name: str) -> bytes:
    return (resources.files("lingua_scheduler") / "static" / name).read_bytes()


async def page(request: web.Request) -> web.Response:
    """The dashboard page (static HTML; everything live comes over the stream)."""
    return web.Response(
        body=_asset("dashboard.html"), content_type="text/html", charset="utf-8", headers=_PAGE_HEADERS
    )


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in ASSETS:
        raise RequestError(f"no asset {name!r}", code=ErrorCode.NOT_FOUND)
    return web.Response(body=_asset(name), content_type=ASSETS[name], charset="utf-8", headers=_HEADERS)


async def stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: one ``data:`` line of JSON per second, the same bytes for every dashboard."""
    agg = request.app[STATS]
    limit = request.app[STATE].config.admin.max_dashboard_clients
    if agg.clients >= limit:
        raise RequestError(f"{limit} dashboards are connected already", code=ErrorCode.TOO_MANY_CLIENTS)
    response = web.StreamResponse(
        headers={**_HEADERS, "Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    agg.clients += 1
    try:
        seq, frame = agg.current_frame()
        # "retry" tells EventSource how soon to reconnect after the stream ends (restart, cut-off)
        await asyncio.wait_for(response.write(b"retry: 2000\ndata: " + frame + b"\n\n"), WRITE_TIMEOUT)
        while True:
            nxt = await agg.next_frame(seq)
            if nxt is None:
                break
            seq, frame = nxt
            await asyncio.wait_for(response.write(b"data: " + frame + b"\n\n"), WRITE_TIMEOUT)
    except (ConnectionError, TimeoutError):
        pass  # the browser went away or stopped reading; EventSource reconnects on its own
    finally:
        agg.clients -= 1
    with contextlib.suppress(ConnectionError):
        await response.write_eof()
    return response


def add_routes(app: web.Application) -> None:
    routes.register(app, "dashboard", page)
    routes.register(app, "dashboard_asset", asset)
    routes.register(app, "dashboard_stream", stream)
