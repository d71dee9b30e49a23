"""What a simulated peer does to its TCP connection that a WebSocket client offers no call for.

Only the public socket of the connection is used (``ClientWebSocketResponse.get_extra_info("socket")``).
"""

from __future__ import annotations

import contextlib
import socket

import aiohttp


def drop_connection(ws: aiohttp.ClientWebSocketResponse) -> None:
    """End the TCP connection without a close handshake, as the kernel of a crashed process does:
    the scheduler sees the connection end with no close frame; the client sees the end of its
    stream and closes the socket."""
    sock = ws.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError):  # already gone
        sock.shutdown(socket.SHUT_RDWR)


def shrink_receive_buffer(ws: aiohttp.ClientWebSocketResponse, n_bytes: int) -> None:
    """Make the kernel's receive buffer of the connection small, so that a peer that stops reading
    fills it within a few messages rather than megabytes."""
    sock = ws.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, n_bytes)
